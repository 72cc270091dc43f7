"""Tests for the installed-package database: tolerant loading with line numbers,
round trips and atomic rewrites."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from updater.control import parse_stanzas
from updater.errors import AppError
from updater.opkg_status import (
    format_status,
    load_status,
    new_entry,
    parse_status,
    write_status,
)

VALID = """\
Package: hello
Version: 1.0.0
Depends: libfoo (>= 1.2)
Status: install ok installed
Architecture: arm64
Installed-Time: 1764860000
X-Vendor-Field: kept as it is

Package: world
Version: 2.0-r1
Provides: greeter
Status: install ok installed
Architecture: all
Installed-Time: 1764860001
"""

# The file ends with a blank line and a bare "Package:" with no value.
BROKEN_TAIL = VALID + "\nPackage:\n"


def test_broken_stanza_reported_with_line(tmp_path: Path) -> None:
    path = tmp_path / "status"
    path.write_text(BROKEN_TAIL)
    database = load_status(str(path))
    assert sorted(database.packages) == ["hello", "world"]
    assert [(issue.line, issue.message) for issue in database.issues] == [
        (16, "line 16: field Package is empty; stanza ignored")
    ]
    hello = database.packages["hello"]
    assert str(hello.version) == "1.0.0"
    assert hello.architecture == "arm64"
    assert [str(r) for entry in hello.depends for r in entry] == ["libfoo (>= 1.2)"]
    assert [str(p) for p in database.packages["world"].provides] == ["greeter"]


def test_broken_stanza_dropped_on_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "status"
    path.write_text(BROKEN_TAIL)
    database = load_status(str(path))
    write_status(str(path), database.packages.values())
    assert path.read_text() == VALID
    again = load_status(str(path))
    assert again.issues == ()
    assert again.packages.keys() == database.packages.keys()


def test_round_trip_keeps_unknown_fields() -> None:
    database = parse_status(VALID, "status")
    assert format_status(database.packages.values()) == VALID


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("Version: 1\nStatus: install ok installed\n", 1, "no Package field"),
        ("Package: a1\nStatus: install ok installed\n", 1, "no Version field"),
        ("Package: a1\nVersion: 1\n", 1, "no Status field"),
        ("Package: a1\nVersion: 1/2\nStatus: install ok installed\n", 2, "version"),
        ("Package: A_1\nVersion: 1\nStatus: install ok installed\n", 1, "name"),
        (
            "Package: a1\nVersion: 1\nDepends: x\nStatus: install ok installed\n",
            3,
            "invalid relation",
        ),
        (
            "Package: a1\nVersion: 1\nStatus: deinstall ok not-installed\n",
            1,
            "not 'install ok installed'",
        ),
        ("Package: a1\nbroken\n", 2, "expected 'Name: value'"),
    ],
)
def test_invalid_stanzas_reported(text: str, line: int, message: str) -> None:
    database = parse_status(VALID + "\n" + text, "status")
    assert sorted(database.packages) == ["hello", "world"]
    (issue,) = database.issues
    assert issue.line == 15 + line
    assert message in issue.message
    assert issue.message.startswith(f"line {15 + line}: ")


def test_second_stanza_for_package_reported() -> None:
    text = VALID + "\nPackage: hello\nVersion: 9\nStatus: install ok installed\n"
    database = parse_status(text, "status")
    assert str(database.packages["hello"].version) == "1.0.0"
    (issue,) = database.issues
    assert issue.message == (
        "line 16: second stanza for package hello (first on line 1); stanza ignored"
    )


def test_missing_file_is_empty(tmp_path: Path) -> None:
    database = load_status(str(tmp_path / "nothing"))
    assert database.packages == {}
    assert database.issues == ()


def test_unreadable_file_raises(tmp_path: Path) -> None:
    with pytest.raises(AppError, match="cannot read the application database"):
        load_status(str(tmp_path))


def test_new_entry_from_control() -> None:
    stanzas, _ = parse_stanzas(
        "Package: hello\nVersion: 2.0\nArchitecture: all\nDepends: libfoo\n"
        "Description: not copied\nApp-Exec: bin/hello\n"
    )
    entry = new_entry(stanzas[0], 1764860099)
    assert format_status([entry]) == (
        "Package: hello\nVersion: 2.0\nDepends: libfoo\n"
        "Status: install ok installed\nArchitecture: all\n"
        "Installed-Time: 1764860099\n"
    )


def test_rewrite_sorted_and_directory_created(tmp_path: Path) -> None:
    path = tmp_path / "new" / ".opkg" / "status"
    database = parse_status(VALID, "status")
    write_status(str(path), reversed(list(database.packages.values())))
    assert path.read_text() == VALID
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_failed_rewrite_keeps_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "status"
    path.write_text(BROKEN_TAIL)
    database = load_status(str(path))

    def failing_rename(source: str, target: str) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(AppError, match="previous database is unchanged"):
        write_status(str(path), list(database.packages.values())[:1])
    assert path.read_text() == BROKEN_TAIL
    assert os.listdir(tmp_path) == ["status"]


def test_rewrite_syncs_file_then_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "status"
    calls: list[str] = []
    real_fsync = os.fsync
    real_rename = os.rename

    def fsync(fd: int) -> None:
        kind = "directory" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"
        calls.append(f"fsync {kind}")
        real_fsync(fd)

    def rename(source: str, target: str) -> None:
        calls.append("rename")
        real_rename(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    write_status(str(path), parse_status(VALID, "status").packages.values())
    assert calls == ["fsync file", "rename", "fsync directory"]
