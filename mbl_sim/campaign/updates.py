"""The updates a campaign can record: what to deliver and which command installs it.

Each update writes a root filesystem payload of the device's own root filesystem
with a new version and a marker file into the inactive slot, and leaves the device
running without a reboot.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mbl_sim.device import Device
from mbl_sim.errors import ConfigError

__all__ = ["UPDATES", "UpdateScenario", "resolve_update", "update_names"]

NEW_VERSION = "2.0.0"
MARKER_PATH = "etc/mbl-sim-campaign"
MARKER = b"written by the crash-state campaign's update\n"
FAULTY_SCRIPT = Path(__file__).with_name("flip_before_sync.py")


def _install_with_updater(device: Device, payload: str) -> str:
    return f"mbl-update install --no-reboot {shlex.quote(payload)}"


def _install_flip_before_sync(device: Device, payload: str) -> str:
    script = device.deliver(FAULTY_SCRIPT)
    return f"python3 {shlex.quote(script)} {shlex.quote(payload)}"


@dataclass(frozen=True)
class UpdateScenario:
    """One update to record.

    Attributes:
        name: the name on the command line.
        description: one line for reports.
        command: returns the shell command that installs the payload at the given
            path on the device; it may deliver more files first.
        faulty: whether the update is wrong on purpose, so a campaign over it
            is expected to find bad states.
    """

    name: str
    description: str
    command: Callable[[Device, str], str]
    faulty: bool = False
    version: str = NEW_VERSION


UPDATES: dict[str, UpdateScenario] = {
    update.name: update
    for update in (
        UpdateScenario(
            "rootfs",
            "root filesystem update with mbl-update install",
            _install_with_updater,
        ),
        UpdateScenario(
            "rootfs-flip-before-sync",
            "faulty root filesystem update that flips the slot before syncing",
            _install_flip_before_sync,
            faulty=True,
        ),
    )
}


def update_names() -> list[str]:
    """Return the names of the updates, sorted."""
    return sorted(UPDATES)


def resolve_update(name: str) -> UpdateScenario:
    """Return the update called ``name``.

    Raises:
        ConfigError: no update has that name; the message lists the known ones.
    """
    try:
        return UPDATES[name]
    except KeyError:
        raise ConfigError(
            f"unknown campaign scenario {name!r}; known: {', '.join(update_names())}"
        ) from None
