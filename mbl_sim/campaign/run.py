"""Run a crash-state campaign: record the update, plan states, check, report."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mbl_sim.board import FLAGS_PARTITION
from mbl_sim.campaign.boot import BOOT_TIMEOUT
from mbl_sim.campaign.bundle import write_bundle
from mbl_sim.campaign.plan import (
    UNLIMITED_CAP,
    PlannedState,
    PlanOptions,
    focus_intervals,
    plan_states,
)
from mbl_sim.campaign.record import Recording, record
from mbl_sim.campaign.report import ReportInput, write_junit, write_markdown, write_svg
from mbl_sim.campaign.runner import StateResult, WorkerSettings, check_states
from mbl_sim.campaign.updates import resolve_update
from mbl_sim.images.recipe import DeviceImages

__all__ = ["CampaignOptions", "CampaignResult", "check_recording", "run_campaign"]

log = logging.getLogger(__name__)

DEFAULT_SCRATCH = Path("/dev/shm")
"""A tmpfs, where the partition copies of the host checks stay in memory: e2fsck
fsyncs a copy after it replays its journal, which on a disk-backed filesystem
writes the whole copy out and makes parallel workers wait on the disk."""


@dataclass(frozen=True)
class CampaignOptions:
    """Settings of a campaign run.

    Attributes:
        workers: worker processes; by default one per CPU.
        plan: which states to check and boot.
        content_files: files of each slot the host checks compare; None for all.
        boot_timeout: seconds for each step of a boot check.
        bundles: write a bundle for each bad state.
        scratch: the directory for the states' temporary disks; None picks
            ``DEFAULT_SCRATCH`` when it is a writable directory, else the campaign's
            own directory.
    """

    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    plan: PlanOptions = field(default_factory=PlanOptions)
    content_files: int | None = 32
    boot_timeout: float = BOOT_TIMEOUT
    bundles: bool = True
    scratch: Path | None = None


@dataclass
class CampaignResult:
    """The outcome of a campaign and the paths of its report.

    Attributes:
        directory: the campaign's directory.
        recording: the recorded update.
        results: one per checked state, in log order.
        seconds: the campaign's duration, recording included.
        report: the Markdown report; ``outcome.svg`` and ``junit.xml`` are beside it.
        bundles: the bundle of each bad state, by state name.
    """

    directory: Path
    recording: Recording
    results: list[StateResult]
    seconds: float
    report: Path
    bundles: dict[str, Path]

    @property
    def bad(self) -> list[StateResult]:
        """The states in which a check found a problem."""
        return [result for result in self.results if result.bad]

    @property
    def errors(self) -> list[StateResult]:
        """The states whose checks failed to run."""
        return [result for result in self.results if result.error is not None]


def _say_progress(
    say: Callable[[str], None],
) -> Callable[[int, int, StateResult], None]:
    def progress(done: int, total: int, result: StateResult) -> None:
        planned = result.planned
        verdict = "good"
        if result.error:
            verdict = "error"
        elif result.bad:
            verdict = "BAD"
        booted = f", boot: {result.boot.describe()}" if result.boot else ""
        say(
            f"  [{done:{len(str(total))}}/{total}] {planned.name:<10} {verdict:<5}"
            f" {result.seconds:5.1f} s{booted}"
        )
        for problem in result.problems[:3]:
            say(f"      {problem.splitlines()[0][:160]}")
        if result.error:
            say(f"      {result.error.splitlines()[-1][:160]}")

    return progress


def _focus_ranges(images: DeviceImages) -> list[tuple[int, int]]:
    """Return the byte ranges where the update flips its slot: the environment
    copies, or the bootflags partition of a board with flag files."""
    storage = images.board.storage
    if storage.env is None:
        flags = storage.layout[FLAGS_PARTITION]
        return [(flags.start, flags.size)]
    return [(offset, storage.env.size) for offset in storage.env.offsets]


def run_campaign(
    images: DeviceImages,
    update_name: str,
    directory: Path,
    options: CampaignOptions | None = None,
    say: Callable[[str], None] = lambda message: None,
) -> CampaignResult:
    """Record update ``update_name`` once and check its crash states.

    ``directory`` receives the recording, ``report.md``, ``outcome.svg``,
    ``junit.xml``, ``states/`` (boot transcripts) and ``bundles/``.

    Raises:
        ConfigError: an unknown update or an unusable board.
        MblSimError: the recording failed, or a worker process died.
    """
    options = options or CampaignOptions()
    update = resolve_update(update_name)
    _focus_ranges(images)
    started = time.monotonic()
    recording = record(
        images,
        update,
        directory / "recording",
        content_files=options.content_files,
        seed=options.plan.seed,
        report=say,
    )
    return check_recording(images, recording, directory, options, say, started)


def check_recording(
    images: DeviceImages,
    recording: Recording,
    directory: Path,
    options: CampaignOptions | None = None,
    say: Callable[[str], None] = lambda message: None,
    started: float | None = None,
) -> CampaignResult:
    """Plan and check the crash states of ``recording``, and write the report into
    ``directory``.

    Raises:
        ConfigError: the board keeps no raw environment copies.
        MblSimError: a worker process died.
    """
    options = options or CampaignOptions()
    started = time.monotonic() if started is None else started
    directory.mkdir(parents=True, exist_ok=True)
    window = recording.read_log()
    ranges = _focus_ranges(images)
    planned = plan_states(window, options.plan, ranges)
    if options.plan.max_states is None and len(planned) == UNLIMITED_CAP:
        say(
            f"the log has more than {UNLIMITED_CAP} crash states; checking the"
            f" {UNLIMITED_CAP} nearest the boot-state writes first (--max-states sets"
            " the number)"
        )
    booted = sum(state.boot for state in planned)
    say(
        f"checking {len(planned)} crash states ({booted} booted) of"
        f" {len(window)} log entries with {options.workers} workers"
    )
    results = _check(images, recording, directory, planned, options, say)
    bundles = _write_bundles(recording, results, directory, options)
    seconds = time.monotonic() - started
    report = ReportInput(
        title=recording.update,
        recording=recording,
        window=window,
        results=results,
        seconds=seconds,
        workers=options.workers,
        seed=options.plan.seed,
        focus_intervals=focus_intervals(window, ranges),
        bundles=bundles,
    )
    markdown = write_markdown(report, directory / "report.md")
    write_svg(report, directory / "outcome.svg")
    write_junit(report, directory / "junit.xml")
    result = CampaignResult(directory, recording, results, seconds, markdown, bundles)
    say(
        f"{len(result.bad)} bad states, {len(result.errors)} check errors in"
        f" {len(results)} states ({seconds:.0f} s); report {markdown}"
    )
    return result


def _check(
    images: DeviceImages,
    recording: Recording,
    directory: Path,
    planned: list[PlannedState],
    options: CampaignOptions,
    say: Callable[[str], None],
) -> list[StateResult]:
    settings = WorkerSettings(
        images=images,
        recording=recording.directory,
        scratch=_scratch(options, directory),
        states=directory / "states",
        boot_timeout=options.boot_timeout,
        log_level=logging.getLogger().getEffectiveLevel(),
    )
    try:
        return check_states(settings, planned, options.workers, _say_progress(say))
    finally:
        shutil.rmtree(settings.scratch, ignore_errors=True)


def _scratch(options: CampaignOptions, directory: Path) -> Path:
    if options.scratch is not None:
        root = options.scratch
    elif DEFAULT_SCRATCH.is_dir() and os.access(DEFAULT_SCRATCH, os.W_OK):
        root = DEFAULT_SCRATCH
    else:
        root = directory
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="mbl-sim-campaign-", dir=root))


def _write_bundles(
    recording: Recording,
    results: list[StateResult],
    directory: Path,
    options: CampaignOptions,
) -> dict[str, Path]:
    if not options.bundles:
        return {}
    bundles = {}
    for result in results:
        if result.bad:
            target = directory / "bundles" / result.planned.name
            bundles[result.planned.name] = write_bundle(
                recording, result, target, campaign_seed=options.plan.seed
            )
    return bundles
