"""Installed applications on the device: layout, start, stop, listing and recovery.

Applications live on the ``home`` partition, mounted at /home::

    /home/app/
    ├── .opkg/
    │   ├── status              installed-package database (`updater.opkg_status`)
    │   └── transaction.json    journal of an update in progress, see below
    └── NAME/
        ├── current -> VERSION  symbolic link to the release that runs
        └── VERSION/            one release: a reinstall of the version uses VERSION_2
            ├── control         the package's control file
            └── data/           the package's data.tar unpacked: the app's directory

A package name starts with a letter or digit, so the ``.opkg`` directory can never
clash with an application. Everything in ``NAME/`` except ``current`` and the release
it points to is left over from an interrupted update and is deleted by
`collect_garbage`. An application runs with its release's ``data`` directory as its
working directory and with ``MBL_APP_NAME``, ``MBL_APP_VERSION`` and ``MBL_APP_DIR``
in its environment.

The database lists what is installed, and ``current`` names the release that runs.
The two agree except while an update runs. An update (`updater.app_install`) writes
the journal before it changes the first ``current`` link and removes it after it
wrote the new database. `recover`, run at boot before any application starts and
before every update, puts every application named in a journal back to its previous
release and database entry. So after a power cut at any moment, all applications of
a payload run their previous versions, or all run the new ones.

All changes are made under an exclusive ``flock`` on /home/app, so two ``mbl-update``
processes never change applications at the same time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from updater.control import format_stanza, parse_stanzas
from updater.durable import remove_durably, replace_symlink, write_atomically
from updater.errors import AppError, PackageError
from updater.ipk import DEFAULT_STOP_TIMEOUT, AppControl, parse_control
from updater.opkg_status import (
    DatabaseIssue,
    InstalledPackage,
    load_status,
    package_from_stanza,
    write_status,
)
from updater.supervisor import (
    RUNNING,
    STOPPED,
    ProcessState,
    Supervisor,
    SupervisorPaths,
)

log = logging.getLogger(__name__)

APPS_ROOT = "/home/app"
CURRENT = "current"
CONTROL_FILE = "control"
DATA_DIRECTORY = "data"
APP_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
JOURNAL_FORMAT = 1

# Architecture names that packages use for each ``uname -m`` machine: Debian's name
# first, then the kernel's, which Yocto uses. "all" and "noarch" are accepted
# everywhere.
ARCHITECTURES = {
    "aarch64": ("arm64", "aarch64"),
    "armv7l": ("armhf", "armv7l"),
    "x86_64": ("amd64", "x86_64"),
}
INDEPENDENT_ARCHITECTURES = ("all", "noarch")


@dataclass(frozen=True)
class AppPaths:
    """Paths of the applications, their database and their processes' state."""

    root: str = APPS_ROOT
    supervisor: SupervisorPaths = field(default_factory=SupervisorPaths)

    @property
    def database(self) -> str:
        """The installed-package database."""
        return os.path.join(self.root, ".opkg", "status")

    @property
    def journal(self) -> str:
        """The journal of an update in progress."""
        return os.path.join(self.root, ".opkg", "transaction.json")

    def app_dir(self, name: str) -> str:
        """Return the directory of application ``name``."""
        return os.path.join(self.root, name)

    def current_link(self, name: str) -> str:
        """Return the ``current`` link of application ``name``."""
        return os.path.join(self.root, name, CURRENT)

    def release_dir(self, name: str, release: str) -> str:
        """Return the directory of one release of application ``name``."""
        return os.path.join(self.root, name, release)


def accepted_architectures(machine: str | None = None) -> tuple[str, ...]:
    """Return the package architectures this device runs: its own and ``all``.

    ``machine`` defaults to ``uname -m``; an unknown machine accepts its own name.
    """
    machine = machine or os.uname().machine
    return ARCHITECTURES.get(machine, (machine,)) + INDEPENDENT_ARCHITECTURES


@contextlib.contextmanager
def locked(paths: AppPaths) -> Iterator[None]:
    """Hold an exclusive lock on the applications directory, creating it if needed.

    Raises:
        AppError: the directory cannot be created or locked.
    """
    try:
        os.makedirs(os.path.dirname(paths.database), exist_ok=True)
        fd = os.open(paths.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise AppError(f"cannot open the applications directory: {exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another mbl-update to finish with %s", paths.root)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- releases -------------------------------------------------------------------------


def current_release(paths: AppPaths, name: str) -> str | None:
    """Return the release that ``current`` of ``name`` points to, or None.

    Raises:
        AppError: ``current`` exists but is not a link to a release directory.
    """
    link = paths.current_link(name)
    try:
        target = os.readlink(link)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AppError(f"{link} is not a symbolic link: {exc}") from exc
    if "/" in target or target in ("", ".", "..") or target.startswith("."):
        raise AppError(f"{link} points to {target!r}, not to a release of {name}")
    return target


def read_release_control(paths: AppPaths, name: str, release: str) -> AppControl:
    """Read and validate the control file of one installed release.

    Raises:
        AppError: the file is missing or invalid.
    """
    path = os.path.join(paths.release_dir(name, release), CONTROL_FILE)
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
        return parse_control(text, path)
    except (OSError, UnicodeDecodeError, PackageError) as exc:
        raise AppError(f"cannot read the control file of app {name}: {exc}") from exc


def app_environment(control: AppControl, data_dir: str) -> dict[str, str]:
    """Return the environment an application runs with."""
    return {
        "PATH": APP_PATH,
        "MBL_APP_NAME": control.name,
        "MBL_APP_VERSION": str(control.version),
        "MBL_APP_DIR": data_dir,
    }


def app_command(control: AppControl, data_dir: str) -> list[str]:
    """Return ``App-Exec`` with a relative program path resolved in ``data_dir``."""
    program, *arguments = control.command
    if "/" in program and not program.startswith("/"):
        program = os.path.join(data_dir, program)
    return [program, *arguments]


def start_release(
    paths: AppPaths, supervisor: Supervisor, name: str, release: str
) -> tuple[AppControl, ProcessState]:
    """Start one release of application ``name`` under its supervisor.

    Raises:
        AppError: the control file is invalid or the supervisor did not start it.
    """
    control = read_release_control(paths, name, release)
    data_dir = os.path.join(paths.release_dir(name, release), DATA_DIRECTORY)
    state = supervisor.start(
        name,
        data_dir,
        app_command(control, data_dir),
        app_environment(control, data_dir),
    )
    return control, state


def stop_timeout(paths: AppPaths, name: str, release: str | None) -> float:
    """Return the stop timeout of a release, or the default if it cannot be read."""
    if release is None:
        return DEFAULT_STOP_TIMEOUT
    try:
        return read_release_control(paths, name, release).stop_timeout
    except AppError as exc:
        log.warning("%s; using the default stop timeout", exc)
        return DEFAULT_STOP_TIMEOUT


def wait_healthy(
    supervisor: Supervisor, windows: Sequence[tuple[str, str, float]]
) -> list[tuple[str, str]]:
    """Watch started applications until each one's health window has passed.

    ``windows`` lists (name, label, end on the `time.monotonic` clock). Returns
    (label, reason) for each application that stopped running within its window;
    watching stops at the first poll that finds a failure.
    """
    pending = list(windows)
    while pending:
        failures = []
        for name, label, _ in pending:
            reason = supervisor.failure(name)
            if reason is not None:
                failures.append((label, reason))
        if failures:
            return failures
        now = time.monotonic()
        pending = [window for window in pending if window[2] > now]
        if pending:
            time.sleep(min(0.1, max(0.0, min(end for *_, end in pending) - now)))
    return []


# -- journal and recovery -------------------------------------------------------------


@dataclass(frozen=True)
class JournalEntry:
    """One application of an update in progress.

    Attributes:
        name: the application.
        previous_release: the release ``current`` pointed to before, or None for a
            first install.
        new_release: the staged release.
        previous_entry: the application's database stanza before, or None.
    """

    name: str
    previous_release: str | None
    new_release: str
    previous_entry: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "previous_release": self.previous_release,
            "new_release": self.new_release,
            "previous_entry": self.previous_entry,
        }


def write_journal(paths: AppPaths, entries: Sequence[JournalEntry]) -> None:
    """Write the journal atomically.

    Raises:
        OSError: writing failed.
    """
    document = {
        "format": JOURNAL_FORMAT,
        "apps": [entry.to_json() for entry in entries],
    }
    write_atomically(paths.journal, json.dumps(document, indent=2).encode() + b"\n")


def read_journal(paths: AppPaths) -> list[JournalEntry] | None:
    """Return the entries of the journal, or None when there is none.

    Raises:
        AppError: the journal exists but cannot be read or is invalid.
    """
    try:
        with open(paths.journal, encoding="utf-8") as file:
            document = json.load(file)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise AppError(
            f"cannot read the update journal {paths.journal}: {exc}"
        ) from exc
    try:
        if document["format"] != JOURNAL_FORMAT:
            raise ValueError(f"format {document['format']!r}")
        return [
            JournalEntry(
                name=_journal_string(item["name"]),
                previous_release=_journal_optional(item["previous_release"]),
                new_release=_journal_string(item["new_release"]),
                previous_entry=_journal_optional(item["previous_entry"]),
            )
            for item in document["apps"]
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise AppError(f"invalid update journal {paths.journal}: {exc!r}") from exc


def _journal_string(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def _journal_optional(value: object) -> str | None:
    return None if value is None else _journal_string(value)


def recover(paths: AppPaths, supervisor: Supervisor) -> list[str]:
    """Finish an update that was interrupted, then delete leftover files.

    Every application in the journal is stopped if it runs, its ``current`` link
    and database entry are set back to their previous values, and the journal is
    removed. Call it with the lock held. Returns the names of the applications that
    were put back, so the caller can start them again.

    Raises:
        AppError: the journal, the links or the database cannot be restored.
    """
    try:
        entries = read_journal(paths)
    except AppError as exc:
        # A journal is written atomically, so an unreadable one is damage, not a cut
        # write. Keeping it would block every later update; its releases are then
        # cleaned up like any other leftover.
        log.error("%s; moving it aside", exc)
        os.replace(paths.journal, paths.journal + ".invalid")
        entries = None
    if entries is None:
        collect_garbage(paths)
        return []
    log.warning(
        "an application update was interrupted; putting back %s",
        ", ".join(entry.name for entry in entries),
    )
    for entry in reversed(entries):
        _put_back(paths, supervisor, entry)
    _restore_database(paths, entries)
    remove_durably(paths.journal)
    collect_garbage(paths)
    return [entry.name for entry in entries]


def _put_back(paths: AppPaths, supervisor: Supervisor, entry: JournalEntry) -> None:
    try:
        running = current_release(paths, entry.name)
    except AppError as exc:
        log.error("%s", exc)
        running = None
    if supervisor.state(entry.name).state != STOPPED:
        supervisor.stop(entry.name, stop_timeout(paths, entry.name, running))
    link = paths.current_link(entry.name)
    try:
        if entry.previous_release is None:
            remove_durably(link)
        else:
            replace_symlink(link, entry.previous_release)
    except OSError as exc:
        raise AppError(
            f"cannot point {link} back to {entry.previous_release}: {exc}"
        ) from exc


def _restore_database(paths: AppPaths, entries: Sequence[JournalEntry]) -> None:
    database = load_status(paths.database)
    packages = dict(database.packages)
    for entry in entries:
        packages.pop(entry.name, None)
        if entry.previous_entry is None:
            continue
        stanzas, _ = parse_stanzas(entry.previous_entry)
        package = package_from_stanza(stanzas[0]) if stanzas else None
        if package is not None:
            packages[entry.name] = package
    write_status(paths.database, packages.values())


def journal_entry(
    name: str,
    previous_release: str | None,
    new_release: str,
    previous: InstalledPackage | None,
) -> JournalEntry:
    """Build the journal entry of one application of an update."""
    previous_entry = None
    if previous is not None:
        fields = ((f.name, f.value) for f in previous.stanza.fields)
        previous_entry = format_stanza(fields)
    return JournalEntry(name, previous_release, new_release, previous_entry)


def collect_garbage(paths: AppPaths) -> None:
    """Delete what an interrupted update left behind: releases that ``current`` does
    not point to, and application directories without ``current`` that the database
    does not list. Call it with the lock held."""
    try:
        names = sorted(os.listdir(paths.root))
    except FileNotFoundError:
        return
    installed = load_status(paths.database).packages
    for name in names:
        app_dir = paths.app_dir(name)
        if name.startswith(".") or not os.path.isdir(app_dir):
            continue
        try:
            release = current_release(paths, name)
        except AppError as exc:
            log.error("%s; leaving %s as it is", exc, app_dir)
            continue
        if release is None:
            if name in installed:
                log.error("app %s is installed but %s is missing", name, CURRENT)
            else:
                log.info("removing %s, left over from an interrupted install", app_dir)
                _remove_tree(app_dir)
            continue
        for entry in os.listdir(app_dir):
            if entry not in (CURRENT, release):
                log.info("removing %s/%s, left over from an update", app_dir, entry)
                _remove_tree(os.path.join(app_dir, entry))


def _remove_tree(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except OSError as exc:
        log.error("cannot remove %s: %s", path, exc)


# -- start, stop, list ----------------------------------------------------------------


def start_apps(
    paths: AppPaths,
    supervisor: Supervisor,
    names: Sequence[str] = (),
    *,
    wait: bool = True,
) -> list[str]:
    """Start installed applications that are not running: ``names``, or all.

    First finishes an interrupted update (`recover`). With ``wait``, each started
    application must keep running for its health window. Returns one line per
    application for the report.

    Raises:
        AppError: a named application is not installed, or an application failed
            to start; the others were still started. The message names each one.
    """
    if not os.path.isdir(paths.root):
        if names:
            raise AppError(f"app {names[0]} is not installed")
        return []
    lines: list[str] = []
    failures: list[str] = []
    windows: list[tuple[str, str, float]] = []
    with locked(paths):
        recover(paths, supervisor)
        database = load_status(paths.database)
        for name in _selected(database.packages, names):
            line = _start_one(paths, supervisor, name, windows, failures)
            if line:
                lines.append(line)
    for label, reason in wait_healthy(supervisor, windows) if wait else []:
        failures.append(f"app {label} failed to start: {reason}")
    if failures:
        raise AppError("\n".join(failures))
    return lines


def _start_one(
    paths: AppPaths,
    supervisor: Supervisor,
    name: str,
    windows: list[tuple[str, str, float]],
    failures: list[str],
) -> str | None:
    state = supervisor.state(name)
    if state.state != STOPPED:
        return f"app {name} is already {state.state}"
    try:
        release = current_release(paths, name)
        if release is None:
            raise AppError(f"app {name} is installed but has no {CURRENT} link")
        control, state = start_release(paths, supervisor, name, release)
    except AppError as exc:
        log.error("%s", exc)
        failures.append(str(exc))
        return None
    windows.append((name, control.label, time.monotonic() + control.health_window))
    pid = "" if state.pid is None else f" (pid {state.pid})"
    return f"app {control.label} started{pid}"


def stop_apps(
    paths: AppPaths, supervisor: Supervisor, names: Sequence[str] = ()
) -> list[str]:
    """Stop running applications: ``names``, or all installed ones.

    Raises:
        AppError: a named application is not installed, or one could not be
            stopped.
    """
    if not os.path.isdir(paths.root):
        if names:
            raise AppError(f"app {names[0]} is not installed")
        return []
    lines = []
    with locked(paths):
        database = load_status(paths.database)
        for name in _selected(database.packages, names):
            release = current_release(paths, name)
            outcome = supervisor.stop(name, stop_timeout(paths, name, release))
            lines.append(f"app {name} {outcome}")
    return lines


def _selected(
    installed: dict[str, InstalledPackage], names: Sequence[str]
) -> list[str]:
    for name in names:
        if name not in installed:
            known = ", ".join(sorted(installed)) or "none"
            raise AppError(f"app {name} is not installed (installed: {known})")
    return list(names) or sorted(installed)


@dataclass(frozen=True)
class AppStatus:
    """One installed application for ``mbl-update status``."""

    name: str
    version: str
    architecture: str
    state: str
    pid: int | None
    release: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "architecture": self.architecture,
            "state": self.state,
            "pid": self.pid,
            "release": self.release,
        }


@dataclass(frozen=True)
class AppListing:
    """Installed applications and the database stanzas that could not be read."""

    database: str
    apps: tuple[AppStatus, ...]
    issues: tuple[DatabaseIssue, ...]


def list_apps(paths: AppPaths, supervisor: Supervisor) -> AppListing:
    """List the installed applications with their process state. Read only.

    Raises:
        AppError: the database exists but cannot be read.
    """
    database = load_status(paths.database, warn=False)
    apps = []
    for name, package in sorted(database.packages.items()):
        try:
            release = current_release(paths, name)
        except AppError as exc:
            log.warning("%s", exc)
            release = None
        state = supervisor.state(name)
        apps.append(
            AppStatus(
                name=name,
                version=str(package.version),
                architecture=package.architecture,
                state=state.state,
                pid=state.pid if state.state == RUNNING else None,
                release=release,
            )
        )
    return AppListing(paths.database, tuple(apps), database.issues)
