"""A/B slot state on top of the U-Boot environment.

The boot script passes ``mbl.slot=a|b`` on the kernel command line, so the running slot
is read from /proc/cmdline. The environment variables of the boot policy are
``active_slot``, ``previous_slot``, ``upgrade_available``, ``bootcount`` and
``bootlimit`` (see docs/design.md). Every change to them is one environment write,
so a power cut leaves either the old or the new set of values.

Boards without U-Boot keep the same state in flag files (`updater.flagfile`).
``boot_store`` returns the store that device.json names, and ``flip_to``,
``mark_good``, ``read_status``, ``read_boot_variables`` and ``store_running_slot``
take either kind.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from updater import flagfile
from updater.bootenv import (
    BootEnv,
    EnvLocation,
    load_fw_env_config,
    read_env,
    update_env,
)
from updater.config import SLOT_NAMES, DeviceConfig
from updater.errors import SlotError

log = logging.getLogger(__name__)

PROC_CMDLINE = "/proc/cmdline"
CMDLINE_SLOT_KEY = "mbl.slot"

ACTIVE_SLOT = "active_slot"
PREVIOUS_SLOT = "previous_slot"
UPGRADE_AVAILABLE = "upgrade_available"
BOOTCOUNT = "bootcount"
BOOTLIMIT = "bootlimit"
ROLLED_BACK_FROM = "rolled_back_from"

FILESYSTEM_LABELS = {"a": "rootfs1", "b": "rootfs2"}
"""ext4 label of each slot's filesystem: the slot's partition name in the GPT."""

BootStore = Sequence[EnvLocation] | flagfile.FlagFiles
"""Location of the boot state: the two environment copies, or the flag files."""


def boot_store(config: DeviceConfig) -> BootStore:
    """Return the boot state store that ``config`` names.

    Raises:
        ConfigError: fw_env.config cannot be read or is invalid.
    """
    if config.boot_state == "flag-files":
        return flagfile.FlagFiles(
            config.flag_dir, config.slots, config.bootlimit, mount_point=True
        )
    return load_fw_env_config(config.fw_env_config)


def read_boot_variables(store: BootStore) -> dict[str, str]:
    """Return the boot policy variables of either store.

    Raises:
        BootEnvError, SlotError: the state cannot be read.
    """
    if isinstance(store, flagfile.FlagFiles):
        return flagfile.read_flags(store).variables
    return dict(read_env(store).variables)


def store_running_slot(store: BootStore, cmdline_path: str = PROC_CMDLINE) -> str:
    """Return the running slot: ``mbl.slot=`` with U-Boot, the root device else.

    Raises:
        SlotError: the running slot is unknown.
    """
    if isinstance(store, flagfile.FlagFiles):
        return flagfile.running_slot(store)
    return read_running_slot(cmdline_path)


@dataclass(frozen=True)
class SlotStatus:
    """Summary for ``mbl-update status``.

    Environment values are the raw strings, or None when the variable is not set.

    Attributes:
        running_slot: slot named by ``mbl.slot`` on the kernel command line, or None.
        active_slot: slot the boot script boots next.
        previous_slot: slot to roll back to.
        upgrade_available: ``1`` while a freshly installed slot is on trial.
        bootcount: boots since the trial began.
        bootlimit: boots allowed on trial.
        rolled_back_from: slot that the boot script abandoned because it did not
            confirm within ``bootlimit`` boots; cleared by the next update.
        env_copy: number (1 or 2) of the current environment copy.
        env_location: where the current copy is stored.
        env_flag: flag byte of the current copy.
        other_copy_error: why the other copy is invalid, or None if it is valid.
        environment: all variables of the current copy.
        store: ``u-boot-env``, or ``flag-files``, where the environment fields
            describe the flag directory and ``environment`` the flags as variables.
    """

    running_slot: str | None
    active_slot: str | None
    previous_slot: str | None
    upgrade_available: str | None
    bootcount: str | None
    bootlimit: str | None
    rolled_back_from: str | None
    env_copy: int
    env_location: EnvLocation
    env_flag: int
    other_copy_error: str | None
    environment: dict[str, str]
    store: str = "u-boot-env"


def parse_running_slot(cmdline: str, source: str = PROC_CMDLINE) -> str:
    """Return the slot of ``mbl.slot=`` in a kernel command line.

    The last occurrence wins, as for kernel parameters handled by init.

    Raises:
        SlotError: the parameter is missing or its value is not ``a`` or ``b``.
    """
    values = [
        word.partition("=")[2]
        for word in cmdline.split()
        if word.partition("=")[0] == CMDLINE_SLOT_KEY
    ]
    if not values:
        raise SlotError(
            f"{source} has no {CMDLINE_SLOT_KEY}= parameter, so the running slot is"
            " unknown; the boot script must pass mbl.slot=a or mbl.slot=b"
        )
    slot = values[-1]
    _check_slot(slot, f"{CMDLINE_SLOT_KEY} in {source}")
    return slot


def read_running_slot(path: str = PROC_CMDLINE) -> str:
    """Read the running slot from the kernel command line file ``path``.

    Raises:
        SlotError: the file cannot be read, or as `parse_running_slot`.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            cmdline = file.read()
    except OSError as exc:
        raise SlotError(f"cannot read the kernel command line {path}: {exc}") from exc
    return parse_running_slot(cmdline, path)


def other_slot(slot: str) -> str:
    """Return the slot that is not ``slot``.

    Raises:
        SlotError: ``slot`` is not ``a`` or ``b``.
    """
    _check_slot(slot, "slot")
    return SLOT_NAMES[1 - SLOT_NAMES.index(slot)]


def flip_to(
    locations: BootStore, slot: str, previous: str
) -> BootEnv | flagfile.FlagState:
    """Make ``slot`` the active slot on trial, with ``previous`` as the fallback.

    Sets ``active_slot``, ``previous_slot``, ``upgrade_available=1`` and
    ``bootcount=0`` in one environment write and keeps all other variables.

    Raises:
        SlotError: a slot is not ``a`` or ``b``, or both are the same.
        BootEnvCorruptError: both environment copies are invalid; nothing is written.
        BootEnvError: the write failed.
    """
    if isinstance(locations, flagfile.FlagFiles):
        return flagfile.flip_to(locations, slot, previous)
    _check_slot(slot, "new active slot")
    _check_slot(previous, "previous slot")
    if slot == previous:
        raise SlotError(
            f"cannot switch to slot {slot!r}: it is also the previous slot; the new"
            " root filesystem must be in the slot that is not running"
        )
    env = update_env(
        locations,
        {
            ACTIVE_SLOT: slot,
            PREVIOUS_SLOT: previous,
            UPGRADE_AVAILABLE: "1",
            BOOTCOUNT: "0",
            ROLLED_BACK_FROM: None,
        },
    )
    log.info("active slot is now %s (previous %s, on trial)", slot, previous)
    return env


def mark_good(locations: BootStore, running_slot: str) -> BootEnv | flagfile.FlagState:
    """End the trial of the running slot: set ``upgrade_available=0``, ``bootcount=0``.

    Both go out in one write. Nothing is written when both already have these
    values, to spare the storage.

    Raises:
        SlotError: ``running_slot`` is not the environment's ``active_slot``. Marking
            then would confirm a slot that has not booted, for example after an
            install without a reboot, and remove the rollback for it.
        BootEnvCorruptError: both environment copies are invalid; nothing is written.
        BootEnvError: the write failed.
    """
    if isinstance(locations, flagfile.FlagFiles):
        return flagfile.mark_good(locations, running_slot)
    current = read_env(locations)
    active = current.variables.get(ACTIVE_SLOT)
    if active != running_slot:
        raise SlotError(
            f"running slot {running_slot!r} is not the active slot {active!r} in the"
            " U-Boot environment; reboot into the active slot before marking it good"
        )
    if (
        current.variables.get(UPGRADE_AVAILABLE) == "0"
        and current.variables.get(BOOTCOUNT) == "0"
    ):
        log.info("slot already marked good; environment unchanged")
        return current
    env = update_env(locations, {UPGRADE_AVAILABLE: "0", BOOTCOUNT: "0"})
    log.info("marked slot %s good", env.variables.get(ACTIVE_SLOT))
    return env


def read_status(locations: BootStore, cmdline_path: str = PROC_CMDLINE) -> SlotStatus:
    """Collect the running slot and the boot policy variables.

    A missing or invalid ``mbl.slot`` is logged and reported as None.

    Raises:
        BootEnvCorruptError: both environment copies are invalid.
        BootEnvError: the environment cannot be read.
    """
    if isinstance(locations, flagfile.FlagFiles):
        return _flag_status(locations)
    env = read_env(locations)
    try:
        running: str | None = read_running_slot(cmdline_path)
    except SlotError as exc:
        log.warning("%s", exc)
        running = None
    return _status_from(
        env.variables,
        running,
        env_copy=env.current + 1,
        env_location=env.current_location,
        env_flag=env.flag,
        other_copy_error=env.other_copy_error,
    )


def _flag_status(flags: flagfile.FlagFiles) -> SlotStatus:
    """Return the status of flag files, with the environment fields describing the
    flag directory: copy 1, flag 0, no other copy."""
    state = flagfile.read_flags(flags)
    try:
        running: str | None = flagfile.running_slot(flags)
    except SlotError as exc:
        log.warning("%s", exc)
        running = None
    return _status_from(
        state.variables,
        running,
        env_copy=1,
        env_location=EnvLocation(flags.directory, 0, 0),
        env_flag=0,
        other_copy_error=None,
        store="flag-files",
    )


def _status_from(
    variables: Mapping[str, str],
    running: str | None,
    *,
    env_copy: int,
    env_location: EnvLocation,
    env_flag: int,
    other_copy_error: str | None,
    store: str = "u-boot-env",
) -> SlotStatus:
    """Return the status of the boot policy variables of either boot-state store."""
    return SlotStatus(
        running_slot=running,
        active_slot=variables.get(ACTIVE_SLOT),
        previous_slot=variables.get(PREVIOUS_SLOT),
        upgrade_available=variables.get(UPGRADE_AVAILABLE),
        bootcount=variables.get(BOOTCOUNT),
        bootlimit=variables.get(BOOTLIMIT),
        rolled_back_from=variables.get(ROLLED_BACK_FROM),
        env_copy=env_copy,
        env_location=env_location,
        env_flag=env_flag,
        other_copy_error=other_copy_error,
        environment=dict(variables),
        store=store,
    )


def _check_slot(slot: str, what: str) -> None:
    if slot not in SLOT_NAMES:
        raise SlotError(
            f"invalid {what} {slot!r}; expected one of {', '.join(SLOT_NAMES)}"
        )
