"""Bundles: everything that reproduces one crash state, in one directory.

A bundle holds:

- ``manifest.json``: the state (cut point, kept cached writes, torn write), its
  name, kind and seed, the campaign seed, the problems the campaign found, the
  content digest of the state's disk and of ``start.raw``, and the SHA-256 of
  ``update.log``;
- ``recording.json``: what the checks expect of each slot;
- ``start.raw`` and ``update.log``: the disk before the update and the update's
  write log. They are hard links to the campaign's files where the filesystem
  allows, so that many bundles cost no space. The state's disk is ``start.raw``
  plus the writes that the manifest's state selects from ``update.log``;
- ``console.log``: the boot check's console transcript, when the state was booted.

``replay(bundle)`` rebuilds the state's disk, checks that its digest matches,
runs the host checks and boots it. ``tar -cSf`` keeps ``start.raw`` sparse when a
bundle is copied elsewhere.

A replay writes into a work directory that it marks with ``.mbl-sim-replay``.
It empties a directory only when that directory carries the mark or is the
bundle's own ``replay/``. Any other directory must be new or empty.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mbl_sim.board import load_board
from mbl_sim.campaign.boot import BOOT_TIMEOUT, BootResult, boot_state
from mbl_sim.campaign.checks import HostResult, StateView, check_on_host
from mbl_sim.campaign.record import (
    BASE_FILE,
    LOG_FILE,
    RECORDING_FILE,
    Recording,
    file_digest,
)
from mbl_sim.campaign.runner import StateResult
from mbl_sim.errors import ConfigError
from mbl_sim.images.recipe import DeviceImages, ImageBuilder
from mbl_sim.storage import CrashState, image_digest, materialise

__all__ = ["MANIFEST_FILE", "ReplayResult", "replay", "write_bundle"]

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
BUNDLE_FORMAT = 1
REPLAY_MARKER = ".mbl-sim-replay"
"""File that marks a directory as a replay's work directory, which the next replay
into it may empty."""


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def write_bundle(
    recording: Recording, result: StateResult, directory: Path, *, campaign_seed: int
) -> Path:
    """Write the bundle of one checked state into ``directory`` and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in (RECORDING_FILE, BASE_FILE, LOG_FILE):
        target = directory / name
        target.unlink(missing_ok=True)
        _link_or_copy(recording.directory / name, target)
    if result.boot is not None and result.boot.transcript is not None:
        shutil.copy(result.boot.transcript, directory / "console.log")
    planned = result.planned
    manifest = {
        "format": BUNDLE_FORMAT,
        "update": recording.update,
        "name": planned.name,
        "kind": planned.kind,
        "interval": planned.interval,
        "seed": planned.seed,
        "campaign_seed": campaign_seed,
        "state": planned.state.to_json(),
        "state_digest": _state_digest(recording, planned.state, directory),
        "base_digest": recording.base_digest,
        "log_sha256": recording.log_digest,
        "problems": result.problems,
        "error": result.error,
        "environment": result.host.env,
        "boot": None if result.boot is None else result.boot.describe(),
        "replay": f"mbl-sim replay {directory}",
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def _state_digest(recording: Recording, state: CrashState, scratch: Path) -> str:
    with tempfile.TemporaryDirectory(dir=scratch) as temporary:
        disk = materialise(
            recording.base, recording.read_log(), state, Path(temporary) / "disk.raw"
        )
        return image_digest(disk)


@dataclass
class ReplayResult:
    """The outcome of a replay.

    Attributes:
        name: the state's name.
        state: the crash state.
        recorded_problems: the problems the campaign reported.
        host: the host checks' outcome now.
        boot: the boot's outcome, or None when not booted.
    """

    name: str
    state: CrashState
    recorded_problems: list[str]
    host: HostResult
    boot: BootResult | None

    @property
    def problems(self) -> list[str]:
        """The problems found now, host first."""
        boot = [f"boot: {p}" for p in self.boot.problems] if self.boot else []
        return self.host.problems + boot


@dataclass(frozen=True)
class _Manifest:
    """The manifest keys that a replay reads."""

    name: str
    state: CrashState
    state_digest: str
    base_digest: str
    log_sha256: str
    problems: list[str]


def _describe_json(value: object) -> str:
    """Describe a JSON value for an error: its type if it is an array or object,
    else the value itself."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return json.dumps(value)


def _is_count(value: object) -> bool:
    # JSON true and false load as bool, which is a subclass of int.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_counts(value: object) -> bool:
    return isinstance(value, list) and all(_is_count(item) for item in value)


def _is_strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


class _ManifestReader:
    """Reads the keys of one bundle's manifest, with errors that name the file and
    the key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, problem: str) -> ConfigError:
        return ConfigError(
            f"invalid bundle manifest {self.path}: {problem}; copy the bundle again"
            " from the campaign's bundles/ directory"
        )

    def get(
        self,
        document: dict[str, Any],
        path: str,
        expected: str,
        valid: Callable[[object], bool],
    ) -> Any:
        """Return the key at the end of the dotted ``path`` from ``document``.

        Raises:
            ConfigError: the key is missing, or ``valid`` rejects its value.
        """
        key = path.rpartition(".")[2]
        if key not in document:
            raise self.error(f"missing key {path!r}")
        value = document[key]
        if not valid(value):
            raise self.error(
                f"key {path!r} is {_describe_json(value)}, expected {expected}"
            )
        return value

    def string(self, document: dict[str, Any], path: str) -> str:
        value: str = self.get(
            document, path, "a string", lambda value: isinstance(value, str)
        )
        return value

    def state(self, document: dict[str, Any]) -> CrashState:
        """Check the crash state as ``CrashState.to_json`` writes it, and read it."""
        state = self.get(
            document, "state", "an object", lambda value: isinstance(value, dict)
        )
        self.get(state, "state.point", "a number from 0", _is_count)
        self.get(state, "state.kept", "an array of log indices", _is_counts)
        torn = self.get(
            state,
            "state.torn",
            "null or an object",
            lambda value: value is None or isinstance(value, dict),
        )
        if torn is not None:
            for key in ("index", "kept_bytes"):
                self.get(torn, f"state.torn.{key}", "a number from 0", _is_count)
        return CrashState.from_json(state)


def _read_manifest(bundle: Path) -> _Manifest:
    """Check that ``bundle`` has every file, and read and check its manifest.

    Raises:
        ConfigError: the bundle is missing, lacks a file, or its manifest is
            invalid.
    """
    if not bundle.is_dir():
        problem = "is not a directory" if bundle.exists() else "not found"
        raise ConfigError(f"bundle {bundle} {problem}")
    for name in (MANIFEST_FILE, RECORDING_FILE, BASE_FILE, LOG_FILE):
        if not (bundle / name).is_file():
            raise ConfigError(f"bundle {bundle} is incomplete: {name} missing")
    path = bundle / MANIFEST_FILE
    try:
        document: object = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read bundle manifest {path}: {error}") from error
    reader = _ManifestReader(path)
    if not isinstance(document, dict):
        raise reader.error(
            f"the manifest is {_describe_json(document)}, expected an object"
        )
    if document.get("format") != BUNDLE_FORMAT:
        raise ConfigError(
            f"{path}: bundle format {document.get('format')!r}, expected"
            f" {BUNDLE_FORMAT}"
        )
    return _Manifest(
        name=reader.string(document, "name"),
        state=reader.state(document),
        state_digest=reader.string(document, "state_digest"),
        base_digest=reader.string(document, "base_digest"),
        log_sha256=reader.string(document, "log_sha256"),
        problems=reader.get(document, "problems", "an array of strings", _is_strings),
    )


def _verify(bundle: Path, recording: Recording, manifest: _Manifest) -> None:
    base_digest = image_digest(recording.base)
    if base_digest != manifest.base_digest:
        raise ConfigError(
            f"{bundle / BASE_FILE}: content digest {base_digest}, the manifest"
            f" expects {manifest.base_digest}"
        )
    log_digest = file_digest(recording.log_path)
    if log_digest != manifest.log_sha256:
        raise ConfigError(
            f"{bundle / LOG_FILE}: SHA-256 {log_digest}, the manifest expects"
            f" {manifest.log_sha256}"
        )


def _prepare_workdir(workdir: Path, bundle: Path, *, owned: bool) -> None:
    """Make ``workdir`` an empty directory that carries the replay mark.

    A non-empty ``workdir`` is emptied only when it carries the mark or ``owned``
    is true, so that a replay deletes no file that mbl-sim did not write.

    Raises:
        ConfigError: ``workdir`` is not a directory, contains files that no replay
            wrote, contains the bundle, or cannot be created.
    """
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(
            f"work directory {workdir} is not a directory; pass --workdir with a new"
            " or empty directory"
        )
    if workdir.is_dir() and any(workdir.iterdir()):
        if not owned and not (workdir / REPLAY_MARKER).is_file():
            raise ConfigError(
                f"work directory {workdir} is not empty and no replay made it, so"
                " replay does not empty it; pass --workdir with a new or empty"
                " directory"
            )
        if bundle.resolve().is_relative_to(workdir.resolve()):
            raise ConfigError(
                f"work directory {workdir} contains the bundle {bundle}; pass"
                " --workdir with a directory outside the bundle"
            )
        shutil.rmtree(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / REPLAY_MARKER).write_text(
            f"Work directory of mbl-sim replay {bundle}. The next replay into this"
            " directory deletes everything in it.\n"
        )
    except OSError as error:
        raise ConfigError(
            f"cannot create work directory {workdir}: {error.strerror}"
        ) from error


def replay(
    bundle: Path,
    *,
    images: DeviceImages | None = None,
    workdir: Path | None = None,
    boot: bool = True,
    boot_timeout: float = BOOT_TIMEOUT,
) -> ReplayResult:
    """Rebuild the state of ``bundle``, check it on the host and boot it.

    ``images`` default to the board's built images (built if needed). ``workdir``
    keeps the state's disk and the boot's console transcript; by default they go
    to the bundle's ``replay/`` directory. A ``workdir`` that an earlier replay
    made is emptied first; any other must be new or empty.

    Raises:
        ConfigError: the bundle is incomplete or invalid, a file's digest does not
            match the manifest, or ``workdir`` cannot be used.
    """
    manifest = _read_manifest(bundle)
    recording = Recording.load(bundle)
    _verify(bundle, recording, manifest)
    state = manifest.state
    # The bundle's own replay/ directory contains only what earlier replays wrote.
    owned = workdir is None
    workdir = workdir or bundle / "replay"
    _prepare_workdir(workdir, bundle, owned=owned)
    window = recording.read_log()
    disk = materialise(recording.base, window, state, workdir / "disk.raw")
    digest = image_digest(disk)
    if digest != manifest.state_digest:
        raise ConfigError(
            f"state {manifest.name} rebuilt from {bundle} has content digest"
            f" {digest}, the manifest expects {manifest.state_digest}"
        )
    board = images.board if images is not None else load_board(recording.board_source)
    view = StateView(board, recording, window, state, workdir / "host")
    host = check_on_host(view)
    boot_result = None
    if boot:
        images = images or ImageBuilder(board).build()
        expected = {
            recording.old.slot: recording.old.version,
            recording.new.slot: recording.new.version,
        }
        boot_result = boot_state(
            images,
            disk,
            workdir / "device",
            expected,
            max_boots=board.boot.bootlimit + 2,
            timeout=boot_timeout,
        )
    return ReplayResult(
        name=manifest.name,
        state=state,
        recorded_problems=list(manifest.problems),
        host=host,
        boot=boot_result,
    )
