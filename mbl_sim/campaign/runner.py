"""Check crash states in parallel worker processes.

Each worker is a process of its own (``spawn``), so that QEMU and the e2fsprogs
tools of one state never share a process with another state's. The parent stops
the workers with SIGTERM when it is interrupted or fails. A worker then unwinds and
powers its device off. QEMU dies with its worker in any case, because
``mbl_sim.machine`` starts it with ``PR_SET_PDEATHSIG``, and a worker gets SIGTERM
the same way when its parent dies. Workers ignore SIGINT, so a Ctrl-C reaches only
the parent, which stops them in order.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from mbl_sim.campaign.boot import BOOT_TIMEOUT, BootResult, boot_state
from mbl_sim.campaign.checks import HostResult, StateView, check_on_host
from mbl_sim.campaign.plan import PlannedState
from mbl_sim.campaign.record import Recording
from mbl_sim.errors import MblSimError, TargetError
from mbl_sim.images.recipe import DeviceImages
from mbl_sim.storage import WriteLog, materialise

__all__ = ["StateResult", "WorkerSettings", "check_states"]

log = logging.getLogger(__name__)

_STOP_WAIT = 15.0
_POLL_SECONDS = 1.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@dataclass(frozen=True)
class WorkerSettings:
    """Settings shared by every worker.

    Attributes:
        images: the device's images, for boot checks.
        recording: the recording's directory.
        scratch: a directory for the workers' temporary files.
        states: a directory for what is kept of each state (boot transcripts).
        boot_timeout: seconds for each step of a boot.
        log_level: the workers' logging level; they log to stderr.
    """

    images: DeviceImages
    recording: Path
    scratch: Path
    states: Path
    boot_timeout: float = BOOT_TIMEOUT
    log_level: int = logging.WARNING


@dataclass
class StateResult:
    """The outcome of one state's checks.

    Attributes:
        planned: the state.
        host: the host checks' outcome.
        boot: the boot check's outcome, or None when it was not booted.
        error: a failure of the checks themselves (not of the state), or None.
    """

    planned: PlannedState
    host: HostResult
    boot: BootResult | None = None
    error: str | None = None

    @property
    def problems(self) -> list[str]:
        """Everything wrong with the state, host problems first."""
        boot = (
            [f"boot: {problem}" for problem in self.boot.problems] if self.boot else []
        )
        return self.host.problems + boot

    @property
    def bad(self) -> bool:
        """Whether a check found a problem in the state."""
        return bool(self.problems)

    @property
    def seconds(self) -> float:
        return self.host.seconds + (self.boot.seconds if self.boot else 0.0)


class _Worker:
    """The state of one worker process."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.recording = Recording.load(settings.recording)
        self.window: WriteLog = self.recording.read_log()
        self.scratch = settings.scratch / f"worker-{os.getpid()}"
        self.scratch.mkdir(parents=True, exist_ok=True)

    def check(self, planned: PlannedState) -> StateResult:
        host_dir = self.scratch / "host"
        host_dir.mkdir(exist_ok=True)
        view = StateView(
            self.settings.images.board,
            self.recording,
            self.window,
            planned.state,
            host_dir,
        )
        result = StateResult(planned, check_on_host(view))
        if planned.boot:
            result.boot = self._boot(planned)
        return result

    def _boot(self, planned: PlannedState) -> BootResult:
        directory = self.scratch / "boot"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir()
        disk = materialise(
            self.recording.base, self.window, planned.state, directory / "disk.raw"
        )
        recording = self.recording
        expected = {
            recording.old.slot: recording.old.version,
            recording.new.slot: recording.new.version,
        }
        images = self.settings.images
        try:
            result = boot_state(
                images,
                disk,
                directory / "device",
                expected,
                max_boots=images.board.boot.bootlimit + 2,
                timeout=self.settings.boot_timeout,
            )
            kept = self.settings.states / planned.name
            kept.mkdir(parents=True, exist_ok=True)
            if result.transcript is not None and result.transcript.exists():
                result.transcript = Path(shutil.copy(result.transcript, kept))
            return result
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _die_with_parent(parent: int) -> None:
    """Ask the kernel for SIGTERM when the parent dies, so that a worker whose parent
    was killed stops instead of checking states that nobody collects."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning(
            "prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno())
        )
    # The parent may have died before prctl() took effect.
    if os.getppid() != parent:
        raise SystemExit(1)


def _worker_main(
    settings: WorkerSettings, tasks: Any, results: Any, parent: int
) -> None:
    """Run in each worker process: check states until the parent sends None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    _die_with_parent(parent)
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )
    worker = _Worker(settings)
    try:
        while (task := tasks.get()) is not None:
            number, planned = task
            try:
                results.put((number, worker.check(planned), None))
            except (MblSimError, OSError) as error:
                results.put((number, None, f"{type(error).__name__}: {error}"))
            except Exception:
                results.put((number, None, traceback.format_exc()))
    finally:
        worker.close()


def _error_result(planned: PlannedState, error: str) -> StateResult:
    return StateResult(planned, HostResult(), error=error)


def check_states(
    settings: WorkerSettings,
    states: Sequence[PlannedState],
    workers: int,
    progress: Callable[[int, int, StateResult], None] = lambda done, total, result: (
        None
    ),
) -> list[StateResult]:
    """Check ``states`` in ``workers`` processes; return the results in the order of
    ``states``. ``progress(done, total, result)`` is called as each one finishes.

    Raises:
        TargetError: a worker process died.
        KeyboardInterrupt: the user interrupted; the workers are stopped first.
    """
    results: dict[int, StateResult] = {}
    for number, result in _run_pool(settings, states, max(1, workers)):
        results[number] = result
        progress(len(results), len(states), result)
    return [results[number] for number in range(len(states))]


def _run_pool(
    settings: WorkerSettings, states: Sequence[PlannedState], workers: int
) -> Iterator[tuple[int, StateResult]]:
    context = multiprocessing.get_context("spawn")
    tasks = context.Queue()
    results = context.Queue()
    processes = [
        context.Process(
            target=_worker_main,
            args=(settings, tasks, results, os.getpid()),
            name=f"campaign-worker-{number}",
            daemon=True,
        )
        for number in range(min(workers, max(1, len(states))))
    ]
    for number, planned in enumerate(states):
        tasks.put((number, planned))
    for _process in processes:
        tasks.put(None)
    for process in processes:
        process.start()
    log.debug("started workers %s", [process.pid for process in processes])
    try:
        for _count in range(len(states)):
            number, result, error = _next_result(results, processes)
            if result is None:
                result = _error_result(states[number], error)
            yield number, result
    except BaseException:
        # Tasks left in the queue are dropped rather than waited for.
        tasks.cancel_join_thread()
        _stop(processes, wait=0.0)
        raise
    _stop(processes, wait=_STOP_WAIT)


def _next_result(
    results: Any, processes: Sequence[Any]
) -> tuple[int, StateResult | None, str]:
    while True:
        try:
            item: tuple[int, StateResult | None, str] = results.get(
                timeout=_POLL_SECONDS
            )
            return item
        except queue.Empty:
            dead = [p for p in processes if not p.is_alive() and p.exitcode != 0]
            if dead:
                codes = ", ".join(f"pid {p.pid} exit {p.exitcode}" for p in dead)
                raise TargetError(f"campaign worker died: {codes}") from None


def _stop(processes: Sequence[Any], wait: float) -> None:
    """Give the workers ``wait`` seconds to exit, then send SIGTERM to each one
    left (by pid), and SIGKILL to those still running ``_STOP_WAIT`` s later."""
    for grace, action in ((wait, "terminate"), (_STOP_WAIT, "kill")):
        deadline = time.monotonic() + grace
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        alive = [process for process in processes if process.is_alive()]
        if not alive:
            return
        for process in alive:
            log.debug("%s worker pid %d", action, process.pid)
            getattr(process, action)()
    for process in processes:
        process.join(_STOP_WAIT)
        if process.is_alive():
            log.warning("worker pid %d did not exit after SIGKILL", process.pid)
