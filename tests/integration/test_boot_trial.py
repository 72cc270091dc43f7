"""Boot counting: an unconfirmed slot on trial is abandoned after bootlimit boots,
a confirmed slot survives any number of reboots.

The boot script counts the boots on U-Boot boards, the initramfs on boards with flag
files. Both print the same ``mbl-boot:`` messages.
"""

from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import flag_files, uses_flag_files

from mbl_sim.console import KERNEL_PANIC, UBOOT_BANNER
from mbl_sim.device import UBOOT_AUTOBOOT, Device

pytestmark = pytest.mark.qemu

FAILING_INIT = b"#!/bin/sh\necho 'broken init: exiting'\nexit 1\n"


def test_failing_init_rolls_back_after_bootlimit(
    device: Device, rootfs_payload: Callable[..., Path]
) -> None:
    payload = rootfs_payload(
        version="broken",
        files={"usr/sbin/init": FAILING_INIT},
        modes={"usr/sbin/init": 0o755},
    )
    bootlimit = device.board.boot.bootlimit
    on_device = device.deliver(payload)
    device.run(f"mbl-update install --no-reboot {on_device}", 600, check=True)

    console = device.console
    console.sendline("reboot")
    device.shell = None
    with console.allowing(KERNEL_PANIC, UBOOT_BANNER):
        for boot in range(1, bootlimit + 1):
            console.expect(rf"slot b on trial, boot {boot} of {bootlimit}", 90)
            console.expect(r"Kernel panic - not syncing: Attempted to kill init", 90)
        if device.board.firmware.is_u_boot:
            # The rollback message must come from the boot script of a new boot.
            console.expect(UBOOT_AUTOBOOT, 90)
        console.expect(
            rf"slot b did not confirm within {bootlimit} boots, rolling back to slot a",
            90,
        )
    device.wait_for_shell()

    assert device.running_slot() == "a"
    assert device.version() == device.images.factory_version
    status = device.status()
    assert status["active_slot"] == "a"
    assert status["upgrade_available"] == "0"
    assert status["rolled_back_from"] == "b"
    assert "rolled back from: b" in device.check_output("mbl-update status")
    if uses_flag_files(device):
        assert flag_files(device) == {"rolled_back_from": b"b\n"}


def test_confirmed_slot_survives_reboots(
    device: Device, rootfs_payload: Callable[..., Path]
) -> None:
    device.install(rootfs_payload(version="2.0.0"))
    bootlimit = device.board.boot.bootlimit

    status = device.status()
    assert status["active_slot"] == "b"
    assert status["upgrade_available"] == "0"
    assert status["bootcount"] == "0"

    for _ in range(bootlimit + 1):
        device.reboot()
        assert device.running_slot() == "b"
    status = device.status()
    assert status["active_slot"] == "b"
    assert status["bootcount"] == "0"
    assert status["rolled_back_from"] is None
    if uses_flag_files(device):
        assert flag_files(device) == {"rootfs2": b""}


def test_unconfirmed_slot_counts_boots(
    device: Device, rootfs_payload: Callable[..., Path]
) -> None:
    payload = rootfs_payload(
        version="on-trial", files={"etc/mbl/no-auto-mark-good": b""}
    )
    device.install(payload)
    assert device.running_slot() == "b"
    assert device.status()["bootcount"] == "1"
    if uses_flag_files(device):
        assert flag_files(device) == {"rootfs2": b"", "trial": b"b 1\n"}

    device.reboot()
    assert device.status()["bootcount"] == "2"
    if uses_flag_files(device):
        assert flag_files(device) == {"rootfs2": b"", "trial": b"b 2\n"}

    device.check_output("mbl-update mark-good")
    status = device.status()
    assert status["upgrade_available"] == "0"
    assert status["bootcount"] == "0"
    device.reboot()
    device.reboot()
    assert device.running_slot() == "b"
    assert device.status()["bootcount"] == "0"
    if uses_flag_files(device):
        assert flag_files(device) == {"rootfs2": b""}
