"""Crash states of U-Boot's own ``saveenv`` on a board that keeps the environment
as the file ``uboot.env`` on the FAT boot partition.

The recording stops a device at its U-Boot prompt with the storage model attached,
saves the environment once with ``mbl_certify=1`` (the old state), then again with
``mbl_certify=2`` (the new state), and keeps the write log of the second save. Every
prefix of that log is a crash state: the card has no write cache, so each completed
write is on the medium and a cut loses only what had not completed.

For each state the boot partition is cut out of the disk, ``uboot.env`` is read
with mtools and decoded in U-Boot's single-copy layout, and ``fsck.fat -n`` checks
the filesystem. A state is ``old`` or ``new`` when the file decodes with that
marker, and ``lost`` otherwise: U-Boot then falls back to its built-in environment,
and every saved variable is gone.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mbl_sim.campaign.ext4 import run_tool
from mbl_sim.device import BOOT_TIMEOUT, Device
from mbl_sim.errors import ConfigError
from mbl_sim.images.recipe import DeviceImages
from mbl_sim.storage import CrashState, WriteLog, materialise
from updater.bootenv import decode_single_copy
from updater.errors import BootEnvError

__all__ = [
    "MARKER",
    "FatEnvResult",
    "FatEnvState",
    "check_saveenv_states",
    "record_saveenv",
    "saveenv_campaign",
]

log = logging.getLogger(__name__)

MARKER = "mbl_certify"
"""The variable whose value (1 before, 2 after) distinguishes the two saves."""

ENV_FILE = "uboot.env"
BOOT_PARTITION = "boot"


@dataclass(frozen=True)
class FatEnvState:
    """One crash state of the save.

    Attributes:
        label: the state's label, ``p12`` for a cut after 12 log entries.
        verdict: ``old``, ``new`` or ``lost``.
        detail: why a lost state is lost, or the marker's value.
        fat_clean: whether ``fsck.fat -n`` found the filesystem clean.
    """

    label: str
    verdict: str
    detail: str
    fat_clean: bool


@dataclass(frozen=True)
class FatEnvResult:
    """The crash states of one ``saveenv``.

    Attributes:
        writes: writes the save made, as the card logged them (512 bytes each).
        states: every state, from a cut before the first write to after the last.
        saved: what U-Boot printed for the save.
    """

    writes: int
    states: tuple[FatEnvState, ...]
    saved: str

    def count(self, verdict: str) -> int:
        """Return the number of states with ``verdict``."""
        return Counter(state.verdict for state in self.states)[verdict]

    @property
    def damaged_fat(self) -> list[FatEnvState]:
        """The states whose filesystem ``fsck.fat -n`` finds damaged."""
        return [state for state in self.states if not state.fat_clean]

    def describe(self) -> str:
        """Return a paragraph for a report: the counts and the lost states."""
        states = self.states
        lost = [state for state in states if state.verdict == "lost"]
        text = (
            f"One saveenv made {self.writes} writes of 512 bytes. An SD card keeps a"
            " write once it completes, so its crash states are the cuts after each"
            f" log entry, {states[0].label} to {states[-1].label}:"
            f" {self.count('old')} of the {len(states)} states keep the old"
            f" environment, {self.count('new')} have the new one and {len(lost)}"
            " have none"
        )
        if lost:
            labels = ", ".join(state.label for state in lost[:8])
            more = "" if len(lost) <= 8 else f" and {len(lost) - 8} more"
            text += (
                f" ({labels}{more}: {lost[0].detail}), so U-Boot would start with its"
                " built-in environment"
            )
        damaged = self.damaged_fat
        if damaged:
            text += (
                f". fsck.fat -n finds the FAT damaged in {len(damaged)} states, the"
                f" first {damaged[0].label}"
            )
        else:
            text += ". fsck.fat -n finds the FAT clean in all of them"
        return text + "."


def record_saveenv(
    images: DeviceImages,
    workdir: Path,
    *,
    timeout: float = BOOT_TIMEOUT,
) -> tuple[Path, WriteLog, str]:
    """Boot a device to U-Boot, save the environment twice and return the raw disk
    before the second save, the log of its writes, and what it printed.

    Raises:
        ConfigError: the board runs no U-Boot, or saveenv did not report writing.
        QemuLaunchError, ConsoleTimeoutError, ConsoleAbortError: the boot failed.
    """
    if not images.board.firmware.is_u_boot:
        raise ConfigError(f"board {images.board.name} runs no U-Boot to save from")
    with Device(images, workdir / "device", name="saveenv") as device:
        model = device.attach_storage_model()
        device.power_on(wait="uboot", timeout=timeout)
        machine = device.machine
        assert machine is not None
        device.uboot(f"setenv {MARKER} 1")
        _save(device)
        device.uboot(f"setenv {MARKER} 2")
        start = model.settle(machine)
        saved = _save(device)
        end = model.settle(machine)
        window = model.export_window(
            start, end, workdir / "before.raw", workdir / "saveenv.log"
        )
    return workdir / "before.raw", window, saved


def _save(device: Device) -> str:
    saved = device.uboot("saveenv")
    if "OK" not in saved:
        raise ConfigError(f"saveenv did not report success: {saved.strip()!r}")
    return saved.strip()


def check_saveenv_states(
    images: DeviceImages, base: Path, window: WriteLog, scratch: Path
) -> list[FatEnvState]:
    """Return the verdict of every crash state of the save in ``window``.

    Raises:
        ConfigError: the board has no boot partition, or mtools or dosfstools is
            missing.
    """
    layout = images.board.storage.layout
    if BOOT_PARTITION not in {partition.name for partition in layout}:
        raise ConfigError(
            f"board {images.board.name} has no {BOOT_PARTITION} partition"
        )
    for tool, package in (("mcopy", "mtools"), ("fsck.fat", "dosfstools")):
        if shutil.which(tool) is None:
            raise ConfigError(f"{tool} not found; install the Debian package {package}")
    partition = layout[BOOT_PARTITION]
    scratch.mkdir(parents=True, exist_ok=True)
    image = scratch / "boot.img"
    states = []
    for point in range(len(window) + 1):
        state = CrashState(point)
        image.unlink(missing_ok=True)
        materialise(
            base, window, state, image, offset=partition.start, length=partition.size
        )
        verdict, detail = _read_env_file(image, scratch / ENV_FILE)
        states.append(FatEnvState(state.label(), verdict, detail, _fat_clean(image)))
    image.unlink(missing_ok=True)
    return states


def _read_env_file(image: Path, output: Path) -> tuple[str, str]:
    output.unlink(missing_ok=True)
    code, message = run_tool(
        ["mcopy", "-n", "-i", image, f"::{ENV_FILE}", output],
        package="mtools",
        environment={"MTOOLS_SKIP_CHECK": "1"},
    )
    if code != 0 or not output.exists():
        return "lost", f"{ENV_FILE} unreadable: {message.strip()[:80]}"
    try:
        variables = decode_single_copy(output.read_bytes())
    except BootEnvError as error:
        return "lost", str(error)
    value = variables.get(MARKER)
    if value == "1":
        return "old", f"{MARKER}=1"
    if value == "2":
        return "new", f"{MARKER}=2"
    return "lost", f"{MARKER} is {value!r}"


def _fat_clean(image: Path) -> bool:
    code, _output = run_tool(["fsck.fat", "-n", image], package="dosfstools")
    return code == 0


def saveenv_campaign(
    images: DeviceImages, workdir: Path, *, timeout: float = BOOT_TIMEOUT
) -> FatEnvResult:
    """Record one ``saveenv`` and check all of its crash states."""
    base, window, saved = record_saveenv(images, workdir, timeout=timeout)
    states = check_saveenv_states(images, base, window, workdir / "scratch")
    base.unlink(missing_ok=True)
    writes = sum(entry.is_write for entry in window.entries)
    log.info("saveenv crash states: %d writes, %d states", writes, len(states))
    return FatEnvResult(writes, tuple(states), saved)
