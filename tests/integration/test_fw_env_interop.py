"""The updater and libubootenv's fw_printenv/fw_setenv share the environment through
the same /etc/fw_env.config, and the boot script reads what either one writes.

Boards with flag files have no environment. test_flag_files.py checks the same
agreement between the shell, the updater and the initramfs there.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import fw_printenv, install_without_reboot, kernel_parameter

from mbl_sim.device import Device

pytestmark = [pytest.mark.qemu, pytest.mark.needs("u-boot-env")]

# A value with a blank and an "=" checks that both sides split only at the first "=".
NOTE_VALUE = "two words=x"


def updater_set_env(device: Device, changes: dict[str, str]) -> None:
    """Write ``changes`` with the updater's own environment code on the device."""
    script = (
        "from updater.bootenv import load_fw_env_config, update_env; "
        f"update_env(load_fw_env_config('/etc/fw_env.config'), {changes!r})"
    )
    device.check_output(f"python3 -c {shlex.quote(script)}")


def test_fw_printenv_reads_updater_write(device: Device) -> None:
    before = device.status()

    updater_set_env(device, {"mbl_sim_note": NOTE_VALUE, "mbl_sim_empty": ""})

    after = device.status()
    assert after["env_flag"] == (before["env_flag"] + 1) % 256
    assert after["env_copy"] != before["env_copy"]
    assert device.check_output("fw_printenv -n mbl_sim_note") == NOTE_VALUE + "\n"
    assert device.check_output("fw_printenv mbl_sim_empty") == "mbl_sim_empty=\n"
    environment = fw_printenv(device)
    assert environment == after["environment"]
    assert environment["active_slot"] == "a"


def test_updater_reads_fw_setenv_write(device: Device) -> None:
    updater_set_env(device, {"mbl_sim_note": "set by the updater"})
    before = device.status()

    device.check_output(f"fw_setenv mbl_sim_note {shlex.quote(NOTE_VALUE)}")

    after = device.status()
    assert after["environment"]["mbl_sim_note"] == NOTE_VALUE
    assert after["env_flag"] == (before["env_flag"] + 1) % 256
    assert after["env_copy"] != before["env_copy"]
    assert after["other_copy_error"] is None

    # fw_setenv with a name and no value deletes the variable.
    device.check_output("fw_setenv mbl_sim_note")

    deleted = device.status()
    assert "mbl_sim_note" not in deleted["environment"]
    assert deleted["env_flag"] == (after["env_flag"] + 1) % 256
    assert deleted["environment"]["active_slot"] == "a"
    assert deleted["environment"] == fw_printenv(device)


def test_boot_script_follows_fw_setenv(
    device: Device, rootfs_payload: Callable[..., Path]
) -> None:
    payload = rootfs_payload(version="2.0.0")
    installed = install_without_reboot(device, payload)
    assert installed.exit_status == 0, installed.output
    assert fw_printenv(device)["active_slot"] == "b"

    device.check_output("fw_setenv active_slot a")
    device.reboot()

    assert device.running_slot() == "a"
    assert device.version() == device.images.factory_version
    assert device.status()["active_slot"] == "a"

    device.check_output("fw_setenv active_slot b")
    device.reboot()

    assert device.running_slot() == "b"
    assert kernel_parameter(device, "mbl.slot") == "b"
    assert device.version() == "2.0.0"
