"""Root filesystem updates from slot a to slot b and back to slot a on one device.

The first update carries /etc/mbl/no-auto-mark-good, so slot b stays on trial after
its boot and is confirmed by hand. The second update is confirmed by the system start
of slot a, as a field device confirms a healthy slot.

On U-Boot boards the boot state is the redundant environment, which the updater flips
in one write. On boards with flag files the test reads the files themselves:
``trial`` contains ``SLOT BOOTCOUNT`` while a slot is on trial, and ``rootfs2``
exists while slot b is active.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    flag_files,
    fw_printenv,
    install_without_reboot,
    reboot_transcript,
    slot_device,
    uses_flag_files,
)

from mbl_sim.device import Device

pytestmark = pytest.mark.qemu

MARKER = "etc/mbl-sim-marker"
NO_AUTO_MARK_GOOD = "etc/mbl/no-auto-mark-good"


def expected_flags(slot: str, trial_count: int | None) -> dict[str, bytes]:
    """Return the flag files with ``slot`` active, on trial after ``trial_count``
    boots, or confirmed when ``trial_count`` is None."""
    files = {"rootfs2": b""} if slot == "b" else {}
    if trial_count is not None:
        files["trial"] = f"{slot} {trial_count}\n".encode()
    return files


def root_device(device: Device) -> str:
    """Return the block device mounted as ``/``."""
    for line in device.check_output("cat /proc/mounts").splitlines():
        fields = line.split()
        if fields[1:2] == ["/"]:
            return fields[0]
    raise AssertionError("no filesystem is mounted at /")


def install_and_check_flip(
    device: Device, payload: Path, *, slot: str, previous: str
) -> dict[str, Any]:
    """Install ``payload`` without rebooting, check that the boot state makes
    ``slot`` active on trial, and return the status."""
    before = device.status()

    result = install_without_reboot(device, payload)

    assert result.exit_status == 0, result.output
    assert f"mbl-update: active slot is now {slot}" in result.output
    status = device.status()
    assert status["running_slot"] == previous
    assert status["active_slot"] == slot
    assert status["previous_slot"] == previous
    assert status["upgrade_available"] == "1"
    assert status["bootcount"] == "0"
    if uses_flag_files(device):
        assert flag_files(device) == expected_flags(slot, 0)
    else:
        # One environment write: into the other copy's place, with the next flag.
        assert status["env_flag"] == (before["env_flag"] + 1) % 256
        assert status["env_copy"] != before["env_copy"]
    return status


def check_running_update(
    device: Device, *, slot: str, version: str, marker: bytes
) -> None:
    assert device.booted_slot == slot
    assert device.running_slot() == slot
    assert root_device(device) == slot_device(device, slot)
    if device.board.firmware.is_u_boot:
        cmdline = device.check_output("cat /proc/cmdline")
        assert f"root={slot_device(device, slot)}" in cmdline
    assert device.version() == version
    assert device.check_output(f"cat /{MARKER}") == marker.decode()


def check_environment(
    device: Device,
    *,
    slot: str,
    previous: str,
    upgrade_available: str,
    bootcount: str,
) -> None:
    status = device.status()
    assert status["running_slot"] == slot
    assert status["active_slot"] == slot
    assert status["previous_slot"] == previous
    assert status["upgrade_available"] == upgrade_available
    assert status["bootcount"] == bootcount
    if uses_flag_files(device):
        trial_count = int(bootcount) if upgrade_available == "1" else None
        assert flag_files(device) == expected_flags(slot, trial_count)
    else:
        assert status["other_copy_error"] is None
        assert fw_printenv(device) == status["environment"]


def test_update_a_to_b_to_a(
    device: Device, rootfs_payload: Callable[..., Path]
) -> None:
    version_2 = rootfs_payload(
        version="2.0.0", files={MARKER: b"update 2.0.0\n", NO_AUTO_MARK_GOOD: b""}
    )
    version_3 = rootfs_payload(version="3.0.0", files={MARKER: b"update 3.0.0\n"})
    # Written to the factory slot a. Installing 3.0.0 formats slot a, so it must go.
    stray = "/etc/mbl-sim-stray"
    device.check_output(f"echo factory > {stray}")
    # The factory environment names slot a as the previous slot. Flag files store
    # no previous slot, so the updater reports the other slot, which a rollback
    # would boot.
    factory_previous = "b" if uses_flag_files(device) else "a"
    check_environment(
        device,
        slot="a",
        previous=factory_previous,
        upgrade_available="0",
        bootcount="0",
    )

    install_and_check_flip(device, version_2, slot="b", previous="a")
    transcript = reboot_transcript(device)

    assert "mbl-boot: slot b on trial, boot 1 of 3" in transcript
    check_running_update(device, slot="b", version="2.0.0", marker=b"update 2.0.0\n")
    check_environment(
        device, slot="b", previous="a", upgrade_available="1", bootcount="1"
    )

    marked = device.check_output("mbl-update mark-good")

    assert marked == "mbl-update: slot b marked good\n"
    check_environment(
        device, slot="b", previous="a", upgrade_available="0", bootcount="0"
    )

    install_and_check_flip(device, version_3, slot="a", previous="b")
    transcript = reboot_transcript(device)

    assert "mbl-boot: slot a on trial, boot 1 of 3" in transcript
    check_running_update(device, slot="a", version="3.0.0", marker=b"update 3.0.0\n")
    check_environment(
        device, slot="a", previous="b", upgrade_available="0", bootcount="0"
    )
    assert device.run(f"test -e {stray}").exit_status == 1
    assert device.run(f"test -e /{NO_AUTO_MARK_GOOD}").exit_status == 1
