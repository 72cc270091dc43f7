"""Boot checks: power a crash state on and see where the device comes up.

The state's disk is attached through a qcow2 overlay, so booting does not change
it. U-Boot's countdown is skipped at every start, and a reset (the initramfs
reboots when it cannot mount its root, the boot script may roll back) counts as
one more boot; on a board without a boot loader, each kernel start counts. The
state is good when the device reaches its shell within ``max_boots`` boots on a
slot that runs the version expected of that slot.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mbl_sim.console import UBOOT_BANNER
from mbl_sim.device import SYSTEM_READY, UBOOT_AUTOBOOT, Device
from mbl_sim.errors import MblSimError
from mbl_sim.images.recipe import DeviceImages
from mbl_sim.machine import create_overlay

__all__ = ["BOOT_TIMEOUT", "BootResult", "boot_state"]

log = logging.getLogger(__name__)

# Device.SYSTEM_READY ends at the version's last non-blank character, so it can
# match before the whole version has arrived. The line end makes the match whole.
SYSTEM_READY_LINE = SYSTEM_READY + r"\r?\n"

KERNEL_START = r"Booting Linux on physical CPU"
"""The kernel's first line, which starts each boot of a board without a boot
loader (QEMU loads the kernel again at every reset)."""

BOOT_TIMEOUT = 90.0
"""Seconds to wait for each step of a boot: U-Boot's countdown, then the shell.
A boot took 3 to 8 s with TCG on a 2-core host; the rest is margin for a loaded
host."""


@dataclass
class BootResult:
    """The outcome of booting one state.

    Attributes:
        problems: what went wrong; empty for a good state.
        slot: the slot that reached the shell, or None.
        version: the version it runs, or None.
        boots: U-Boot (or kernel) starts seen; more than 1 means a failed boot or
            a rollback.
        seconds: how long the check took.
        transcript: the console transcript.
    """

    problems: list[str] = field(default_factory=list)
    slot: str | None = None
    version: str | None = None
    boots: int = 0
    seconds: float = 0.0
    transcript: Path | None = None

    def describe(self) -> str:
        """Return ``slot b, version 2.0.0 after 1 boot`` or the first problem."""
        if self.slot is None:
            return self.problems[0] if self.problems else "not booted"
        plural = "boot" if self.boots == 1 else "boots"
        return f"slot {self.slot}, version {self.version} after {self.boots} {plural}"


def _boot_to_shell(
    device: Device, result: BootResult, max_boots: int, timeout: float
) -> None:
    console = device.console
    uboot = device.board.firmware.is_u_boot
    start = UBOOT_AUTOBOOT if uboot else KERNEL_START
    with console.allowing(UBOOT_BANNER):
        while True:
            match = console.expect([start, SYSTEM_READY_LINE], timeout)
            if match.index == 1:
                result.slot = match.match.group("slot")
                result.version = match.match.group("version")
                return
            result.boots += 1
            if result.boots > max_boots:
                result.problems.append(f"no shell after {max_boots} boots")
                return
            if uboot:
                console.send(" ")
                console.expect(re.escape(device.board.firmware.prompt), timeout)
                console.sendline("boot")


def boot_state(
    images: DeviceImages,
    disk: Path,
    workdir: Path,
    expected: Mapping[str, str],
    *,
    max_boots: int,
    timeout: float = BOOT_TIMEOUT,
) -> BootResult:
    """Boot the raw disk image ``disk`` and check where the device comes up.

    ``expected`` maps each slot to the version it must run. ``workdir`` gets the
    overlay and the console transcript.
    """
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    create_overlay(disk, workdir / "emmc.qcow2")
    device = Device(images, workdir, name="crash-state")
    result = BootResult(transcript=workdir / "console.log")
    try:
        device.power_on(wait="none", timeout=timeout)
        _boot_to_shell(device, result, max_boots, timeout)
    except MblSimError as error:
        first_line = str(error).splitlines()[0]
        result.problems.append(f"boot {max(result.boots, 1)}: {first_line}")
    finally:
        device.close()
    if result.slot is not None and expected.get(result.slot) != result.version:
        result.problems.append(
            f"booted slot {result.slot} runs version {result.version!r}, expected"
            f" {expected.get(result.slot)!r}"
        )
    result.seconds = time.monotonic() - started
    return result
