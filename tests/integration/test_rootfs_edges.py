"""Root filesystem payloads at the edge of the inactive slot's capacity, and
truncated ones.

The updater charges every member of the rootfs tarball to a space budget before it
writes the member (updater.members.SpaceBudget). The budget starts at the free bytes
and inodes of the freshly made filesystem, as statvfs reports them, and rejects the
first member that would take the charged total above them. These tests measure that
start value on the device and size one filler file with the updater's own
accounting (updater.members.estimate_space), so that the charged total is exactly
the free space, or one block more.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import (
    boot_state_digest,
    build_rootfs_payload_with,
    install_without_reboot,
    slot_device,
)

from mbl_sim.device import Device
from mbl_sim.images.recipe import DeviceImages
from mbl_sim.payloads import ROOTFS_MEMBER, RootfsChange, wrap_payload
from updater.members import estimate_space
from updater.slots import FILESYSTEM_LABELS

pytestmark = pytest.mark.qemu

FILLER = "mbl-sim-filler"
FULL_VERSION = "2.0.0-full"
MOUNT_POINT = "/tmp/mbl-sim-capacity"
# Size in bytes of the stream footer that ends every .xz file.
XZ_FOOTER_SIZE = 12


@dataclass(frozen=True)
class SlotCapacity:
    """Free space of a freshly made filesystem in the inactive slot.

    Attributes:
        block_size: ``f_frsize`` in bytes.
        free_bytes: ``f_bavail * f_frsize``, the space the updater's budget starts at.
        free_inodes: ``f_favail``.
    """

    block_size: int
    free_bytes: int
    free_inodes: int


def measure_capacity(device: Device) -> SlotCapacity:
    """Make the filesystem that mbl-update makes in slot b and measure its free space.

    mbl-update has no command that reports a slot's capacity, so this repeats the
    steps of updater/rootfs.py: ``mke2fs -F -q -t ext4 -L rootfs2``, mount, statvfs.
    """
    block_device = slot_device(device, "b")
    label = FILESYSTEM_LABELS["b"]
    # NOTE: a bare "mke2fs" in the device's shell runs BusyBox's applet, which has no
    # -t option. The updater starts e2fsprogs' mke2fs from PATH, /usr/sbin/mke2fs.
    device.check_output(f"/usr/sbin/mke2fs -F -q -t ext4 -L {label} {block_device}")
    device.check_output(f"mkdir -p {MOUNT_POINT}")
    device.check_output(f"mount -t ext4 {block_device} {MOUNT_POINT}")
    try:
        output = device.check_output(
            "python3 -c 'import os; s = os.statvfs(\"" + MOUNT_POINT + '");'
            ' print("capacity", s.f_frsize, s.f_bavail, s.f_favail)\''
        )
    finally:
        device.check_output(f"umount {MOUNT_POINT}")
    match = re.search(r"capacity ([0-9]+) ([0-9]+) ([0-9]+)", output)
    assert match is not None, f"no statvfs line in {output!r}"
    block_size, blocks, inodes = (int(group) for group in match.groups())
    return SlotCapacity(block_size, blocks * block_size, inodes)


def filler_info(size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(FILLER)
    info.size = size
    info.mode = 0o644
    return info


def charged_bytes(
    members: list[tarfile.TarInfo], filler_size: int, capacity: SlotCapacity
) -> int:
    """Return the bytes the updater's budget charges for ``members`` and the filler."""
    used_bytes, used_inodes = estimate_space(
        [*members, filler_info(filler_size)], capacity.block_size
    )
    assert used_inodes <= capacity.free_inodes
    return used_bytes


def filling_size(members: list[tarfile.TarInfo], capacity: SlotCapacity) -> int:
    """Return the filler size that brings the charged total exactly to the free bytes.

    The size is a whole number of blocks, so one byte more costs one more block.
    """
    block = capacity.block_size
    low, high = 0, capacity.free_bytes // block
    while low < high:
        middle = (low + high + 1) // 2
        if charged_bytes(members, middle * block, capacity) <= capacity.free_bytes:
            low = middle
        else:
            high = middle - 1
    charged = charged_bytes(members, low * block, capacity)
    assert charged == capacity.free_bytes, (
        f"no filler size fills the slot exactly: {low} blocks charge {charged} bytes,"
        f" {capacity.free_bytes} are free"
    )
    return low * block


def build_filled_payload(
    images: DeviceImages, capacity: SlotCapacity, extra_bytes: int, directory: Path
) -> tuple[Path, int]:
    """Build the device's root filesystem plus a zero-filled filler file that fills
    the slot exactly, plus ``extra_bytes``. Return the payload and the filler size."""
    sizes: list[int] = []

    def append_filler(tar: tarfile.TarFile) -> None:
        size = filling_size(tar.getmembers(), capacity) + extra_bytes
        sizes.append(size)
        with open("/dev/zero", "rb") as zeros:
            tar.addfile(filler_info(size), zeros)

    payload = build_rootfs_payload_with(
        images.rootfs,
        directory / "payload.tar",
        append_filler,
        RootfsChange(version=FULL_VERSION),
    )
    return payload, sizes[0]


def check_slot_a_still_boots(device: Device, boot_state_before: str) -> None:
    assert boot_state_digest(device) == boot_state_before
    assert device.status()["active_slot"] == "a"

    device.reboot()

    assert device.running_slot() == "a"
    assert device.version() == device.images.factory_version
    assert boot_state_digest(device) == boot_state_before


def test_rootfs_one_byte_over_rejected(
    device: Device, device_images: DeviceImages, tmp_path: Path
) -> None:
    capacity = measure_capacity(device)
    payload, _ = build_filled_payload(device_images, capacity, 1, tmp_path)
    boot_state_before = boot_state_digest(device)

    result = install_without_reboot(device, payload)

    assert result.exit_status == 1, result.output
    assert "mbl-update: error: root filesystem does not fit" in result.output
    assert f"member '{FILLER}'" in result.output
    needed = capacity.free_bytes + capacity.block_size
    assert f"brings the space needed to {needed} bytes" in result.output
    assert f"only {capacity.free_bytes} bytes are free" in result.output
    check_slot_a_still_boots(device, boot_state_before)


def test_rootfs_at_capacity_boots(
    device: Device, device_images: DeviceImages, tmp_path: Path
) -> None:
    capacity = measure_capacity(device)
    payload, filler_size = build_filled_payload(device_images, capacity, 0, tmp_path)

    result = install_without_reboot(device, payload, verbose=True)

    assert result.exit_status == 0, result.output
    # With -v the updater logs "N of M bytes accounted": the charged total and the
    # free space.
    accounted = re.search(r"([0-9]+) of ([0-9]+) bytes accounted", result.output)
    assert accounted is not None, result.output
    assert int(accounted[1]) == capacity.free_bytes
    assert int(accounted[2]) == capacity.free_bytes

    device.reboot()

    assert device.running_slot() == "b"
    assert device.version() == FULL_VERSION
    assert device.check_output(f"stat -c %s /{FILLER}") == f"{filler_size}\n"


TRUNCATIONS: dict[str, Callable[[int], int]] = {
    "cut-in-middle": lambda size: size // 2,
    "xz-footer-missing": lambda size: size - XZ_FOOTER_SIZE,
}


@pytest.mark.parametrize("truncation", list(TRUNCATIONS))
def test_truncated_rootfs_rejected(
    device: Device, rootfs_xz: Path, tmp_path: Path, truncation: str
) -> None:
    data = rootfs_xz.read_bytes()
    truncated = tmp_path / ROOTFS_MEMBER
    truncated.write_bytes(data[: TRUNCATIONS[truncation](len(data))])
    payload = wrap_payload({ROOTFS_MEMBER: truncated}, tmp_path / "payload.tar")
    boot_state_before = boot_state_digest(device)

    result = install_without_reboot(device, payload)

    assert result.exit_status == 1, result.output
    assert "mbl-update: error: rootfs.tar.xz is truncated or corrupt" in result.output
    assert "active slot is now" not in result.output
    check_slot_a_still_boots(device, boot_state_before)
