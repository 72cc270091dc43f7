"""Start, stop and inspect supervised application processes.

Each running application has one supervisor: the shell script
``/usr/lib/mbl-update/supervise-app`` (a BusyBox ``ash`` loop of a few lines), started
in a new session. It runs the application with ``setsid``, so the application leads
its own session and process group, waits for it and starts it again one second after
it exits. A shell loop costs one small process per application and starts in
milliseconds, where a Python supervisor would take about 0.7 s and 10 MB under
emulation. BusyBox's ``start-stop-daemon`` would start an application and write a pid
file, but it does not restart one that exits.

The supervisor reports to files in ``RUN_DIR/NAME/`` (``/run`` is a tmpfs, so the
files vanish with the processes at a reboot):

- ``supervisor.pid``: the supervisor's PID, written by `Supervisor.start`;
- ``state``: ``running PID STARTS`` or ``exited STATUS STARTS``, written by the script.

Stopping an application:

1. the supervisor is frozen with SIGSTOP, so that it cannot fork any more. Its
   children (the application, or a ``sleep`` between two starts) are read from
   /proc. Then the supervisor is killed with SIGKILL, so nothing restarts the
   application;
2. SIGTERM goes to each child and to its process group;
3. whatever is left of them after the package's stop timeout gets SIGKILL.

A process that leaves its process group (with ``setsid`` or ``setpgid``) escapes
step 2 and 3, because the stop finds processes by group.

The application's standard output and error are appended to ``LOG_DIR/NAME.log``;
the script moves a log larger than 256 KiB to ``NAME.log.1`` before each start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from updater.errors import AppError

log = logging.getLogger(__name__)

SUPERVISOR_SCRIPT = "/usr/lib/mbl-update/supervise-app"
RUN_DIR = "/run/mbl-apps"
LOG_DIR = "/var/log/apps"

RUNNING = "running"
STARTING = "starting"
RESTARTING = "restarting"
STOPPED = "stopped"
UNSUPERVISED = "unsupervised"

# Seconds to wait for the supervisor's first ``running`` line after it was started.
START_TIMEOUT = 10.0
# Seconds to wait for processes to vanish after SIGKILL.
KILL_TIMEOUT = 5.0
# Polls start at the short interval and double up to the long one, so that a process
# that exits at once is noticed at once without polling /proc in a tight loop.
POLL_INTERVAL = 0.05
FIRST_POLL_INTERVAL = 0.005
# Lines of the application's log quoted in an error message.
LOG_TAIL_LINES = 5


@dataclass(frozen=True)
class SupervisorPaths:
    """Paths of the supervisor script, its state files and the application logs."""

    script: str = SUPERVISOR_SCRIPT
    run_dir: str = RUN_DIR
    log_dir: str = LOG_DIR

    def state_dir(self, name: str) -> str:
        """Return the directory of the state files of application ``name``."""
        return os.path.join(self.run_dir, name)

    def log_file(self, name: str) -> str:
        """Return the log file of application ``name``."""
        return os.path.join(self.log_dir, f"{name}.log")


@dataclass(frozen=True)
class ProcessState:
    """State of one application, read from the supervisor's files and /proc.

    Attributes:
        state: ``running``, ``starting`` (the supervisor has not started it yet),
            ``restarting`` (the supervisor waits to start it again), ``stopped``, or
            ``unsupervised`` (the application runs but its supervisor is gone).
        pid: the application's PID while it runs.
        starts: starts since the supervisor began.
        exit_status: the status of the last exit, if it exited.
        supervisor_pid: the supervisor's PID while it runs.
    """

    state: str
    pid: int | None = None
    starts: int = 0
    exit_status: int | None = None
    supervisor_pid: int | None = None


class Supervisor:
    """Starts and stops supervised applications and reads their state.

    Supervisors started by this object are its child processes until it exits;
    they are then adopted by init.
    """

    def __init__(self, paths: SupervisorPaths | None = None) -> None:
        self.paths = paths or SupervisorPaths()
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # -- start ------------------------------------------------------------------------

    def start(
        self,
        name: str,
        workdir: str,
        command: Sequence[str],
        environment: Mapping[str, str],
    ) -> ProcessState:
        """Start a supervisor for ``command`` in ``workdir`` and wait until it has
        started the application once.

        The caller checks later, with `failure`, that the application keeps running.

        Raises:
            AppError: the supervisor could not be started, or reported no start
                within ``START_TIMEOUT`` seconds.
        """
        state_dir = self.paths.state_dir(name)
        log_file = self.paths.log_file(name)
        try:
            os.makedirs(state_dir, exist_ok=True)
            os.makedirs(self.paths.log_dir, exist_ok=True)
            for stale in ("state", "supervisor.pid"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(state_dir, stale))
            process = self._spawn(name, workdir, command, environment, log_file)
        except OSError as exc:
            raise AppError(f"cannot start the supervisor of app {name}: {exc}") from exc
        self._children[process.pid] = process
        _write_small_file(os.path.join(state_dir, "supervisor.pid"), f"{process.pid}\n")
        log.info("app %s: supervisor pid %d started: %s", name, process.pid, command)
        return self._wait_first_start(name, process)

    def _spawn(
        self,
        name: str,
        workdir: str,
        command: Sequence[str],
        environment: Mapping[str, str],
        log_file: str,
    ) -> subprocess.Popen[bytes]:
        arguments = [self.paths.script, name, self.paths.state_dir(name), log_file]
        with open(log_file, "ab") as output:
            return subprocess.Popen(
                [*arguments, *command],
                cwd=workdir,
                env=dict(environment),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                start_new_session=True,
                close_fds=True,
            )

    def _wait_first_start(
        self, name: str, process: subprocess.Popen[bytes]
    ) -> ProcessState:
        deadline = time.monotonic() + START_TIMEOUT
        for interval in _poll_intervals():
            if time.monotonic() >= deadline:
                break
            state = self.state(name)
            if state.starts >= 1:
                return state
            if process.poll() is not None:
                raise AppError(
                    f"the supervisor of app {name} exited with status"
                    f" {process.returncode} before starting it{self._log_tail(name)}"
                )
            time.sleep(interval)
        raise AppError(
            f"the supervisor of app {name} did not start it within"
            f" {START_TIMEOUT:g} s{self._log_tail(name)}"
        )

    def failure(self, name: str) -> str | None:
        """Return why application ``name`` is not running its first start any more,
        or None while it is.

        Call it after `start`. A restart counts as a failure, so an application that
        exits and is started again within its health window fails.
        """
        state = self.state(name)
        if state.state == RUNNING and state.starts == 1:
            return None
        if state.state == RUNNING:
            tail = self._log_tail(name)
            return f"exited and was restarted ({state.starts} starts){tail}"
        if state.exit_status is None and state.supervisor_pid is not None:
            # The process is gone, but the supervisor has not written its exit
            # status yet; it does so right after wait returns.
            time.sleep(POLL_INTERVAL * 4)
            state = self.state(name)
        if state.exit_status is not None:
            return f"{describe_exit(state.exit_status)}{self._log_tail(name)}"
        if state.supervisor_pid is None:
            return f"its supervisor is no longer running{self._log_tail(name)}"
        return f"it is no longer running{self._log_tail(name)}"

    # -- stop -------------------------------------------------------------------------

    def stop(self, name: str, timeout: float) -> str:
        """Stop application ``name``: SIGTERM, then SIGKILL after ``timeout`` seconds.

        Returns a short description of what happened, for the log and the report.

        Raises:
            AppError: a process survived SIGKILL for ``KILL_TIMEOUT`` seconds.
        """
        targets = self._kill_supervisor(name)
        state = self._read_state_file(name)
        if state is not None and state[0] == RUNNING and _alive(state[1]):
            targets.add(state[1])
        live = _live_processes()
        targets = {
            pid
            for pid in targets
            if any(pid in (number, group) for number, _, group in live)
        }
        if not targets:
            self._remove_state(name)
            return "was not running"
        started = time.monotonic()
        _signal_all(targets, signal.SIGTERM)
        if _wait_gone(targets, timeout):
            outcome = f"stopped by SIGTERM in {time.monotonic() - started:.1f} s"
        else:
            log.warning(
                "app %s: still running %g s after SIGTERM; sending SIGKILL",
                name,
                timeout,
            )
            _signal_all(targets, signal.SIGKILL)
            if not _wait_gone(targets, KILL_TIMEOUT):
                raise AppError(
                    f"app {name}: processes {sorted(targets)} survived SIGKILL for"
                    f" {KILL_TIMEOUT:g} s"
                )
            outcome = f"killed by SIGKILL after its {timeout:g} s stop timeout"
        self._remove_state(name)
        log.info("app %s: %s", name, outcome)
        return outcome

    def _kill_supervisor(self, name: str) -> set[int]:
        """Freeze and kill the supervisor; return its children (the application)."""
        supervisor = self._supervisor_pid(name)
        if supervisor is None:
            return set()
        children: set[int] = set()
        try:
            os.kill(supervisor, signal.SIGSTOP)
            children = set(_children_of(supervisor))
            os.kill(supervisor, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process = self._children.pop(supervisor, None)
        if process is not None:
            process.wait()
        elif not _wait_gone({supervisor}, KILL_TIMEOUT, groups=False):
            log.warning("app %s: supervisor %d did not exit", name, supervisor)
        log.debug(
            "app %s: killed supervisor %d, children %s", name, supervisor, children
        )
        return children

    def _remove_state(self, name: str) -> None:
        for file in ("state", "supervisor.pid"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.paths.state_dir(name), file))

    # -- state ------------------------------------------------------------------------

    def state(self, name: str) -> ProcessState:
        """Return the current state of application ``name``."""
        supervisor = self._supervisor_pid(name)
        state = self._read_state_file(name)
        if state is None:
            kind = STOPPED if supervisor is None else STARTING
            return ProcessState(kind, supervisor_pid=supervisor)
        kind, number, starts = state
        if kind == RUNNING and _alive(number):
            running = RUNNING if supervisor is not None else UNSUPERVISED
            return ProcessState(running, number, starts, None, supervisor)
        if supervisor is None:
            return ProcessState(STOPPED, None, starts, None, None)
        exit_status = number if kind == "exited" else None
        return ProcessState(RESTARTING, None, starts, exit_status, supervisor)

    def _supervisor_pid(self, name: str) -> int | None:
        """Return the recorded supervisor PID if that process is still the supervisor
        of ``name``, so a reused PID is never signalled."""
        path = os.path.join(self.paths.state_dir(name), "supervisor.pid")
        try:
            with open(path, encoding="ascii") as file:
                pid = int(file.read().strip())
        except (OSError, ValueError):
            return None
        process = self._children.get(pid)
        if process is not None and process.poll() is not None:
            return None
        if not _alive(pid):
            return None
        arguments = _command_line(pid)
        if self.paths.script not in arguments[:2]:
            return None
        index = arguments.index(self.paths.script)
        if arguments[index + 1 : index + 2] != [name]:
            return None
        return pid

    def _read_state_file(self, name: str) -> tuple[str, int, int] | None:
        path = os.path.join(self.paths.state_dir(name), "state")
        try:
            with open(path, encoding="ascii") as file:
                words = file.read().split()
            kind, number, starts = words[0], int(words[1]), int(words[2])
        except (OSError, ValueError, IndexError):
            return None
        if kind not in (RUNNING, "exited"):
            return None
        return kind, number, starts

    def _log_tail(self, name: str) -> str:
        path = self.paths.log_file(name)
        try:
            with open(path, "rb") as file:
                file.seek(max(0, os.fstat(file.fileno()).st_size - 2000))
                lines = file.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return ""
        lines = [line for line in lines if not line.startswith("supervise-app:")]
        if not lines:
            return ""
        tail = "\n".join(f"  {line}" for line in lines[-LOG_TAIL_LINES:])
        return f"; last lines of {path}:\n{tail}"


def describe_exit(status: int) -> str:
    """Describe a shell exit status: 128+N means killed by signal N."""
    if status > 128 and status - 128 < signal.NSIG:
        number = status - 128
        try:
            signal_name = signal.Signals(number).name
        except ValueError:
            signal_name = f"signal {number}"
        return f"exited with status {status} (killed by {signal_name})"
    if status == 127:
        return "exited with status 127 (command not found)"
    if status == 126:
        return "exited with status 126 (command not executable)"
    return f"exited with status {status}"


# -- /proc ----------------------------------------------------------------------------


def _process_stat(pid: int) -> tuple[str, int, int] | None:
    """Return (state, ppid, pgrp) of ``pid`` from /proc/PID/stat, or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as file:
            text = file.read()
    except OSError:
        return None
    # The command name in parentheses may contain spaces and parentheses.
    fields = text[text.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[1]), int(fields[2])
    except (IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    stat = _process_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _live_processes() -> list[tuple[int, int, int]]:
    """Return (pid, ppid, pgrp) of every process that is not a zombie."""
    processes = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _process_stat(int(entry))
        if stat is not None and stat[0] not in ("Z", "X"):
            processes.append((int(entry), stat[1], stat[2]))
    return processes


def _children_of(parent: int) -> list[int]:
    return [pid for pid, ppid, _ in _live_processes() if ppid == parent]


def _wait_gone(targets: Iterable[int], timeout: float, *, groups: bool = True) -> bool:
    """Wait until no target process, and with ``groups`` no member of a target's
    process group, is alive."""
    wanted = set(targets)
    deadline = time.monotonic() + timeout
    for interval in _poll_intervals():
        # Reading each target's own /proc entry is cheap; the scan of all of /proc
        # for group members runs only once the targets themselves are gone.
        if not any(_alive(pid) for pid in wanted) and (
            not groups or not any(group in wanted for _, _, group in _live_processes())
        ):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
    return False


def _poll_intervals() -> Iterator[float]:
    interval = FIRST_POLL_INTERVAL
    while True:
        yield interval
        interval = min(interval * 2, POLL_INTERVAL)


def _signal_all(targets: Iterable[int], number: signal.Signals) -> None:
    """Send ``number`` to each target and to the process group it leads."""
    for pid in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, number)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, number)


def _command_line(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            raw = file.read()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def _write_small_file(path: str, text: str) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="ascii") as file:
        file.write(text)
    os.rename(temporary, path)
