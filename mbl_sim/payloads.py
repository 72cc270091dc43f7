"""Build update payloads on the host.

A root filesystem payload is an uncompressed tar holding one member, ``rootfs.tar.xz``.
The inner tarball is written from a staging directory with every owner mapped to root
(a build without root privileges owns its files), plus character devices that a staging
directory cannot hold without root, so that a payload built by any user matches what the
device expects.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mbl_sim.errors import BuildError, ConfigError
from mbl_sim.images.cache import StepKey, locked
from mbl_sim.images.rootfs import DEVICE_NODES

log = logging.getLogger(__name__)

ROOTFS_MEMBER = "rootfs.tar.xz"
VERSION_FILE = "etc/mbl-version"


@dataclass(frozen=True)
class RootfsChange:
    """Changes applied to a root filesystem while it is packed.

    Attributes:
        version: new content of /etc/mbl-version, or None to keep it.
        files: extra or replaced regular files: path inside the root → content.
        modes: permission bits of files in ``files`` (default 0o644): path → mode.
        remove: paths inside the root to leave out (with everything below them).
    """

    version: str | None = None
    files: Mapping[str, bytes] = field(default_factory=dict)
    modes: Mapping[str, int] = field(default_factory=dict)
    remove: Sequence[str] = ()


def _root_owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _excluded(relative: str, change: RootfsChange) -> bool:
    return any(
        relative == r or relative.startswith(r.rstrip("/") + "/") for r in change.remove
    )


def write_rootfs_tar(source: Path, output: Path, change: RootfsChange) -> None:
    """Write ``source`` as an uncompressed tar with ``change`` applied, names relative
    to the root (``usr/bin/python3``), owners root, hard links kept as links.

    Raises:
        ConfigError: ``source`` is not a directory.
    """
    if not source.is_dir():
        raise ConfigError(f"root filesystem source {source} is not a directory")
    replaced = {path.strip("/"): data for path, data in change.files.items()}
    modes = {path.strip("/"): mode for path, mode in change.modes.items()}
    if change.version is not None:
        replaced[VERSION_FILE] = (change.version + "\n").encode()
    with tarfile.open(output, "w", format=tarfile.GNU_FORMAT) as tar:
        for directory, dirnames, filenames in os.walk(source):
            dirnames.sort()
            for name in sorted([*dirnames, *filenames]):
                path = Path(directory, name)
                relative = path.relative_to(source).as_posix()
                if relative in replaced or _excluded(relative, change):
                    if (
                        path.is_dir()
                        and not path.is_symlink()
                        and _excluded(relative, change)
                    ):
                        dirnames.remove(name)
                    continue
                tar.add(path, arcname=relative, recursive=False, filter=_root_owned)
        for relative, data in sorted(replaced.items()):
            info = _root_owned(tarfile.TarInfo(relative))
            info.size = len(data)
            info.mode = modes.get(relative, 0o644)
            tar.addfile(info, io.BytesIO(data))
        for relative, major, minor, mode in DEVICE_NODES:
            if _excluded(relative, change):
                continue
            info = _root_owned(tarfile.TarInfo(relative))
            info.type = tarfile.CHRTYPE
            info.devmajor, info.devminor, info.mode = major, minor, mode
            tar.addfile(info)


def compress_xz(source: Path, output: Path, preset: int = 3) -> None:
    """Compress with the ``xz`` tool on all cores; Python's lzma uses one thread.

    Raises:
        BuildError: xz failed.
    """
    with source.open("rb") as stream_in, output.open("wb") as stream_out:
        result = subprocess.run(
            ["xz", f"-{preset}", "-T0", "-c"],
            stdin=stream_in,
            stdout=stream_out,
            stderr=subprocess.PIPE,
            check=False,
        )
    if result.returncode != 0:
        raise BuildError(
            "xz failed",
            command=["xz", f"-{preset}", "-T0", "-c"],
            exit_code=result.returncode,
            stderr=result.stderr.decode(errors="replace"),
        )


def wrap_payload(members: Mapping[str, Path], output: Path) -> Path:
    """Write the payload tar ``output`` holding ``members`` (name → file) at its top
    level, and return ``output``."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    with tarfile.open(partial, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, path in members.items():
            tar.add(path, arcname=name, recursive=False, filter=_root_owned)
    partial.replace(output)
    return output


def build_rootfs_payload(
    source: Path, output: Path, change: RootfsChange | None = None, xz_preset: int = 3
) -> Path:
    """Build a root filesystem payload from directory ``source``; return its path.

    Raises:
        ConfigError: ``source`` is not a directory.
        BuildError: compression failed.
    """
    change = change or RootfsChange()
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(
        prefix="mbl-payload-", dir=output.parent
    ) as scratch:
        work = Path(scratch)
        write_rootfs_tar(source, work / "rootfs.tar", change)
        compress_xz(work / "rootfs.tar", work / ROOTFS_MEMBER, xz_preset)
        wrap_payload({ROOTFS_MEMBER: work / ROOTFS_MEMBER}, output)
    log.info(
        "built root filesystem payload %s (%d bytes)", output, output.stat().st_size
    )
    return output


def copy_tree(source: Path, destination: Path) -> None:
    """Copy a staging tree, keeping links, so that a caller can change the copy."""
    shutil.copytree(source, destination, symlinks=True)


def cached_rootfs_payload(
    rootfs: Path, cache_dir: Path, change: RootfsChange, name: str = "rootfs"
) -> Path:
    """Return a root filesystem payload of ``rootfs`` with ``change``.

    Each distinct input is built once and kept in ``cache_dir``, which several test
    workers share."""
    key = StepKey("payload")
    key.add_text(str(rootfs.resolve()))
    key.add_text(change.version or "")
    for path, data in sorted(change.files.items()):
        key.add_text(path).add_text(hashlib.sha256(data).hexdigest())
        key.add_text(oct(change.modes.get(path, 0o644)))
    key.add_text(",".join(sorted(change.remove)))
    output = cache_dir / "payloads" / f"{name}-{key.digest()}.tar"
    with locked(cache_dir / "locks" / "payload.lock"):
        if not output.exists():
            build_rootfs_payload(rootfs, output, change)
    return output
