"""Redundant U-Boot environment copies with bad CRCs, as a write cut short by power
loss leaves them: what the updater and the boot script read, and where they write.

The copies are written raw on the device's disk, then one data byte is inverted. Copy
1 is the first line of /etc/fw_env.config, which the boot script calls copy ``a`` on
the kernel command line (``mbl.envcopy=a``); copy 2 is ``b``.

Boards with flag files have no environment copies. test_flag_files.py checks what a
write cut short leaves there.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    corrupt_env_copy,
    fw_printenv,
    install_without_reboot,
    kernel_parameter,
    partition_digest,
    read_env_copies,
    reboot_transcript,
    slot_device,
    updater_status,
    write_env_copy,
)

from mbl_sim.device import Device
from updater.bootenv import HEADER_SIZE, decode_copy, encode_copy

pytestmark = [pytest.mark.qemu, pytest.mark.needs("u-boot-env")]

COPY_NAMES = ("a", "b")

# Slot a on trial after an update from slot b. The boot script counts a boot in this
# state, and mbl-update mark-good writes.
ON_TRIAL = {
    "active_slot": "a",
    "previous_slot": "b",
    "upgrade_available": "1",
    "bootcount": "0",
    "bootlimit": "3",
}
# What the corrupt copy contained before its byte was inverted. Slot b is an empty
# filesystem, so a boot that used this copy would not reach the shell.
COMMITTED_B = {
    "active_slot": "b",
    "previous_slot": "a",
    "upgrade_available": "0",
    "bootcount": "0",
    "bootlimit": "3",
}

# Which copy is newest and corrupt, and the flag of the older, valid copy. In the
# second layout the newer flag wraps from 255 to 0.
LAYOUTS = pytest.mark.parametrize(
    ("corrupt_index", "older_flag"),
    [(1, 7), (0, 255)],
    ids=["copy2-newest", "copy1-newest-after-wrap"],
)


def crc_valid(raw: bytes) -> bool:
    return int.from_bytes(raw[:4], "little") == zlib.crc32(raw[HEADER_SIZE:])


def write_corrupt_newest(
    device: Device,
    corrupt_index: int,
    older_flag: int,
    older: dict[str, str],
    newer: dict[str, str],
) -> list[bytes]:
    """Write ``older`` as the valid copy and ``newer`` with the next flag as the corrupt
    copy, and return the raw copies as read back."""
    size = device.board.storage.env.size
    newer_flag = (older_flag + 1) % 256
    write_env_copy(device, 1 - corrupt_index, encode_copy(older, older_flag, size))
    write_env_copy(device, corrupt_index, encode_copy(newer, newer_flag, size))
    corrupt_env_copy(device, corrupt_index)
    copies = read_env_copies(device)
    assert crc_valid(copies[1 - corrupt_index])
    assert not crc_valid(copies[corrupt_index])
    assert copies[corrupt_index][4] == newer_flag
    return copies


@LAYOUTS
def test_updater_skips_corrupt_newest_copy(
    device: Device, corrupt_index: int, older_flag: int
) -> None:
    valid_index = 1 - corrupt_index
    newer_flag = (older_flag + 1) % 256
    corrupted = write_corrupt_newest(
        device,
        corrupt_index,
        older_flag,
        {**ON_TRIAL, "bootcount": "1"},
        {**ON_TRIAL, "bootcount": "2"},
    )

    status, warnings = updater_status(device)

    assert status["env_copy"] == valid_index + 1
    assert status["env_flag"] == older_flag
    assert status["bootcount"] == "1"
    assert "CRC mismatch" in status["other_copy_error"]
    disk = device.board.storage.guest_disk
    assert f"copy {corrupt_index + 1} on {disk}" in warnings
    assert "is invalid" in warnings
    assert fw_printenv(device)["bootcount"] == "1"

    marked = device.check_output("mbl-update mark-good 2>/dev/null")

    assert marked == "mbl-update: slot a marked good\n"
    written = read_env_copies(device)
    assert written[valid_index] == corrupted[valid_index]
    assert crc_valid(written[corrupt_index])
    assert written[corrupt_index][4] == newer_flag
    rewritten = decode_copy(written[corrupt_index])
    assert rewritten.variables == {**ON_TRIAL, "upgrade_available": "0"}
    status = device.status()
    assert status["env_copy"] == corrupt_index + 1
    assert status["other_copy_error"] is None

    device.reboot()

    assert kernel_parameter(device, "mbl.envcopy") == COPY_NAMES[corrupt_index]
    assert device.running_slot() == "a"
    # A committed slot is not counted, so the boot writes nothing.
    assert read_env_copies(device) == written


@LAYOUTS
def test_boot_script_skips_corrupt_newest_copy(
    device: Device, corrupt_index: int, older_flag: int
) -> None:
    valid_index = 1 - corrupt_index
    newer_flag = (older_flag + 1) % 256
    corrupted = write_corrupt_newest(
        device, corrupt_index, older_flag, ON_TRIAL, COMMITTED_B
    )
    # This file keeps the system start from confirming slot a, so the only write
    # during the boot is the boot script's.
    device.check_output("touch /etc/mbl/no-auto-mark-good && sync")

    transcript = reboot_transcript(device)

    assert "mbl-boot: slot a on trial, boot 1 of 3" in transcript
    valid_name = COPY_NAMES[valid_index]
    assert f"mbl-boot: environment copy {valid_name}, booting slot a" in transcript
    assert kernel_parameter(device, "mbl.envcopy") == valid_name
    assert device.running_slot() == "a"
    written = read_env_copies(device)
    assert written[valid_index] == corrupted[valid_index]
    assert crc_valid(written[corrupt_index])
    assert written[corrupt_index][4] == newer_flag
    rewritten = decode_copy(written[corrupt_index])
    assert rewritten.variables == {**ON_TRIAL, "bootcount": "1"}
    status = device.status()
    assert status["env_copy"] == corrupt_index + 1
    assert status["bootcount"] == "1"


def test_both_env_copies_corrupt(
    device: Device, rootfs_payload: Callable[..., Path]
) -> None:
    payload = rootfs_payload()
    inactive = slot_device(device, "b")
    corrupt_env_copy(device, 0)
    corrupt_env_copy(device, 1)
    corrupted = device.env_digest()
    slot_before = partition_digest(device, inactive)

    for command in ("mbl-update status", "mbl-update status --json"):
        result = device.run(command)
        assert result.exit_status == 1, result.output
        assert "mbl-update: error: both U-Boot environment copies are invalid" in (
            result.output
        )
        assert "CRC mismatch" in result.output

    mark = device.run("mbl-update mark-good")
    assert mark.exit_status == 1, mark.output
    assert "both U-Boot environment copies are invalid" in mark.output
    assert device.env_digest() == corrupted

    install = install_without_reboot(device, payload)

    assert install.exit_status == 1, install.output
    assert "mbl-update: error: both U-Boot environment copies are invalid" in (
        install.output
    )
    assert device.env_digest() == corrupted
    assert partition_digest(device, inactive) == slot_before

    transcript = reboot_transcript(device)

    assert "mbl-boot: no valid environment copy, booting default slot a" in transcript
    assert "mbl-boot: environment copy none, booting slot a" in transcript
    assert kernel_parameter(device, "mbl.envcopy") == "none"
    assert device.running_slot() == "a"
    assert device.version() == device.images.factory_version
    assert device.env_digest() == corrupted


def test_device_status_with_corrupt_copy(device: Device) -> None:
    corrupt_env_copy(device, 1)

    status = device.status()

    assert status["env_copy"] == 1
    assert "CRC mismatch" in status["other_copy_error"]
