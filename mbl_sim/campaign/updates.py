"""The updates a campaign can record: the payload, what to install before the
recording starts, and the command that installs the payload.

The root filesystem updates write a payload of the device's own root filesystem,
with a new version and a marker file, into the inactive slot. The application
update first installs two applications at 1.0.0, then records their update to
2.0.0 in one payload. Every update leaves the device running without a reboot.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mbl_sim.device import Device
from mbl_sim.errors import ConfigError, UpdateFailedError
from mbl_sim.images.cache import default_cache_dir
from mbl_sim.images.recipe import DeviceImages
from mbl_sim.ipk import ShellApp, build_shell_app_payload
from mbl_sim.payloads import RootfsChange, cached_rootfs_payload

__all__ = ["UPDATES", "UpdateScenario", "resolve_update", "update_names"]

NEW_VERSION = "2.0.0"
MARKER_PATH = "etc/mbl-sim-campaign"
MARKER = b"written by the crash-state campaign's update\n"
FAULTY_SCRIPT = Path(__file__).with_name("flip_before_sync.py")
APPS_BEFORE = (ShellApp("alpha", "1.0.0"), ShellApp("beta", "1.0.0"))
APPS_AFTER = (ShellApp("alpha", "2.0.0"), ShellApp("beta", "2.0.0"))
INSTALL_TIMEOUT = 600.0


def _rootfs_payload(images: DeviceImages, directory: Path) -> Path:
    change = RootfsChange(version=NEW_VERSION, files={MARKER_PATH: MARKER})
    return cached_rootfs_payload(images.rootfs, default_cache_dir(), change)


def _apps_payload(images: DeviceImages, directory: Path) -> Path:
    return build_shell_app_payload(APPS_AFTER, directory / "apps-after.tar")


def _install_apps_before(device: Device, directory: Path) -> None:
    payload = build_shell_app_payload(APPS_BEFORE, directory / "apps-before.tar")
    on_device = device.deliver(payload)
    command = f"mbl-update install {shlex.quote(on_device)}"
    result = device.run(command, INSTALL_TIMEOUT)
    if result.exit_status != 0:
        raise UpdateFailedError(
            f"installing the applications before the recording: {command!r} exited"
            f" with status {result.exit_status}:\n{result.output}"
        )


def _install_with_updater(device: Device, payload: str) -> str:
    return f"mbl-update install --no-reboot {shlex.quote(payload)}"


def _install_apps(device: Device, payload: str) -> str:
    return f"mbl-update install {shlex.quote(payload)}"


def _install_flip_before_sync(device: Device, payload: str) -> str:
    script = device.deliver(FAULTY_SCRIPT)
    return f"python3 {shlex.quote(script)} {shlex.quote(payload)}"


@dataclass(frozen=True)
class UpdateScenario:
    """One update to record.

    Attributes:
        name: the name on the command line.
        description: one line for reports.
        payload: builds the payload for a device's images, in a scratch directory.
        command: returns the shell command that installs the payload at the given
            path on the device; it may deliver more files first.
        prepare: installs what the update changes, before the recording starts.
        writes_slot: whether the update writes the inactive slot and flips to it.
        faulty: whether the update is wrong on purpose, so a campaign over it
            is expected to find bad states.
        version: the root filesystem version the update installs.
    """

    name: str
    description: str
    payload: Callable[[DeviceImages, Path], Path]
    command: Callable[[Device, str], str]
    prepare: Callable[[Device, Path], None] | None = None
    writes_slot: bool = True
    faulty: bool = False
    version: str = NEW_VERSION


UPDATES: dict[str, UpdateScenario] = {
    update.name: update
    for update in (
        UpdateScenario(
            "rootfs",
            "root filesystem update with mbl-update install",
            _rootfs_payload,
            _install_with_updater,
        ),
        UpdateScenario(
            "rootfs-flip-before-sync",
            "faulty root filesystem update that flips the slot before syncing",
            _rootfs_payload,
            _install_flip_before_sync,
            faulty=True,
        ),
        UpdateScenario(
            "apps",
            "update of two applications from 1.0.0 to 2.0.0 in one payload",
            _apps_payload,
            _install_apps,
            prepare=_install_apps_before,
            writes_slot=False,
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
