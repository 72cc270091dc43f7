"""Payload tars with the wrong members are rejected before the device changes: the
U-Boot environment, the inactive slot and the slot that boots stay as they were."""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    add_file,
    boot_state_digest,
    install_without_reboot,
    partition_digest,
    slot_device,
)

from mbl_sim.device import Device
from mbl_sim.payloads import ROOTFS_MEMBER

pytestmark = pytest.mark.qemu

PayloadWriter = Callable[[tarfile.TarFile, Path], None]


def rootfs_only(tar: tarfile.TarFile, rootfs_xz: Path) -> None:
    tar.add(rootfs_xz, arcname=ROOTFS_MEMBER)


def only_misnamed(tar: tarfile.TarFile, rootfs_xz: Path) -> None:
    tar.add(rootfs_xz, arcname="rootfs.tar.gz")


def rootfs_in_subdirectory(tar: tarfile.TarFile, rootfs_xz: Path) -> None:
    tar.add(rootfs_xz, arcname=f"update/{ROOTFS_MEMBER}")


def rootfs_and_extra_member(tar: tarfile.TarFile, rootfs_xz: Path) -> None:
    tar.add(rootfs_xz, arcname=ROOTFS_MEMBER)
    add_file(tar, "README.txt", b"release notes\n")


def rootfs_and_ipk(tar: tarfile.TarFile, rootfs_xz: Path) -> None:
    tar.add(rootfs_xz, arcname=ROOTFS_MEMBER)
    add_file(tar, "app_1.0_arm64.ipk", b"!<arch>\n")


def rootfs_twice(tar: tarfile.TarFile, rootfs_xz: Path) -> None:
    tar.add(rootfs_xz, arcname=ROOTFS_MEMBER)
    tar.add(rootfs_xz, arcname=ROOTFS_MEMBER)


def no_members(tar: tarfile.TarFile, rootfs_xz: Path) -> None:
    pass


# Each case: how the payload tar is written, and the part of the updater's error
# message that names the problem.
TAR_CASES: dict[str, tuple[PayloadWriter, str]] = {
    "empty": (no_members, "has no members"),
    "misnamed-rootfs": (only_misnamed, "'rootfs.tar.gz' is not expected"),
    "rootfs-in-subdirectory": (rootfs_in_subdirectory, "is in a subdirectory"),
    "extra-member": (rootfs_and_extra_member, "'README.txt' is not expected"),
    "ipk-and-rootfs": (
        rootfs_and_ipk,
        "contains both rootfs.tar.xz and application packages",
    ),
    "rootfs-twice": (rootfs_twice, "occurs more than once"),
}


def write_tar_payload(output: Path, writer: PayloadWriter, rootfs_xz: Path) -> Path:
    with tarfile.open(output, "w", format=tarfile.GNU_FORMAT) as tar:
        writer(tar, rootfs_xz)
    return output


def check_rejected_unchanged(
    device: Device, payload: Path, expected_message: str
) -> None:
    """Install ``payload``, expect a rejection naming ``expected_message``, and check
    that nothing changed, through a reboot."""
    inactive = slot_device(device, "b")
    boot_state_before = boot_state_digest(device)
    slot_before = partition_digest(device, inactive)

    result = install_without_reboot(device, payload)

    assert result.exit_status == 1, result.output
    assert "mbl-update: error: payload" in result.output
    assert expected_message in result.output
    assert boot_state_digest(device) == boot_state_before
    assert partition_digest(device, inactive) == slot_before

    device.reboot()

    assert device.running_slot() == "a"
    assert device.version() == device.images.factory_version
    assert boot_state_digest(device) == boot_state_before


@pytest.mark.parametrize("case", list(TAR_CASES))
def test_payload_members_rejected(
    device: Device, rootfs_xz: Path, tmp_path: Path, case: str
) -> None:
    writer, expected_message = TAR_CASES[case]
    payload = write_tar_payload(tmp_path / "payload.tar", writer, rootfs_xz)

    check_rejected_unchanged(device, payload, expected_message)


def test_payload_not_a_tar_rejected(device: Device, tmp_path: Path) -> None:
    # A download that received an HTTP error page stores this instead of a payload.
    payload = tmp_path / "payload.tar"
    payload.write_text(
        "<html><head><title>404 Not Found</title></head>"
        "<body><h1>Not Found</h1></body></html>\n" * 20
    )

    check_rejected_unchanged(device, payload, "is not a valid tar archive")


def test_payload_tar_truncated_rejected(
    device: Device, rootfs_xz: Path, tmp_path: Path
) -> None:
    whole = write_tar_payload(tmp_path / "whole.tar", rootfs_only, rootfs_xz)
    payload = tmp_path / "payload.tar"
    payload.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])

    check_rejected_unchanged(device, payload, "truncated")
