"""Install a root filesystem payload into the block device of the inactive slot.

Steps, each logged: make a new ext4 filesystem (``mke2fs -F -q -t ext4 -L LABEL``),
mount it on a new temporary directory, stream-extract ``rootfs.tar.xz`` from the
payload into it (`updater.extract`), ``os.sync()``, unmount, and check it with
``e2fsck -n -f``. Mounting uses ``mount -t ext4 DEVICE DIR`` and ``umount DIR``, which
BusyBox and util-linux both provide.

Any failure unmounts the filesystem and raises `InstallError`. This module never
changes the U-Boot environment, so a failed install leaves the slot inactive and the
running slot active.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

from updater.command import Runner, run_command
from updater.errors import CommandError, InstallError
from updater.extract import ExtractResult, extract_payload_rootfs, extract_rootfs_stream
from updater.members import SpaceBudget, normalize_member_name, plan_member
from updater.payload import Payload

__all__ = [
    "ExtractResult",
    "InstallResult",
    "SpaceBudget",
    "extract_payload_rootfs",
    "extract_rootfs_stream",
    "install_rootfs",
    "normalize_member_name",
    "plan_member",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstallResult:
    """Result of writing, unmounting and checking a root filesystem on ``device``."""

    device: str
    label: str
    extract: ExtractResult


def install_rootfs(
    payload: Payload,
    device: str,
    *,
    label: str,
    runner: Runner = run_command,
    mount_parent: str | None = None,
) -> InstallResult:
    """Write the payload's root filesystem into ``device`` and verify it.

    ``mount_parent`` is the directory for the temporary mount point (default: the
    system's temporary directory).

    Raises:
        InstallError: formatting, mounting, extracting, unmounting or the
            filesystem check failed. The filesystem is unmounted when this is raised,
            unless unmounting itself failed.
    """
    log.info("installing root filesystem from %s into %s", payload.path, device)
    _run_step(
        runner,
        ["mke2fs", "-F", "-q", "-t", "ext4", "-L", label, device],
        f"formatting {device}",
    )
    mount_dir = tempfile.mkdtemp(prefix="mbl-update-", dir=mount_parent)
    try:
        result = _extract_mounted(payload, device, mount_dir, runner)
    finally:
        _remove_mount_point(mount_dir)
    _run_step(
        runner,
        ["e2fsck", "-n", "-f", device],
        f"checking the new filesystem on {device}",
    )
    log.info(
        "root filesystem on %s: %d members, %d data bytes, %d of %d bytes accounted",
        device,
        result.members,
        result.data_bytes,
        result.accounted_bytes,
        result.free_bytes,
    )
    return InstallResult(device=device, label=label, extract=result)


def _extract_mounted(
    payload: Payload, device: str, mount_dir: str, runner: Runner
) -> ExtractResult:
    _run_step(runner, ["mount", "-t", "ext4", device, mount_dir], f"mounting {device}")
    try:
        result = extract_payload_rootfs(payload, mount_dir)
        os.sync()
    except BaseException:
        _unmount_after_error(runner, mount_dir)
        raise
    _run_step(runner, ["umount", mount_dir], f"unmounting {device}")
    return result


def _unmount_after_error(runner: Runner, mount_dir: str) -> None:
    """Unmount after a failure, logging but not raising, so the first error surfaces."""
    try:
        runner(["umount", mount_dir])
    except CommandError as exc:
        log.error("unmounting %s after a failed install failed too: %s", mount_dir, exc)


def _remove_mount_point(mount_dir: str) -> None:
    # rmdir fails with EBUSY when unmounting failed. The error that led here matters
    # more, so this failure is only logged.
    try:
        os.rmdir(mount_dir)
    except OSError as exc:
        log.error("cannot remove mount point %s: %s", mount_dir, exc)


def _run_step(runner: Runner, argv: Sequence[str], step: str) -> None:
    try:
        runner(argv)
    except CommandError as exc:
        raise InstallError(f"{step} failed: {exc}") from exc
