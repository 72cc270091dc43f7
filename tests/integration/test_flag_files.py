"""Boot state in flag files, on boards without U-Boot: the shell, the updater and
the initramfs read what each other writes, and what a write cut short leaves is
ignored.

The files are on the bootflags partition, mounted at /mnt/flags once the system
runs: ``rootfs2`` (present while slot b is active), ``trial`` (``SLOT BOOTCOUNT``
while SLOT is on trial) and ``rolled_back_from`` (``SLOT``). These tests are the
flag-file counterparts of test_fw_env_interop.py and test_bootenv_corruption.py.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import flag_files, install_without_reboot, reboot_transcript

from mbl_sim.device import Device
from mbl_sim.images.recipe import FLAGS_MOUNT_POINT

pytestmark = [pytest.mark.qemu, pytest.mark.needs("flag-files")]


def write_flag(device: Device, name: str, line: str | None) -> None:
    """Write the flag file ``name`` from the shell as the initramfs does: a
    temporary file, sync, rename, sync.

    The file contains ``line`` and a newline, or nothing when ``line`` is None.
    """
    path = f"{FLAGS_MOUNT_POINT}/{name}"
    write = ":" if line is None else f"printf '%s\\n' {shlex.quote(line)}"
    device.check_output(
        f"{write} > {path}.tmp && sync && mv -f {path}.tmp {path} && sync"
    )


def remove_flag(device: Device, name: str) -> None:
    device.check_output(f"rm {FLAGS_MOUNT_POINT}/{name} && sync")


def test_updater_reads_shell_written_flags(device: Device) -> None:
    assert flag_files(device) == {}

    write_flag(device, "trial", "a 2")

    status = device.status()
    assert status["store"] == "flag-files"
    assert status["active_slot"] == "a"
    assert status["upgrade_available"] == "1"
    assert status["bootcount"] == "2"

    marked = device.check_output("mbl-update mark-good")

    assert marked == "mbl-update: slot a marked good\n"
    assert flag_files(device) == {}
    status = device.status()
    assert status["upgrade_available"] == "0"
    assert status["bootcount"] == "0"

    write_flag(device, "rolled_back_from", "b")

    assert device.status()["rolled_back_from"] == "b"
    assert "rolled back from: b" in device.check_output("mbl-update status")

    # A trial of a slot that is not active is stale: what a power cut leaves
    # between writing the trial and switching rootfs2.
    write_flag(device, "trial", "b 0")

    status = device.status()
    assert status["active_slot"] == "a"
    assert status["upgrade_available"] == "0"
    assert status["bootcount"] == "0"


def test_shell_reads_updater_flip(
    device: Device, rootfs_payload: Callable[..., Path]
) -> None:
    # The next update removes the record of an earlier rollback.
    write_flag(device, "rolled_back_from", "b")

    installed = install_without_reboot(device, rootfs_payload(version="2.0.0"))

    assert installed.exit_status == 0, installed.output
    assert flag_files(device) == {"rootfs2": b"", "trial": b"b 0\n"}
    assert device.run(f"ls {FLAGS_MOUNT_POINT} | grep -q '[.]tmp$'").exit_status == 1


def test_initramfs_follows_shell_flags(
    device: Device, rootfs_payload: Callable[..., Path]
) -> None:
    installed = install_without_reboot(device, rootfs_payload(version="2.0.0"))
    assert installed.exit_status == 0, installed.output

    # Back to slot a by hand: the trial of slot b becomes stale.
    remove_flag(device, "rootfs2")
    transcript = reboot_transcript(device)

    assert "mbl-boot: removing a stale trial of slot b" in transcript
    assert device.running_slot() == "a"
    assert device.version() == device.images.factory_version
    assert flag_files(device) == {}

    write_flag(device, "rootfs2", None)
    transcript = reboot_transcript(device)

    assert "mbl-boot: flag files, booting slot b" in transcript
    assert "on trial" not in transcript
    assert device.running_slot() == "b"
    assert device.version() == "2.0.0"
    assert device.status()["active_slot"] == "b"
    assert flag_files(device) == {"rootfs2": b""}


def test_leftover_temporary_files_ignored(device: Device) -> None:
    # A power cut before the rename leaves the new content in NAME.tmp, and the
    # old state stays: slot a, confirmed.
    device.check_output(
        f"printf '' > {FLAGS_MOUNT_POINT}/rootfs2.tmp"
        f" && printf 'b 0\\n' > {FLAGS_MOUNT_POINT}/trial.tmp && sync"
    )

    status = device.status()
    assert status["active_slot"] == "a"
    assert status["upgrade_available"] == "0"

    transcript = reboot_transcript(device)

    assert "mbl-boot: flag files, booting slot a" in transcript
    assert device.running_slot() == "a"
    assert flag_files(device) == {}


def test_invalid_trial_count_restarts_count(device: Device) -> None:
    # The initramfs and the updater both read a count that is not a number as 0.
    write_flag(device, "trial", "a x")
    device.check_output("touch /etc/mbl/no-auto-mark-good && sync")

    assert device.status()["bootcount"] == "0"

    transcript = reboot_transcript(device)

    bootlimit = device.board.boot.bootlimit
    assert f"mbl-boot: slot a on trial, boot 1 of {bootlimit}" in transcript
    assert device.running_slot() == "a"
    assert flag_files(device) == {"trial": b"a 1\n"}
    assert device.status()["bootcount"] == "1"


def test_unmounted_flags_refused(device: Device) -> None:
    # Unmounted, /mnt/flags is an empty directory of the root filesystem, which
    # the initramfs never reads: a flip written there would be lost at reboot.
    device.check_output(f"umount {FLAGS_MOUNT_POINT}")

    status = device.run("mbl-update status")
    marked = device.run("mbl-update mark-good")

    assert status.exit_status != 0
    assert f"{FLAGS_MOUNT_POINT} is not a mount point" in status.output
    assert marked.exit_status != 0
    assert device.check_output(f"ls -A {FLAGS_MOUNT_POINT}") == ""
    device.check_output(f"mount {FLAGS_MOUNT_POINT}")
    assert device.status()["active_slot"] == "a"
