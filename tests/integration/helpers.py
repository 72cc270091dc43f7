"""Helpers for the update tests: raw disk access on a running device, and payloads
built member by member.

Raw reads go through ``dd | gzip | base64`` on the serial console. The environment
copies are mostly zero padding, so gzip keeps the transfer to a few hundred bytes.
Raw writes put the bytes on the device with `Device.deliver` and copy them into place
with ``dd``. Every injected fault is logged with its disk offset and the bytes before
and after, so that a failure can be reproduced by hand.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import logging
import re
import shlex
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mbl_sim.console import CommandResult
from mbl_sim.device import Device
from mbl_sim.images.recipe import FLAGS_MOUNT_POINT, SLOT_PARTITIONS
from mbl_sim.payloads import (
    ROOTFS_MEMBER,
    RootfsChange,
    compress_xz,
    wrap_payload,
    write_rootfs_tar,
)
from updater.bootenv import HEADER_SIZE

log = logging.getLogger(__name__)

SECTOR = 512
INSTALL_TIMEOUT = 600.0

# One line of base64 output. Kernel messages that reach the console between such
# lines are skipped.
_BASE64_LINE = re.compile(r"[A-Za-z0-9+/=]+")
# One line of `flag_files` output: a file name, ":" and its content in hex. Kernel
# messages that reach the console between such lines are skipped.
_FLAG_FILE_LINE = re.compile(r"(?P<name>[A-Za-z0-9_.-]+):(?P<content>(?:[0-9a-f]{2})*)")


# -- running the updater ---------------------------------------------------------------


def install_without_reboot(
    device: Device, payload: Path, *, verbose: bool = False
) -> CommandResult:
    """Deliver ``payload`` and run ``mbl-update install --no-reboot`` on it.

    Unlike `Device.install`, a failed install is returned, not raised, so that a test
    can check the exit status and the message.
    """
    on_device = device.deliver(payload)
    options = "-v " if verbose else ""
    command = f"mbl-update {options}install --no-reboot {shlex.quote(on_device)}"
    return device.run(command, INSTALL_TIMEOUT)


def slot_device(device: Device, slot: str) -> str:
    """Return the block device of ``slot`` (``a`` or ``b``) on the device's board."""
    name = SLOT_PARTITIONS[slot]
    for partition in device.board.storage.layout.partitions:
        if partition.name == name:
            return partition.device
    raise AssertionError(f"board {device.board.name} has no partition {name!r}")


def kernel_parameter(device: Device, name: str) -> str | None:
    """Return the value of ``name=`` on the running kernel's command line, or None."""
    for argument in device.check_output("cat /proc/cmdline").split():
        key, separator, value = argument.partition("=")
        if separator and key == name:
            return value
    return None


def updater_status(device: Device) -> tuple[dict[str, Any], str]:
    """Run ``mbl-update status --json`` and return the decoded JSON and the updater's
    standard error.

    The serial console mixes standard error into a command's output, so it is sent to
    a file. `Device.status` parses the mixed output and fails when the updater warns,
    for example about one invalid environment copy.
    """
    output = device.check_output("mbl-update status --json 2>/tmp/mbl-sim-status.err")
    errors = device.check_output("cat /tmp/mbl-sim-status.err")
    return json.loads(output), errors


def fw_printenv(device: Device) -> dict[str, str]:
    """Return the environment as libubootenv's ``fw_printenv`` reads it."""
    variables = {}
    for line in device.check_output("fw_printenv").splitlines():
        name, separator, value = line.partition("=")
        if separator:
            variables[name] = value
    return variables


def reboot_transcript(device: Device) -> str:
    """Reboot the device, wait for its shell and return the console output of the
    reboot, from U-Boot (or the kernel on boards without U-Boot) to the shell."""
    transcript = device.workdir / "console.log"
    start = transcript.stat().st_size
    device.reboot()
    with transcript.open("rb") as stream:
        stream.seek(start)
        return stream.read().decode("utf-8", errors="replace")


# -- raw disk access -------------------------------------------------------------------


def partition_digest(device: Device, block_device: str, mebibytes: int = 16) -> str:
    """Return the SHA-256 of the first ``mebibytes`` MiB of ``block_device``.

    The first MiBs of an ext4 filesystem contain its superblock, group descriptors and
    first inode tables. A new ``mke2fs`` writes a new UUID into the superblock, so it
    changes this digest.
    """
    output = device.check_output(
        f"dd if={block_device} bs=1M count={mebibytes} 2>/dev/null | sha256sum"
    )
    return output.split()[0]


def read_raw(device: Device, path: str, offset: int, size: int) -> bytes:
    """Read ``size`` bytes at ``offset`` of ``path`` on the device.

    Raises:
        ValueError: ``offset`` or ``size`` is not a multiple of 512.
        AssertionError: the device returned a different number of bytes.
    """
    if offset % SECTOR or size % SECTOR:
        raise ValueError(
            f"offset {offset:#x} and size {size:#x} must be multiples of 512"
        )
    output = device.check_output(
        f"dd if={path} bs={SECTOR} skip={offset // SECTOR} count={size // SECTOR}"
        " 2>/dev/null | gzip -c | base64"
    )
    encoded = "".join(
        line for line in output.splitlines() if _BASE64_LINE.fullmatch(line.strip())
    )
    data = gzip.decompress(base64.b64decode(encoded))
    assert len(data) == size, f"read {len(data)} bytes of {path} at {offset:#x}"
    return data


def write_raw(device: Device, path: str, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` of ``path`` on the device and fsync it.

    The bytes are kept in the device's directory on the host as
    ``raw-OFFSET.bin``, because they are the fault to reproduce.

    Raises:
        ValueError: ``offset`` or the length of ``data`` is not a multiple of 512.
    """
    if offset % SECTOR or len(data) % SECTOR:
        raise ValueError(
            f"offset {offset:#x} and length {len(data)} must be multiples of 512"
        )
    host_file = device.workdir / f"raw-{offset:#x}.bin"
    host_file.write_bytes(data)
    on_device = device.deliver(host_file, f"/tmp/{host_file.name}")
    device.check_output(
        f"dd if={on_device} of={path} bs={SECTOR} seek={offset // SECTOR}"
        f" conv=notrunc,fsync 2>/dev/null && rm {on_device}"
    )
    log.info(
        "wrote %d bytes to %s at offset %#x (%s)", len(data), path, offset, host_file
    )


def write_byte(device: Device, path: str, offset: int, value: int) -> None:
    """Write one byte at ``offset`` of ``path`` on the device and fsync it."""
    device.check_output(
        f"printf '\\{value:03o}' | dd of={path} bs=1 seek={offset} conv=notrunc,fsync"
        " 2>/dev/null"
    )


# -- boot state of either mechanism ----------------------------------------------------


def uses_flag_files(device: Device) -> bool:
    """Return whether the device's board keeps its boot state in flag files (else in
    the U-Boot environment)."""
    return device.board.boot.state == "flag-files"


def _each_flag_file(command: str) -> str:
    """Return a shell loop that runs ``command`` on each regular file ``$f`` of the
    flag directory, in name order."""
    return (
        f'for f in {FLAGS_MOUNT_POINT}/*; do [ -f "$f" ] || continue; {command}; done'
    )


def flag_files(device: Device) -> dict[str, bytes]:
    """Return the content of each regular file in the flag directory by file name.

    Only boards whose boot state is ``flag-files`` have that directory.
    """
    assert uses_flag_files(device), device.board.name
    # One line per file: the name, ":" and the content in hex.
    output = device.check_output(
        _each_flag_file(
            'printf "%s:" "${f##*/}"; od -An -tx1 "$f" | tr -d " \\n"; echo'
        )
    )
    files = {}
    for line in output.splitlines():
        match = _FLAG_FILE_LINE.fullmatch(line.strip())
        if match is not None:
            files[match["name"]] = bytes.fromhex(match["content"])
    return files


def boot_state_digest(device: Device) -> str:
    """Return a digest that any write to the boot state changes.

    With a U-Boot environment it is the digest of both raw copies. With flag files it
    covers each file's name, inode number, modification time and content, because the
    updater and the initramfs replace a file by renaming a new one over it, which
    changes the inode even when the content stays.
    """
    if not uses_flag_files(device):
        return device.env_digest()
    listing = _each_flag_file('stat -c "%n %i %Y" "$f"; sha256sum "$f"')
    return device.check_output(f"{listing} | sha256sum").split()[0]


# -- U-Boot environment copies ---------------------------------------------------------


def read_env_copies(device: Device) -> list[bytes]:
    """Read both raw environment copies from the device's disk."""
    storage = device.board.storage
    return [
        read_raw(device, storage.guest_disk, offset, storage.env.size)
        for offset in storage.env.offsets
    ]


def write_env_copy(device: Device, index: int, raw: bytes) -> None:
    """Write the raw bytes of environment copy ``index`` (0 or 1) on the device."""
    storage = device.board.storage
    assert len(raw) == storage.env.size, f"a copy has {storage.env.size} bytes"
    write_raw(device, storage.guest_disk, storage.env.offsets[index], raw)


def corrupt_env_copy(device: Device, index: int, data_index: int = 0) -> None:
    """Invert one byte in the data area of environment copy ``index`` (0 or 1).

    The stored CRC no longer matches, as after a write that power loss cut short.
    """
    storage = device.board.storage
    offset = storage.env.offsets[index] + HEADER_SIZE + data_index
    before = read_raw(device, storage.guest_disk, offset - offset % SECTOR, SECTOR)
    old = before[offset % SECTOR]
    new = old ^ 0xFF
    log.info(
        "corrupting environment copy %d: byte at %s offset %#x (data byte %d)"
        " %#04x -> %#04x",
        index + 1,
        storage.guest_disk,
        offset,
        data_index,
        old,
        new,
    )
    write_byte(device, storage.guest_disk, offset, new)


# -- payloads --------------------------------------------------------------------------


def add_file(
    tar: tarfile.TarFile,
    name: str,
    data: bytes,
    *,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
) -> None:
    """Add a regular file with the given content, mode and numeric owner."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.uid = uid
    info.gid = gid
    tar.addfile(info, io.BytesIO(data))


def add_directory(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
    """Add a directory owned by root."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    tar.addfile(info)


def add_symlink(tar: tarfile.TarFile, name: str, target: str) -> None:
    """Add a symbolic link to ``target``, which is stored exactly as given."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    info.mode = 0o777
    tar.addfile(info)


def add_hard_link(tar: tarfile.TarFile, name: str, target: str) -> None:
    """Add a hard link to the member ``target``."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE
    info.linkname = target
    info.mode = 0o644
    tar.addfile(info)


def add_char_device(
    tar: tarfile.TarFile, name: str, major: int, minor: int, mode: int = 0o600
) -> None:
    """Add a character device node owned by root."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor = major
    info.devminor = minor
    info.mode = mode
    tar.addfile(info)


def wrap_rootfs_tar(rootfs_tar: Path, output: Path) -> Path:
    """Compress the uncompressed rootfs tarball ``rootfs_tar`` into a payload at
    ``output`` and return ``output``."""
    compressed = rootfs_tar.with_name(ROOTFS_MEMBER)
    compress_xz(rootfs_tar, compressed)
    return wrap_payload({ROOTFS_MEMBER: compressed}, output)


def build_rootfs_payload_with(
    staging: Path,
    output: Path,
    append: Callable[[tarfile.TarFile], None],
    change: RootfsChange | None = None,
) -> Path:
    """Build a root filesystem payload from ``staging`` with ``change``, plus the
    members that ``append`` adds after all others, and return ``output``.

    The rootfs tarball is written next to ``output`` as ``rootfs.tar`` and kept, so a
    failed test leaves the exact input behind.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    rootfs_tar = output.parent / "rootfs.tar"
    write_rootfs_tar(staging, rootfs_tar, change or RootfsChange())
    with tarfile.open(rootfs_tar, "a", format=tarfile.GNU_FORMAT) as tar:
        append(tar)
    return wrap_rootfs_tar(rootfs_tar, output)
