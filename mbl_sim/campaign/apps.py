"""Host check of installed applications, with the updater's own readers.

Applications live under ``/app`` of the home partition (``/home/app`` on the
device; see ``updater.apps``). The check cuts the partition out of the state's disk,
replays its journal and copies ``/app`` out with ``debugfs rdump``. Then it reads
the copy as the device would at its next boot, with the installed-package database
(``updater.opkg_status.load_status``), the update journal
(``updater.apps.read_journal``) and each ``current`` link
(``updater.apps.current_release``). An application named in the journal counts at
its previous release and database entry, because ``updater.apps.recover`` puts it
back there before any application starts.

A state is good when the database parses without issues, every application's
running release has a control file whose version equals its database entry, and,
when the recording knows them, the versions of all applications together are
either all those before the update or all those after it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from mbl_sim.campaign.ext4 import replay_journal, run_tool
from updater.apps import (
    AppPaths,
    JournalEntry,
    current_release,
    read_journal,
    read_release_control,
)
from updater.control import parse_stanzas
from updater.errors import AppError
from updater.opkg_status import InstalledPackage, load_status, package_from_stanza

__all__ = ["APPS_PARTITION", "AppsState", "inspect_apps"]

log = logging.getLogger(__name__)

APPS_PARTITION = "home"
APPS_DIRECTORY = "app"
"""The applications' directory at the root of the home partition."""


@dataclass
class AppsState:
    """The applications of one state, as the device would run them after recovery.

    Attributes:
        versions: the version of each installed application, by name.
        problems: what is inconsistent.
    """

    versions: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _copy_out(image: Path, directory: Path) -> Path | None:
    directory.mkdir(parents=True, exist_ok=True)
    run_tool(["debugfs", "-R", f"rdump /{APPS_DIRECTORY} {directory}", image])
    root = directory / APPS_DIRECTORY
    return root if root.is_dir() else None


def _previous_package(entry: JournalEntry) -> InstalledPackage | None:
    if entry.previous_entry is None:
        return None
    stanzas, _issues = parse_stanzas(entry.previous_entry)
    return package_from_stanza(stanzas[0]) if stanzas else None


def _running(
    paths: AppPaths,
    name: str,
    journal: dict[str, JournalEntry],
    packages: dict[str, InstalledPackage],
    state: AppsState,
) -> tuple[str | None, InstalledPackage | None]:
    """Return the release and database entry of ``name`` after recovery."""
    if name in journal:
        entry = journal[name]
        return entry.previous_release, _previous_package(entry)
    try:
        release = current_release(paths, name)
    except AppError as error:
        state.problems.append(str(error))
        release = None
    return release, packages.get(name)


def _check_app(
    paths: AppPaths,
    name: str,
    release: str | None,
    package: InstalledPackage | None,
    state: AppsState,
) -> None:
    if release is None and package is None:
        return
    if release is None:
        assert package is not None
        state.problems.append(
            f"{name}: the database lists version {package.version}, but no release"
            " is current"
        )
        return
    if package is None:
        state.problems.append(
            f"{name}: release {release} is current, but the database has no entry"
        )
        return
    try:
        control = read_release_control(paths, name, release)
    except AppError as error:
        state.problems.append(str(error))
        return
    if str(control.version) != str(package.version):
        state.problems.append(
            f"{name}: release {release} is version {control.version}, the database"
            f" says {package.version}"
        )
        return
    state.versions[name] = str(package.version)


def inspect_apps(image: Path, scratch: Path) -> AppsState:
    """Read the applications of the home partition ``image`` (which this modifies:
    its journal is replayed) as the device would run them after recovery."""
    state = AppsState()
    problem = replay_journal(image)
    if problem is not None:
        state.problems.append(f"home partition: {problem}")
        return state
    root = _copy_out(image, scratch)
    if root is None:
        return state
    paths = AppPaths(root=str(root))
    database = load_status(paths.database, warn=False)
    state.problems += [
        f"application database, line {issue.line}: {issue.message}"
        for issue in database.issues
    ]
    try:
        entries = read_journal(paths) or []
    except AppError as error:
        state.problems.append(str(error))
        entries = []
    journal = {entry.name: entry for entry in entries}
    names = {name for name in os.listdir(root) if not name.startswith(".")}
    for name in sorted(names | set(database.packages) | set(journal)):
        release, package = _running(paths, name, journal, database.packages, state)
        _check_app(paths, name, release, package, state)
    return state
