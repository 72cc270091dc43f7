"""Host checks of one crash state: what the device would boot, read from the disk.

For every state:

1. the boot state: on a board with a U-Boot environment, both raw copies are
   decoded with the updater's own codec (``updater.bootenv.decode_env``); at least
   one copy must be valid, and its ``active_slot`` must name a slot. On a board
   with flag files, the bootflags partition's journal is replayed, ``e2fsck -n``
   must find it clean, and the updater's own reader (``updater.flagfile``) reads
   the flag files that debugfs copies out of it;
2. that slot's filesystem, cut out of the disk: its journal is replayed as a
   mount would, then ``e2fsck -n -f`` must find it clean;
3. that slot's content: ``/etc/mbl-version`` and the sampled files must match
   what the recording expects of that slot, old or new;
4. the applications on the home partition (`mbl_sim.campaign.apps`): after the
   recovery the device runs at boot, each one is wholly at one release, the
   package database parses, and together they are all at their versions before
   the update or all at those after it.

More checks can be added with ``register_host_check``: each gets a `StateView` and
returns the problems it found.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mbl_sim.board import FLAGS_PARTITION, Board
from mbl_sim.campaign.apps import APPS_PARTITION, inspect_apps
from mbl_sim.campaign.ext4 import check_filesystem, dump_files, replay_journal
from mbl_sim.campaign.record import Recording, SlotExpectation
from mbl_sim.images.recipe import SLOT_PARTITIONS
from mbl_sim.storage import CrashState, WriteLog, materialise, read_state
from updater.bootenv import BootEnv, EnvLocation, decode_env
from updater.errors import BootEnvError, SlotError
from updater.flagfile import ROLLED_BACK_FROM, ROOTFS2, TRIAL, FlagFiles, read_flags

__all__ = [
    "HostCheck",
    "HostResult",
    "StateView",
    "check_on_host",
    "register_host_check",
]

log = logging.getLogger(__name__)

VERSION_PATH = "/etc/mbl-version"
FILE_EXAMPLES = 3


@dataclass
class StateView:
    """One crash state as the host checks see it.

    Attributes:
        board: the device's board.
        recording: the recorded update.
        window: the update's write log.
        state: the crash state.
        scratch: an empty directory the checks may use.
        env: the environment the boot script would read, or None if none is valid
            or the board keeps flag files.
    """

    board: Board
    recording: Recording
    window: WriteLog
    state: CrashState
    scratch: Path
    env: BootEnv | None = None

    def read(self, offset: int, length: int) -> bytes:
        """Return disk bytes ``[offset, offset+length)`` of the state."""
        return read_state(self.recording.base, self.window, self.state, offset, length)

    def partition_image(self, name: str) -> Path:
        """Cut partition ``name`` out of the state's disk into a file; return it."""
        partition = self.board.storage.layout[name]
        image = self.scratch / f"{name}.img"
        if not image.exists():
            materialise(
                self.recording.base,
                self.window,
                self.state,
                image,
                offset=partition.start,
                length=partition.size,
            )
        return image


HostCheck = Callable[[StateView], list[str]]
"""A host check: returns the problems it finds in a state, none if it is good."""

_EXTRA_CHECKS: list[tuple[str, HostCheck]] = []


def register_host_check(name: str, check: HostCheck) -> None:
    """Run ``check`` on every state after the built-in checks; ``name`` prefixes its
    problems. Worker processes import this module anew, so register at import time
    of a module that the campaign imports."""
    _EXTRA_CHECKS.append((name, check))


@dataclass
class HostResult:
    """The outcome of the host checks of one state.

    Attributes:
        problems: what is wrong; empty for a good state.
        env: the environment copy and boot variables the boot script would use.
        active_slot: the slot the environment names, or None.
        seconds: how long the checks took.
    """

    problems: list[str] = field(default_factory=list)
    env: str = ""
    active_slot: str | None = None
    seconds: float = 0.0


def _read_boot_state(view: StateView) -> tuple[str | None, str]:
    """Return the slot that the state boots (None if it cannot tell) and a summary
    of the boot variables, or the problem, for the report."""
    if view.board.storage.env is None:
        return _read_flag_files(view)
    env, summary = _read_env(view)
    view.env = env
    return (None if env is None else env.variables.get("active_slot", "")), summary


def _read_env(view: StateView) -> tuple[BootEnv | None, str]:
    env_config = view.board.storage.require_env()
    locations = [
        EnvLocation(str(view.recording.base), offset, env_config.size)
        for offset in env_config.offsets
    ]
    raw = [view.read(offset, env_config.size) for offset in env_config.offsets]
    try:
        env = decode_env(raw, locations)
    except BootEnvError as error:
        return None, f"no valid environment copy: {error}"
    variables = env.variables
    summary = (
        f"copy {env.current + 1} (flag {env.flag}): active_slot="
        f"{variables.get('active_slot')} upgrade_available="
        f"{variables.get('upgrade_available')}"
    )
    return env, summary


def _read_flag_files(view: StateView) -> tuple[str | None, str]:
    image = view.partition_image(FLAGS_PARTITION)
    problem = replay_journal(image) or check_filesystem(image)
    if problem is not None:
        return None, f"{FLAGS_PARTITION}: {problem}"
    names = (ROOTFS2, TRIAL, ROLLED_BACK_FROM)
    contents = dump_files(image, [f"/{name}" for name in names], view.scratch / "dump")
    directory = view.scratch / "flag-files"
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        data = contents[f"/{name}"]
        if data is not None:
            (directory / name).write_bytes(data)
    flags = FlagFiles(str(directory), {}, view.board.boot.bootlimit)
    try:
        state = read_flags(flags)
    except SlotError as error:
        return None, f"{FLAGS_PARTITION}: {error}"
    trial = "none" if state.trial_slot is None else f"{state.trial_slot}"
    summary = (
        f"flag files: active_slot={state.active_slot} trial={trial}"
        f" bootcount={state.bootcount}"
    )
    return state.active_slot, summary


def _check_content(
    view: StateView, image: Path, expected: SlotExpectation
) -> list[str]:
    paths = [VERSION_PATH, *[path for path in expected.files if path != VERSION_PATH]]
    contents = dump_files(image, paths, view.scratch / "files")
    problems = []
    version = contents[VERSION_PATH]
    shown = None if version is None else version.decode(errors="replace").strip()
    if shown != expected.version:
        found = "missing" if shown is None else f"{shown!r}"
        problems.append(
            f"slot {expected.slot}: {VERSION_PATH} is {found}, expected"
            f" {expected.version!r}"
        )
    wrong = []
    for path, digest in expected.files.items():
        data = contents.get(path)
        actual = None if data is None else hashlib.sha256(data).hexdigest()
        if actual != digest and path != VERSION_PATH:
            wrong.append(_content_problem(path, digest, actual))
    if wrong:
        examples = "; ".join(wrong[:FILE_EXAMPLES])
        problems.append(
            f"slot {expected.slot}: {len(wrong)} of {len(expected.files)} sampled"
            f" files are wrong, for example {examples}"
        )
    return problems


def _content_problem(path: str, expected: str | None, actual: str | None) -> str:
    if actual is None:
        return f"{path} is missing"
    if expected is None:
        return f"{path} exists but should not"
    return f"{path} has SHA-256 {actual[:12]}…, expected {expected[:12]}…"


def _check_slot(view: StateView, slot: str) -> list[str]:
    expected = view.recording.expectation(slot)
    if expected is None:
        return [f"environment names slot {slot!r}, neither the old nor the new slot"]
    image = view.partition_image(SLOT_PARTITIONS[slot])
    problem = replay_journal(image)
    if problem is not None:
        return [f"slot {slot}: {problem}"]
    problem = check_filesystem(image)
    if problem is not None:
        return [f"slot {slot}: {problem}"]
    return _check_content(view, image, expected)


def _check_apps(view: StateView) -> list[str]:
    if APPS_PARTITION not in {p.name for p in view.board.storage.layout}:
        return []
    apps = inspect_apps(view.partition_image(APPS_PARTITION), view.scratch / "apps")
    problems = [f"apps: {problem}" for problem in apps.problems]
    before, after = view.recording.apps_before, view.recording.apps_after
    if apps.versions not in (before, after):
        problems.append(
            f"apps: versions {apps.versions} are neither all those before the update"
            f" {before} nor all those after it {after}"
        )
    return problems


def check_on_host(view: StateView) -> HostResult:
    """Run the host checks on one state; ``view.scratch`` is emptied afterwards."""
    started = time.monotonic()
    result = HostResult()
    view.scratch.mkdir(parents=True, exist_ok=True)
    try:
        slot, result.env = _read_boot_state(view)
        if slot is None:
            result.problems.append(result.env)
        else:
            result.active_slot = slot
            result.problems += _check_slot(view, slot)
        result.problems += _check_apps(view)
        for name, check in _EXTRA_CHECKS:
            result.problems += [f"{name}: {problem}" for problem in check(view)]
    finally:
        shutil.rmtree(view.scratch, ignore_errors=True)
        view.scratch.mkdir(parents=True, exist_ok=True)
    result.seconds = time.monotonic() - started
    return result
