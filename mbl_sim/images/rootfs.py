"""The device's root filesystem and initramfs, staged from Debian packages without root.

Packages are unpacked with ``dpkg-deb -x`` (no maintainer scripts run). busybox applet
links are made from the applet list of the same busybox version built for the host,
because the ARM binary cannot run here. Python is precompiled on the host, which must
run the same minor version as the device (3.11), so the first import on the device does
not compile.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mbl_sim.commands import run
from mbl_sim.errors import BuildError

# Character devices the root filesystem carries before devtmpfs is mounted over /dev:
# (path, major, minor, mode).
DEVICE_NODES: tuple[tuple[str, int, int, int], ...] = (
    ("dev/console", 5, 1, 0o600),
    ("dev/null", 1, 3, 0o666),
)

# Directories every root filesystem has, with their modes.
BASE_DIRECTORIES: tuple[tuple[str, int], ...] = (
    ("boot", 0o755),
    ("config/factory", 0o755),
    ("config/user", 0o755),
    ("dev", 0o755),
    ("home", 0o755),
    ("mnt", 0o755),
    ("proc", 0o555),
    ("root", 0o700),
    ("run", 0o755),
    ("scratch", 0o755),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("var/log", 0o755),
)

DEVICE_PYTHON = (3, 11)


@dataclass(frozen=True)
class MountEntry:
    """One /etc/fstab line."""

    device: str
    mount_point: str
    fs_type: str
    options: str = "defaults"


def unpack_packages(debs: Iterable[Path], root: Path) -> None:
    for deb in debs:
        run(["dpkg-deb", "-x", deb, root])


def merge_usr(root: Path) -> None:
    """Make /bin, /sbin and /lib links into /usr, as Debian bookworm systems have them.

    Packages still ship files under /lib and /usr/lib alike (libc6 has the dynamic
    loader in /lib/aarch64-linux-gnu), so the trees are merged, not replaced.
    """
    for name in ("bin", "sbin", "lib"):
        top = root / name
        usr = root / "usr" / name
        usr.mkdir(parents=True, exist_ok=True)
        if top.is_dir() and not top.is_symlink():
            _merge_into(top, usr)
            shutil.rmtree(top)
        if not top.is_symlink():
            top.symlink_to(f"usr/{name}")


def _merge_into(source: Path, target: Path) -> None:
    for entry in source.iterdir():
        destination = target / entry.name
        if entry.is_dir() and not entry.is_symlink() and destination.is_dir():
            _merge_into(entry, destination)
        elif not destination.exists() and not destination.is_symlink():
            entry.rename(destination)


def busybox_applets(host_busybox_deb: Path, scratch: Path) -> list[str]:
    """Return the applet paths (``usr/bin/awk``, ``sbin/init`` …) of a busybox package,
    read by running the host build of the same version."""
    run(["dpkg-deb", "-x", host_busybox_deb, scratch])
    output = run([scratch / "bin" / "busybox", "--list-full"])
    return [line.strip() for line in output.splitlines() if line.strip()]


def link_applets(
    root: Path, applets: Sequence[str], busybox: str = "/bin/busybox"
) -> None:
    """Link each applet to busybox, leaving files that a package already installed."""
    for applet in applets:
        path = root / applet
        if path.exists() or path.is_symlink():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(busybox)


def add_python(root: Path) -> None:
    """Add the ``python3`` link and precompile the standard library.

    Raises:
        BuildError: the host Python is not the device's minor version, so its bytecode
            would be ignored on the device.
    """
    if sys.version_info[:2] != DEVICE_PYTHON:
        raise BuildError(
            f"the host runs Python {sys.version_info[0]}.{sys.version_info[1]}, "
            "but the "
            f"device runs {DEVICE_PYTHON[0]}.{DEVICE_PYTHON[1]}; build the images with "
            "Python 3.11 so that the bytecode matches"
        )
    python = root / "usr" / "bin" / "python3"
    if not python.exists():
        python.symlink_to("python3.11")
    compile_python(
        root, [root / "usr" / "lib" / "python3.11", root / "usr" / "lib" / "python3"]
    )


def compile_python(root: Path, directories: Sequence[Path]) -> None:
    present = [d for d in directories if d.is_dir()]
    run(
        [
            sys.executable,
            "-m",
            "compileall",
            "-q",
            "-j",
            "0",
            "--invalidation-mode",
            "unchecked-hash",
            "-s",
            root,
            "-p",
            "/",
            *present,
        ]
    )


def install_updater(root: Path, source: Path) -> None:
    """Copy the ``updater`` package into the device's dist-packages."""
    target = root / "usr" / "lib" / "python3" / "dist-packages" / "updater"
    shutil.copytree(
        source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )


def add_overlay(root: Path, overlay: Path) -> None:
    shutil.copytree(overlay, root, symlinks=True, dirs_exist_ok=True)


def add_base_directories(root: Path) -> None:
    for relative, mode in BASE_DIRECTORIES:
        path = root / relative
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(mode)


def write_inittab(root: Path, console: str) -> None:
    (root / "etc" / "inittab").write_text(
        "# busybox init: system start, a shell on the serial console, system stop.\n"
        "::sysinit:/etc/init.d/rcS\n"
        f"{console}::respawn:-/bin/sh\n"
        "::ctrlaltdel:/sbin/reboot\n"
        "::shutdown:/etc/init.d/rcK\n"
    )


def write_fstab(root: Path, entries: Sequence[MountEntry]) -> None:
    lines = ["# device mount-point type options dump pass"]
    for entry in entries:
        lines.append(
            f"{entry.device} {entry.mount_point} {entry.fs_type} {entry.options} 0 0"
        )
    (root / "etc" / "fstab").write_text("\n".join(lines) + "\n")


def write_device_config(
    root: Path, device_config: Mapping[str, object], fw_env_lines: Sequence[str]
) -> None:
    (root / "etc" / "mbl").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "mbl" / "device.json").write_text(
        json.dumps(device_config, indent=2, sort_keys=True) + "\n"
    )
    (root / "etc" / "fw_env.config").write_text(
        "# libubootenv: device offset size, one line per redundant copy\n"
        + "\n".join(fw_env_lines)
        + "\n"
    )


def write_version(root: Path, version: str) -> None:
    (root / "etc" / "mbl-version").write_text(version + "\n")


def strip_docs(root: Path) -> None:
    """Remove documentation, manual pages and locales that the device never reads."""
    for relative in (
        "usr/share/doc",
        "usr/share/man",
        "usr/share/info",
        "usr/share/locale",
        "usr/share/lintian",
    ):
        shutil.rmtree(root / relative, ignore_errors=True)


def write_cpio(root: Path, output: Path) -> None:
    """Write ``root`` as a gzip-compressed newc cpio archive owned by root."""
    names = sorted(
        str(Path(directory, name).relative_to(root))
        for directory, dirnames, filenames in os.walk(root)
        for name in [*dirnames, *filenames]
    )
    listing = "\n".join([".", *names]).encode() + b"\n"
    result = subprocess.run(
        ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
        cwd=root,
        input=listing,
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        raise BuildError(
            f"cpio failed with exit code {result.returncode} in {root}: "
            f"{result.stderr.decode(errors='replace')[-2000:]}"
        )
    with gzip.open(output, "wb", compresslevel=6) as stream:
        stream.write(result.stdout)
