"""The database of installed applications, kept in opkg's status-file format.

The file is a list of stanzas in Debian control syntax, one per installed package,
as opkg keeps them in its ``status`` file::

    Package: hello
    Version: 1.0.0
    Depends: libfoo (>= 1.2)
    Status: install ok installed
    Architecture: arm64
    Installed-Time: 1764860000

Loading is tolerant, because an unreadable database must not stop the device from
starting its apps or reporting its state. A stanza with a syntax error, an empty or
invalid ``Package``, an invalid ``Version`` or ``Depends``, or a second stanza for the
same package is left out and reported as a `DatabaseIssue` with its line number.
Stanzas whose ``Status`` is not ``install ok installed`` describe packages that are not
installed, so they are left out and reported too.

Writing replaces the file atomically (`updater.durable.write_atomically`), so after a
power cut it is exactly the old or the new file. A rewrite keeps the fields of the
entries it loaded, including fields it does not know, and drops the stanzas that
loading left out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from updater.control import (
    PACKAGE_NAME,
    Dependency,
    Relation,
    Stanza,
    Version,
    format_stanza,
    parse_provides,
    parse_relations,
    parse_stanzas,
    parse_version,
)
from updater.durable import write_atomically
from updater.errors import AppError

log = logging.getLogger(__name__)

STATUS_INSTALLED = "install ok installed"

_T = TypeVar("_T")

# Fields copied from a package's control file into its database entry, in this order,
# followed by Status, Architecture and Installed-Time.
_COPIED_FIELDS = ("Package", "Version", "Depends", "Provides")


@dataclass(frozen=True)
class InstalledPackage:
    """One installed package: the values the updater uses and the stanza they came
    from, which a rewrite keeps."""

    name: str
    version: Version
    architecture: str
    depends: tuple[Dependency, ...]
    provides: tuple[Relation, ...]
    stanza: Stanza


@dataclass(frozen=True)
class DatabaseIssue:
    """A stanza that loading left out: the line it is reported at and why."""

    line: int
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class StatusDatabase:
    """The loaded database: installed packages by name, and the stanzas left out."""

    path: str
    packages: dict[str, InstalledPackage]
    issues: tuple[DatabaseIssue, ...]


def load_status(path: str, *, warn: bool = True) -> StatusDatabase:
    """Read the database at ``path``; a missing file is an empty database.

    With ``warn``, each issue is logged as a warning.

    Raises:
        AppError: the file exists but cannot be read.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            text = file.read()
    except FileNotFoundError:
        return StatusDatabase(path, {}, ())
    except OSError as exc:
        raise AppError(f"cannot read the application database {path}: {exc}") from exc
    database = parse_status(text, path)
    for issue in database.issues if warn else ():
        log.warning("%s: %s", path, issue)
    return database


def parse_status(text: str, source: str) -> StatusDatabase:
    """Parse the text of a status file; ``source`` names it in messages."""
    stanzas, syntax_issues = parse_stanzas(text)
    issues = [
        DatabaseIssue(issue.line, f"{issue.message}; stanza ignored")
        for issue in syntax_issues
    ]
    packages: dict[str, InstalledPackage] = {}
    for stanza in stanzas:
        try:
            package = package_from_stanza(stanza)
        except EntryError as exc:
            issues.append(DatabaseIssue(exc.line, f"{exc}; stanza ignored"))
            continue
        if package is None:
            status = stanza.get("Status")
            issues.append(
                DatabaseIssue(
                    stanza.line,
                    f"line {stanza.line}: package {stanza.get('Package')} has status"
                    f" {status!r}, not {STATUS_INSTALLED!r}; stanza ignored",
                )
            )
            continue
        if package.name in packages:
            first = packages[package.name].stanza.line
            issues.append(
                DatabaseIssue(
                    stanza.line,
                    f"line {stanza.line}: second stanza for package {package.name}"
                    f" (first on line {first}); stanza ignored",
                )
            )
            continue
        packages[package.name] = package
    issues.sort(key=lambda issue: issue.line)
    return StatusDatabase(source, packages, tuple(issues))


def package_from_stanza(stanza: Stanza) -> InstalledPackage | None:
    """Return the installed package that ``stanza`` describes, or None if its
    ``Status`` is not ``install ok installed``.

    Raises:
        EntryError: ``Package``, ``Version`` or ``Status`` is missing or empty, or a
            value is invalid.
    """
    name = _required(stanza, "Package")
    if not PACKAGE_NAME.fullmatch(name):
        raise EntryError(_line(stanza, "Package"), f"invalid package name {name!r}")
    version = _parsed(stanza, "Version", parse_version)
    status = _required(stanza, "Status")
    if " ".join(status.split()) != STATUS_INSTALLED:
        return None
    depends = _parsed(stanza, "Depends", parse_relations, "")
    provides = _parsed(stanza, "Provides", parse_provides, "")
    return InstalledPackage(
        name=name,
        version=version,
        architecture=stanza.get("Architecture") or "",
        depends=depends,
        provides=provides,
        stanza=stanza,
    )


def new_entry(control: Stanza, installed_time: int) -> InstalledPackage:
    """Build the database entry for a package with the control stanza ``control``.

    Raises:
        ValueError: the control stanza lacks a valid ``Package`` or ``Version``.
    """
    fields = [(name, value) for name in _COPIED_FIELDS if (value := control.get(name))]
    fields += [
        ("Status", STATUS_INSTALLED),
        ("Architecture", control.get("Architecture") or ""),
        ("Installed-Time", str(installed_time)),
    ]
    stanzas, issues = parse_stanzas(format_stanza(fields))
    if issues or len(stanzas) != 1:
        raise ValueError(f"cannot build a database entry from {fields!r}")
    package = package_from_stanza(stanzas[0])
    if package is None:
        raise ValueError(f"database entry {fields!r} is not installed")
    return package


def format_status(packages: Iterable[InstalledPackage]) -> str:
    """Return the status file text for ``packages``, blank lines between stanzas."""
    stanzas = [
        format_stanza((field.name, field.value) for field in package.stanza.fields)
        for package in packages
    ]
    return "\n".join(stanzas)


def write_status(path: str, packages: Iterable[InstalledPackage]) -> None:
    """Replace the database at ``path`` with ``packages``, sorted by name.

    Raises:
        AppError: writing failed; the old file is unchanged.
    """
    ordered = sorted(packages, key=lambda package: package.name)
    text = format_status(ordered)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomically(path, text.encode())
    except OSError as exc:
        raise AppError(
            f"cannot write the application database {path}: {exc}; the previous"
            " database is unchanged"
        ) from exc
    log.info("wrote %s: %d packages", path, len(ordered))


class EntryError(ValueError):
    """A stanza that is not a valid database entry; ``line`` is where the problem is.

    The message starts with ``line N:``.
    """

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


def _line(stanza: Stanza, name: str) -> int:
    field = stanza.field(name)
    return stanza.line if field is None else field.line


def _required(stanza: Stanza, name: str) -> str:
    value = stanza.get(name)
    if value is None:
        raise EntryError(stanza.line, f"stanza has no {name} field")
    if not value:
        raise EntryError(_line(stanza, name), f"field {name} is empty")
    return value


def _parsed(
    stanza: Stanza, name: str, parse: Callable[[str], _T], default: str | None = None
) -> _T:
    value = stanza.get(name, default)
    if value is None:
        raise EntryError(stanza.line, f"stanza has no {name} field")
    try:
        return parse(value)
    except ValueError as exc:
        raise EntryError(_line(stanza, name), str(exc)) from None
