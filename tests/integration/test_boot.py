"""Boot a device to its shell through U-Boot (or QEMU's direct kernel load on boards
without U-Boot) and the initramfs."""

import pytest

from mbl_sim.device import Device

pytestmark = pytest.mark.qemu


def test_boot_reaches_shell_on_slot_a(device: Device) -> None:
    assert device.booted_slot == "a"
    assert device.running_slot() == "a"
    assert device.version() == device.images.factory_version
    assert device.run("true").exit_status == 0
    assert device.run("false").exit_status == 1
