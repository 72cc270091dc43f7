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
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
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


def _read_manifest(bundle: Path) -> dict[str, Any]:
    path = bundle / MANIFEST_FILE
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read bundle manifest {path}: {error}") from error
    if manifest.get("format") != BUNDLE_FORMAT:
        raise ConfigError(
            f"{path}: bundle format {manifest.get('format')!r}, expected"
            f" {BUNDLE_FORMAT}"
        )
    return manifest


def _verify(bundle: Path, recording: Recording, manifest: dict[str, Any]) -> None:
    base_digest = image_digest(recording.base)
    if base_digest != manifest["base_digest"]:
        raise ConfigError(
            f"{bundle / BASE_FILE}: content digest {base_digest}, the manifest"
            f" expects {manifest['base_digest']}"
        )
    log_digest = file_digest(recording.log_path)
    if log_digest != manifest["log_sha256"]:
        raise ConfigError(
            f"{bundle / LOG_FILE}: SHA-256 {log_digest}, the manifest expects"
            f" {manifest['log_sha256']}"
        )


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
    to the bundle's ``replay/`` directory.

    Raises:
        ConfigError: the bundle is incomplete, or a file's digest does not match
            the manifest.
    """
    manifest = _read_manifest(bundle)
    recording = Recording.load(bundle)
    _verify(bundle, recording, manifest)
    state = CrashState.from_json(manifest["state"])
    workdir = workdir or bundle / "replay"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    window = recording.read_log()
    disk = materialise(recording.base, window, state, workdir / "disk.raw")
    digest = image_digest(disk)
    if digest != manifest["state_digest"]:
        raise ConfigError(
            f"state {manifest['name']} rebuilt from {bundle} has content digest"
            f" {digest}, the manifest expects {manifest['state_digest']}"
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
        name=str(manifest["name"]),
        state=state,
        recorded_problems=list(manifest["problems"]),
        host=host,
        boot=boot_result,
    )
