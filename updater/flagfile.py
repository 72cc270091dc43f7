"""A/B boot state as flag files, for boards whose boot loader keeps no environment.

On such boards QEMU (or a ROM loader) starts the kernel directly and the initramfs
applies the boot policy (images/initramfs/init). The state lives in a few files on a
small ext4 partition (``bootflags``), mounted at ``flag_dir`` from device.json:

``rootfs2``
    present: slot ``b`` is active; absent: slot ``a``.
``trial``
    ``SLOT BOOTCOUNT``: SLOT is on trial after an update and has booted BOOTCOUNT
    times. The initramfs raises the count at every boot and rolls back to the other
    slot past ``bootlimit``. A trial of a slot that is not active is stale and ignored.
``rolled_back_from``
    ``SLOT``: the slot that the initramfs abandoned; removed by the next update.

Every change is one durable file operation: temporary file, fsync, rename and fsync
of the directory, or unlink and fsync of the directory (see `updater.durable`).
``flip_to`` writes the trial first and changes ``rootfs2``, which switches the active
slot, last. So a power cut between any two steps leaves the old state or the new one.

The running slot is the slot whose partition is mounted as ``/``, because no boot
loader passes ``mbl.slot=`` on the kernel command line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from updater.config import SLOT_NAMES
from updater.durable import remove_durably, write_atomically
from updater.errors import SlotError

log = logging.getLogger(__name__)

ROOTFS2 = "rootfs2"
TRIAL = "trial"
ROLLED_BACK_FROM = "rolled_back_from"


@dataclass(frozen=True)
class FlagFiles:
    """Location of the flag files and the slot devices they refer to.

    Attributes:
        directory: the mounted bootflags partition.
        slot_devices: block device of each slot, keyed by ``a`` and ``b``.
        bootlimit: boots allowed on trial, as the initramfs applies it.
        mount_point: ``directory`` must be a mount point, as on a device, where an
            unmounted bootflags partition leaves an empty directory of the root
            filesystem that the initramfs never reads.
    """

    directory: str
    slot_devices: Mapping[str, str]
    bootlimit: int
    mount_point: bool = False

    def path(self, name: str) -> str:
        """Return the path of the flag file ``name``."""
        return os.path.join(self.directory, name)


@dataclass(frozen=True)
class FlagState:
    """The boot state that the flag files encode.

    Attributes:
        active_slot: the slot the initramfs boots next.
        trial_slot: the slot on trial, or None; a stale trial is reported as None.
        bootcount: boots since the trial began; 0 without a trial.
        rolled_back_from: the slot the initramfs abandoned, or None.
        stale_trial: a trial file names a slot that is not active.
        bootlimit: boots allowed on trial.
    """

    active_slot: str
    trial_slot: str | None
    bootcount: int
    rolled_back_from: str | None
    stale_trial: bool
    bootlimit: int

    @property
    def variables(self) -> dict[str, str]:
        """The state in the U-Boot environment's variable names (docs/design.md)."""
        variables = {
            "active_slot": self.active_slot,
            "previous_slot": _other(self.active_slot),
            "upgrade_available": "1" if self.trial_slot else "0",
            "bootcount": str(self.bootcount),
            "bootlimit": str(self.bootlimit),
        }
        if self.rolled_back_from is not None:
            variables["rolled_back_from"] = self.rolled_back_from
        return variables


def _other(slot: str) -> str:
    return SLOT_NAMES[1 - SLOT_NAMES.index(slot)]


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SlotError(f"cannot read flag file {path}: {exc}") from exc


def _check_directory(flags: FlagFiles) -> None:
    if not os.path.isdir(flags.directory):
        raise SlotError(
            f"flag directory {flags.directory} not found; the bootflags partition"
            " must be mounted there (see /etc/fstab)"
        )
    if flags.mount_point and not os.path.ismount(flags.directory):
        raise SlotError(
            f"flag directory {flags.directory} is not a mount point; mount the"
            " bootflags partition there (see /etc/fstab): the initramfs reads the"
            " flag files from that partition only"
        )


def read_flags(flags: FlagFiles) -> FlagState:
    """Read the flag files.

    Raises:
        SlotError: the directory is missing (the bootflags partition is not mounted)
            or a file cannot be read.
    """
    _check_directory(flags)
    active = "b" if os.path.lexists(flags.path(ROOTFS2)) else "a"
    trial_slot, bootcount, stale = _parse_trial(flags, active)
    rolled = (_read_text(flags.path(ROLLED_BACK_FROM)) or "").strip() or None
    if rolled is not None and rolled not in SLOT_NAMES:
        log.warning(
            "ignoring %s: invalid slot %r", flags.path(ROLLED_BACK_FROM), rolled
        )
        rolled = None
    return FlagState(
        active_slot=active,
        trial_slot=trial_slot,
        bootcount=bootcount,
        rolled_back_from=rolled,
        stale_trial=stale,
        bootlimit=flags.bootlimit,
    )


def _parse_trial(flags: FlagFiles, active: str) -> tuple[str | None, int, bool]:
    text = _read_text(flags.path(TRIAL))
    if text is None:
        return None, 0, False
    fields = text.split()
    slot = fields[0] if fields else ""
    count = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0
    if slot != active:
        log.info("trial file names slot %r, but slot %s is active: stale", slot, active)
        return None, 0, True
    return slot, count, False


def _activate(flags: FlagFiles, slot: str) -> None:
    if slot == "b":
        write_atomically(flags.path(ROOTFS2), b"")
    else:
        remove_durably(flags.path(ROOTFS2))


def flip_to(flags: FlagFiles, slot: str, previous: str) -> FlagState:
    """Make ``slot`` the active slot on trial, with ``previous`` as the fallback.

    Steps, each durable before the next: remove ``rolled_back_from``, write
    ``trial`` as ``SLOT 0``, then create or remove ``rootfs2``. Until the last step
    the trial is stale and the old slot stays active.

    Raises:
        SlotError: a slot is invalid, both are the same, or a file operation failed.
    """
    for value, role in ((slot, "new active slot"), (previous, "previous slot")):
        if value not in SLOT_NAMES:
            raise SlotError(f"invalid {role} {value!r}; expected one of a, b")
    if slot == previous:
        raise SlotError(
            f"cannot switch to slot {slot!r}: it is also the previous slot; the new"
            " root filesystem must be in the slot that is not running"
        )
    _check_directory(flags)
    try:
        remove_durably(flags.path(ROLLED_BACK_FROM))
        write_atomically(flags.path(TRIAL), f"{slot} 0\n".encode())
        _activate(flags, slot)
    except OSError as exc:
        raise SlotError(
            f"cannot write the flag files in {flags.directory}: {exc}; the active"
            " slot is unchanged unless rootfs2 changed"
        ) from exc
    log.info("active slot is now %s (previous %s, on trial)", slot, previous)
    return read_flags(flags)


def mark_good(flags: FlagFiles, running_slot: str) -> FlagState:
    """End the trial of the running slot by removing the ``trial`` file.

    Nothing is written when no trial is recorded.

    Raises:
        SlotError: ``running_slot`` is not the active slot, or the removal failed.
    """
    state = read_flags(flags)
    if state.active_slot != running_slot:
        raise SlotError(
            f"running slot {running_slot!r} is not the active slot"
            f" {state.active_slot!r} in the flag files; reboot into the active slot"
            " before marking it good"
        )
    if not os.path.lexists(flags.path(TRIAL)):
        log.info("slot already marked good; flag files unchanged")
        return state
    try:
        remove_durably(flags.path(TRIAL))
    except OSError as exc:
        raise SlotError(f"cannot remove {flags.path(TRIAL)}: {exc}") from exc
    log.info("marked slot %s good", running_slot)
    return read_flags(flags)


def running_slot(flags: FlagFiles, root: str = "/") -> str:
    """Return the slot whose block device holds the filesystem mounted at ``root``.

    Raises:
        SlotError: the root filesystem is on neither slot's device.
    """
    root_device = os.stat(root).st_dev
    for slot in SLOT_NAMES:
        device = flags.slot_devices[slot]
        try:
            if os.stat(device).st_rdev == root_device:
                return slot
        except OSError as exc:
            log.warning("cannot stat slot %s device %s: %s", slot, device, exc)
    raise SlotError(
        f"the filesystem at {root} (device {os.major(root_device)}:"
        f"{os.minor(root_device)}) is on neither slot device"
        f" ({', '.join(flags.slot_devices[s] for s in SLOT_NAMES)})"
    )
