"""Install the applications of a payload as one transaction: all or nothing.

For the user an update of one application is: stop the running version, remove it,
install the new one, start it. To make that safe against failures and power cuts,
`install_apps` takes these steps (layout and recovery: `updater.apps`):

1. Check every package without writing anything: its wrapper and control file, the
   architecture, and every entry of its data (`updater.ipk`). Two packages of the
   same name are rejected.
2. Take the lock and finish an interrupted update (`updater.apps.recover`). Check
   that the payload, the installed applications that the payload keeps, or the
   root filesystem's package database (opkg's or dpkg's, where the image has one)
   provide every dependency. An installed application that would lose a dependency
   also rejects the payload. Then check that all packages fit into the free space
   of the applications partition together, because the running versions stay on
   disk until the new ones run.
3. Stage: unpack each package into a new release directory beside the running one,
   then sync. The running applications are not touched.
4. Write the journal with each application's previous and new release.
5. For each application, dependencies first: stop the running version (SIGTERM,
   SIGKILL after its stop timeout), point ``current`` at the new release (rename of
   a new symbolic link), start the new version.
6. Wait until every new version has kept running for its health window.
7. Write the new database and remove the journal. Removing the journal is the
   commit point. Then delete the previous releases.

If a step from 3 on fails before the journal is removed, every application of the
payload goes back. A new version that was started is stopped, and ``current``
points at the previous release again, or is removed after a first install. Then
the previous version is started, the new releases are deleted and the journal is
removed. The error names the application that failed, the reason, and what was
rolled back. Failing to delete a previous release after the commit is only logged,
because the next update or boot deletes it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import IO

from updater.apps import (
    CONTROL_FILE,
    CURRENT,
    DATA_DIRECTORY,
    AppPaths,
    accepted_architectures,
    current_release,
    journal_entry,
    locked,
    recover,
    start_release,
    stop_timeout,
    wait_healthy,
    write_journal,
)
from updater.control import (
    Dependency,
    Relation,
    Version,
    format_relations,
    format_stanza,
)
from updater.durable import remove_durably, replace_symlink
from updater.errors import AppError, PackageError, UpdaterError
from updater.ipk import AppControl, DataSummary, IpkPackage, open_ipk
from updater.opkg_status import (
    InstalledPackage,
    StatusDatabase,
    load_status,
    new_entry,
    write_status,
)
from updater.payload import Payload, PayloadKind
from updater.supervisor import STOPPED, Supervisor

log = logging.getLogger(__name__)

# Package databases of the root filesystem: their packages satisfy dependencies.
# NOTE: the mbl-sim image unpacks its Debian packages without dpkg and has neither
# file, so on it only applications satisfy dependencies.
SYSTEM_DATABASES = ("/var/lib/opkg/status", "/var/lib/dpkg/status")

Report = Callable[[str], None]


@dataclass
class _Change:
    """One application of the payload and how far the transaction got with it."""

    package: IpkPackage
    summary: DataSummary
    previous: InstalledPackage | None = None
    previous_release: str | None = None
    new_release: str | None = None
    stopped: bool = False
    switched: bool = False
    started: bool = False
    health_end: float = 0.0

    @property
    def control(self) -> AppControl:
        return self.package.control

    @property
    def name(self) -> str:
        return self.package.control.name

    @property
    def previous_label(self) -> str:
        if self.previous is None:
            return "not installed"
        return str(self.previous.version)


def install_apps(
    payload: Payload,
    paths: AppPaths,
    *,
    supervisor: Supervisor | None = None,
    machine: str | None = None,
    system_databases: Sequence[str] = SYSTEM_DATABASES,
    report: Report = lambda line: None,
) -> list[InstalledPackage]:
    """Install every application package of ``payload``, all or nothing.

    ``machine`` replaces ``uname -m`` and ``system_databases`` the root filesystem's
    package databases, for tests. ``report`` receives one line per step.

    Raises:
        PackageError: a package is invalid, built for another architecture, has a
            dependency that is not provided, or does not fit. Nothing was changed.
        AppError: staging, stopping, starting or the health window failed. Every
            application of the payload is back at its previous version.
    """
    if payload.kind is not PayloadKind.APPS:
        raise PackageError(f"payload {payload.path} contains no application packages")
    supervisor = supervisor or Supervisor(paths.supervisor)
    architectures = accepted_architectures(machine)
    with _open_payload(payload) as archive:
        changes = _check_packages(archive, payload, architectures, paths.root)
        report(
            f"checked {len(changes)} packages: "
            + ", ".join(change.control.label for change in changes)
        )
        fresh = not os.path.isdir(paths.root)
        with locked(paths):
            _restart(paths, supervisor, recover(paths, supervisor))
            database = load_status(paths.database)
            try:
                _attach_installed(changes, database, paths)
                _check_dependencies(changes, database, system_databases)
                ordered = _dependency_order(changes)
                _check_space(ordered, paths, database)
            except PackageError:
                if fresh:
                    _remove_empty_root(paths)
                raise
            transaction = _Transaction(ordered, paths, supervisor, database, report)
            return transaction.run()


def _remove_empty_root(paths: AppPaths) -> None:
    """Remove the directories that taking the lock created on a device without
    applications, so a rejected payload leaves nothing behind."""
    for directory in (os.path.dirname(paths.database), paths.root):
        try:
            os.rmdir(directory)
        except OSError as exc:
            log.debug("keeping %s: %s", directory, exc)


# -- checks ---------------------------------------------------------------------------


def _open_payload(payload: Payload) -> tarfile.TarFile:
    try:
        return tarfile.open(payload.path, mode="r:*")
    except (OSError, tarfile.TarError) as exc:
        raise PackageError(f"cannot open payload {payload.path}: {exc}") from exc


def _check_packages(
    archive: tarfile.TarFile,
    payload: Payload,
    architectures: Sequence[str],
    root: str,
) -> list[_Change]:
    block_size = _statvfs(root).f_frsize
    changes: list[_Change] = []
    names: dict[str, str] = {}
    for member in payload.members:
        package = open_ipk(
            _member_stream(archive, payload, member.tar_name), member.name
        )
        control = package.control
        if control.architecture not in architectures:
            raise PackageError(
                f"{member.name}: package {control.label} is built for architecture"
                f" {control.architecture}; this device ({os.uname().machine}) runs"
                f" {', '.join(architectures)}"
            )
        if control.name in names:
            raise PackageError(
                f"payload {payload.path} contains package {control.name} twice"
                f" ({names[control.name]} and {member.name})"
            )
        names[control.name] = member.name
        if package.maintainer_scripts:
            log.warning(
                "%s: maintainer scripts %s are not run",
                member.name,
                ", ".join(package.maintainer_scripts),
            )
        changes.append(_Change(package, package.scan_data(block_size)))
    return changes


def _member_stream(archive: tarfile.TarFile, payload: Payload, name: str) -> IO[bytes]:
    try:
        stream = archive.extractfile(archive.getmember(name))
    except (KeyError, tarfile.TarError, OSError) as exc:
        raise PackageError(f"cannot read {name!r} from {payload.path}: {exc}") from exc
    if stream is None:
        raise PackageError(f"payload {payload.path}: {name!r} is not a regular file")
    return stream


def _statvfs(path: str) -> os.statvfs_result:
    """Return statvfs of ``path``, or of its nearest existing parent."""
    while True:
        try:
            return os.statvfs(path)
        except FileNotFoundError:
            parent = os.path.dirname(path)
            if parent == path:
                raise
            path = parent


def _attach_installed(
    changes: Iterable[_Change], database: StatusDatabase, paths: AppPaths
) -> None:
    for change in changes:
        change.previous = database.packages.get(change.name)
        change.previous_release = current_release(paths, change.name)


def _check_dependencies(
    changes: Sequence[_Change],
    database: StatusDatabase,
    system_databases: Sequence[str],
) -> None:
    replaced = {change.name for change in changes}
    providers: dict[str, list[Version | None]] = {}
    for path in system_databases:
        for package in load_status(path).packages.values():
            _add_provider(providers, package.name, package.version, package.provides)
    kept = [p for name, p in database.packages.items() if name not in replaced]
    for package in kept:
        _add_provider(providers, package.name, package.version, package.provides)
    for change in changes:
        control = change.control
        _add_provider(providers, control.name, control.version, control.provides)
    for change in changes:
        for entry in change.control.depends:
            if not _satisfied(entry, providers):
                raise PackageError(
                    f"{change.package.source}: package {change.control.label} depends"
                    f" on {format_relations([entry])}, which neither the payload nor"
                    f" the device provides{_available(entry, providers)}; nothing was"
                    " changed"
                )
    for package in kept:
        for entry in package.depends:
            if not _satisfied(entry, providers):
                raise PackageError(
                    f"the payload would break installed app {package.name}"
                    f" {package.version}: it depends on {format_relations([entry])}"
                    f"{_available(entry, providers)}; nothing was changed"
                )


def _add_provider(
    providers: dict[str, list[Version | None]],
    name: str,
    version: Version,
    provides: Iterable[Relation],
) -> None:
    providers.setdefault(name, []).append(version)
    for relation in provides:
        providers.setdefault(relation.name, []).append(relation.version)


def _satisfied(entry: Dependency, providers: dict[str, list[Version | None]]) -> bool:
    return any(
        relation.satisfied_by(version)
        for relation in entry
        for version in providers.get(relation.name, [])
    )


def _available(entry: Dependency, providers: dict[str, list[Version | None]]) -> str:
    found = [
        f"{relation.name} {version or '(virtual)'}"
        for relation in entry
        for version in providers.get(relation.name, [])
    ]
    return f" (available: {', '.join(found)})" if found else ""


def _dependency_order(changes: Sequence[_Change]) -> list[_Change]:
    """Order ``changes`` so that an application comes after the applications of the
    payload it depends on; a dependency cycle keeps the payload order."""
    remaining = list(changes)
    ordered: list[_Change] = []
    while remaining:
        ready = [change for change in remaining if not _waits(change, remaining)]
        chosen = ready[0] if ready else remaining[0]
        remaining.remove(chosen)
        ordered.append(chosen)
    return ordered


def _waits(change: _Change, remaining: Sequence[_Change]) -> bool:
    """Return whether ``change`` depends on another application in ``remaining``."""
    others: set[str] = set()
    for other in remaining:
        if other is not change:
            others.add(other.name)
            others.update(relation.name for relation in other.control.provides)
    return any(
        relation.name in others
        for entry in change.control.depends
        for relation in entry
    )


def _check_space(
    changes: Sequence[_Change], paths: AppPaths, database: StatusDatabase
) -> None:
    stats = _statvfs(paths.root)
    block = stats.f_frsize
    free_bytes = stats.f_bavail * block
    free_inodes = stats.f_favail
    # The new database and the journal, each at most the old database plus the
    # new control files, and two inodes.
    control_bytes = sum(len(_control_text(c.control)) for c in changes)
    needed = 2 * _blocks(_file_size(database.path) + 2 * control_bytes, block)
    inodes = 2
    for change in changes:
        # Release directory, data directory, control file, and the application's
        # directory for a first install, on top of what the data needs.
        own = change.summary.space_bytes + 3 * block
        own += _blocks(len(_control_text(change.control)), block)
        own_inodes = change.summary.inodes + 4
        needed += own
        inodes += own_inodes
        if needed > free_bytes:
            raise PackageError(
                f"not enough free space in {paths.root} for package"
                f" {change.control.label} ({change.package.source}): it needs"
                f" {own} bytes unpacked ({change.summary.file_bytes} bytes of file"
                f" data), the payload needs {needed} bytes up to and including it, but"
                f" only {free_bytes} bytes are free; nothing was changed"
            )
        if inodes > free_inodes:
            raise PackageError(
                f"not enough free inodes in {paths.root} for package"
                f" {change.control.label} ({change.package.source}): the payload needs"
                f" {inodes} up to and including it, {free_inodes} are free; nothing"
                " was changed"
            )
    log.info(
        "space: the payload needs %d bytes and %d inodes, %d bytes and %d inodes free",
        needed,
        inodes,
        free_bytes,
        free_inodes,
    )


def _blocks(size: int, block: int) -> int:
    return -(-size // block) * block


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _control_text(control: AppControl) -> str:
    return format_stanza((field.name, field.value) for field in control.stanza.fields)


def _restart(paths: AppPaths, supervisor: Supervisor, names: Iterable[str]) -> None:
    """Start applications that `recover` put back to their previous release."""
    for name in names:
        release = current_release(paths, name)
        if release is None:
            continue
        try:
            start_release(paths, supervisor, name, release)
        except AppError as exc:
            log.error("after recovering an interrupted update: %s", exc)


# -- the transaction ------------------------------------------------------------------


class _Transaction:
    """Steps 3 to 7 of the module docstring for checked, ordered changes."""

    def __init__(
        self,
        changes: list[_Change],
        paths: AppPaths,
        supervisor: Supervisor,
        database: StatusDatabase,
        report: Report,
    ) -> None:
        self.changes = changes
        self.paths = paths
        self.supervisor = supervisor
        self.database = database
        self.report = report
        self.database_written = False

    def run(self) -> list[InstalledPackage]:
        self._stage()
        try:
            self._write_journal()
            self._switch()
            self._wait_healthy()
            entries = self._write_database()
            remove_durably(self.paths.journal)
        except (UpdaterError, OSError) as exc:
            self._roll_back(exc)
        except BaseException as exc:
            self._roll_back_quietly(exc)
            raise
        self._remove_previous_releases()
        self.report(
            "installed "
            + ", ".join(change.control.label for change in self.changes)
            + "; all running"
        )
        return entries

    # -- forward steps

    def _stage(self) -> None:
        try:
            for change in self.changes:
                self._stage_one(change)
            os.sync()
        except BaseException as exc:
            self._remove_new_releases()
            if isinstance(exc, (UpdaterError, OSError)):
                raise AppError(
                    f"staging failed: {exc}; the new files were removed and the"
                    " running apps were not touched"
                ) from exc
            raise

    def _stage_one(self, change: _Change) -> None:
        release = _unused_release_name(self.paths, change.name, change.control.version)
        release_dir = self.paths.release_dir(change.name, release)
        os.makedirs(self.paths.app_dir(change.name), exist_ok=True)
        os.mkdir(release_dir, 0o755)
        change.new_release = release
        data_dir = os.path.join(release_dir, DATA_DIRECTORY)
        os.mkdir(data_dir, 0o755)
        entries = change.package.extract_data(data_dir)
        with open(
            os.path.join(release_dir, CONTROL_FILE), "w", encoding="utf-8"
        ) as file:
            file.write(_control_text(change.control))
        self.report(
            f"staged {change.control.label} in {release_dir} ({entries} entries,"
            f" {change.summary.file_bytes} bytes)"
        )

    def _write_journal(self) -> None:
        entries = []
        for change in self.changes:
            assert change.new_release is not None
            entries.append(
                journal_entry(
                    change.name,
                    change.previous_release,
                    change.new_release,
                    change.previous,
                )
            )
        write_journal(self.paths, entries)

    def _switch(self) -> None:
        for change in self.changes:
            self._stop_previous(change)
            assert change.new_release is not None
            replace_symlink(self.paths.current_link(change.name), change.new_release)
            change.switched = True
            control, state = start_release(
                self.paths, self.supervisor, change.name, change.new_release
            )
            change.started = True
            change.health_end = time.monotonic() + control.health_window
            pid = "" if state.pid is None else f" (pid {state.pid})"
            self.report(
                f"{change.name}: started {control.version}{pid}; health window"
                f" {control.health_window:g} s"
            )

    def _stop_previous(self, change: _Change) -> None:
        running = self.supervisor.state(change.name).state != STOPPED
        if change.previous_release is None and not running:
            return
        timeout = stop_timeout(self.paths, change.name, change.previous_release)
        outcome = self.supervisor.stop(change.name, timeout)
        change.stopped = True
        self.report(f"{change.name}: {change.previous_label} {outcome}")

    def _wait_healthy(self) -> None:
        windows = [(c.name, c.control.label, c.health_end) for c in self.changes]
        failures = wait_healthy(self.supervisor, windows)
        if failures:
            raise AppError(
                "; ".join(
                    f"app {label} failed to start: {reason}"
                    for label, reason in failures
                )
            )

    def _write_database(self) -> list[InstalledPackage]:
        packages = dict(self.database.packages)
        now = int(time.time())
        entries = []
        for change in self.changes:
            try:
                entry = new_entry(change.control.stanza, now)
            except ValueError as exc:
                raise AppError(f"cannot record {change.control.label}: {exc}") from exc
            packages[change.name] = entry
            entries.append(entry)
        write_status(self.paths.database, packages.values())
        self.database_written = True
        return entries

    def _remove_previous_releases(self) -> None:
        for change in self.changes:
            if change.previous_release not in (None, change.new_release):
                _remove_release(self.paths, change.name, change.previous_release)

    # -- rollback

    def _roll_back(self, error: BaseException) -> None:
        problems = self._undo()
        summary = ", ".join(
            f"{change.name} to {change.previous_label}" for change in self.changes
        )
        message = f"{error}\nrolled back every app of the payload: {summary}"
        if problems:
            message += "\nproblems during the rollback:\n" + "\n".join(
                f"  {problem}" for problem in problems
            )
        raise AppError(message) from error

    def _roll_back_quietly(self, error: BaseException) -> None:
        log.error("interrupted (%s); rolling back", type(error).__name__)
        for problem in self._undo():
            log.error("problem during the rollback: %s", problem)

    def _undo(self) -> list[str]:
        problems: list[str] = []
        for change in reversed(self.changes):
            self._undo_switch(change, problems)
        restarted = []
        for change in self.changes:
            window = self._restart_previous(change, problems)
            if window is not None:
                restarted.append(window)
        if self.database_written:
            try:
                write_status(self.paths.database, self.database.packages.values())
            except AppError as exc:
                problems.append(str(exc))
        for label, reason in wait_healthy(self.supervisor, restarted):
            problems.append(f"previous version {label} failed to start again: {reason}")
        self._remove_new_releases()
        try:
            remove_durably(self.paths.journal)
        except OSError as exc:
            problems.append(
                f"cannot remove the journal ({exc}); the next boot repeats the rollback"
            )
        return problems

    def _undo_switch(self, change: _Change, problems: list[str]) -> None:
        if change.started:
            try:
                self.supervisor.stop(change.name, change.control.stop_timeout)
            except AppError as exc:
                problems.append(str(exc))
        if not change.switched:
            return
        link = self.paths.current_link(change.name)
        try:
            if change.previous_release is None:
                remove_durably(link)
            else:
                replace_symlink(link, change.previous_release)
        except OSError as exc:
            problems.append(f"cannot point {link} back: {exc}")

    def _restart_previous(
        self, change: _Change, problems: list[str]
    ) -> tuple[str, str, float] | None:
        if change.previous_release is None or not (change.stopped or change.switched):
            return None
        try:
            control, _ = start_release(
                self.paths, self.supervisor, change.name, change.previous_release
            )
        except AppError as exc:
            problems.append(str(exc))
            return None
        self.report(f"{change.name}: rolled back to {control.version}")
        return change.name, control.label, time.monotonic() + control.health_window

    def _remove_new_releases(self) -> None:
        for change in self.changes:
            if change.new_release is None:
                continue
            _remove_release(self.paths, change.name, change.new_release)
            app_dir = self.paths.app_dir(change.name)
            if change.previous_release is None and not os.path.lexists(
                os.path.join(app_dir, CURRENT)
            ):
                try:
                    os.rmdir(app_dir)
                except OSError as exc:
                    log.error("cannot remove %s: %s", app_dir, exc)


def _unused_release_name(paths: AppPaths, name: str, version: Version) -> str:
    """Return ``VERSION``, or ``VERSION_2``, ``VERSION_3``… if it is taken (a
    reinstall of the running version)."""
    release = str(version)
    number = 1
    while os.path.lexists(paths.release_dir(name, release)):
        number += 1
        release = f"{version}_{number}"
    return release


def _remove_release(paths: AppPaths, name: str, release: str) -> None:
    path = paths.release_dir(name, release)
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.error(
            "cannot remove %s (removed at the next update or boot): %s", path, exc
        )
        return
    log.info("removed %s", path)
