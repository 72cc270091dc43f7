"""Tests for the campaign's application check: a home partition read as the device
would run its applications after the recovery at boot."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from mbl_sim.campaign.apps import inspect_apps
from mbl_sim.ipk import ShellApp, control_text

pytestmark = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("mke2fs", "e2fsck", "debugfs")),
    reason="needs mke2fs, e2fsck and debugfs (Debian package e2fsprogs)",
)


def status_stanza(name: str, version: str) -> str:
    return (
        f"Package: {name}\nVersion: {version}\nStatus: install ok installed\n"
        "Architecture: all\n"
    )


def add_release(root: Path, name: str, version: str) -> None:
    release = root / "app" / name / version
    (release / "data").mkdir(parents=True)
    (release / "control").write_text(
        control_text(ShellApp(name, version).control_fields())
    )


def home_image(tmp_path: Path, status: str, current: dict[str, str]) -> Path:
    """Make a home partition image whose /app has releases 1.0.0 and 2.0.0 of each
    app in ``current`` (name → the release ``current`` points to)."""
    root = tmp_path / "home"
    (root / "app" / ".opkg").mkdir(parents=True, exist_ok=True)
    (root / "app" / ".opkg" / "status").write_text(status)
    for name, release in current.items():
        add_release(root, name, "1.0.0")
        add_release(root, name, "2.0.0")
        (root / "app" / name / "current").symlink_to(release)
    image = tmp_path / "home.img"
    subprocess.run(
        ["mke2fs", "-F", "-q", "-t", "ext4", "-d", str(root), str(image), "8M"],
        check=True,
    )
    return image


def write_journal(tmp_path: Path, entries: list[dict[str, object]]) -> None:
    journal = tmp_path / "home" / "app" / ".opkg" / "transaction.json"
    journal.write_text(json.dumps({"format": 1, "apps": entries}))


def test_apps_consistent(tmp_path: Path) -> None:
    status = status_stanza("alpha", "2.0.0") + "\n" + status_stanza("beta", "1.0.0")
    image = home_image(tmp_path, status, {"alpha": "2.0.0", "beta": "1.0.0"})

    apps = inspect_apps(image, tmp_path / "scratch")

    assert apps.problems == []
    assert apps.versions == {"alpha": "2.0.0", "beta": "1.0.0"}


def test_apps_journal_puts_back_previous(tmp_path: Path) -> None:
    root = tmp_path / "home"
    status = status_stanza("alpha", "2.0.0")
    entry = {
        "name": "alpha",
        "previous_release": "1.0.0",
        "new_release": "2.0.0",
        "previous_entry": status_stanza("alpha", "1.0.0"),
    }
    (root / "app" / ".opkg").mkdir(parents=True)
    write_journal(tmp_path, [entry])
    image = home_image(tmp_path, status, {"alpha": "2.0.0"})

    apps = inspect_apps(image, tmp_path / "scratch")

    assert apps.problems == []
    assert apps.versions == {"alpha": "1.0.0"}


def test_apps_database_disagrees_with_release(tmp_path: Path) -> None:
    image = home_image(tmp_path, status_stanza("alpha", "1.0.0"), {"alpha": "2.0.0"})

    apps = inspect_apps(image, tmp_path / "scratch")

    assert apps.problems == [
        "alpha: release 2.0.0 is version 2.0.0, the database says 1.0.0"
    ]
    assert apps.versions == {}


def test_apps_database_broken_stanza(tmp_path: Path) -> None:
    status = status_stanza("alpha", "1.0.0") + "\nPackage:\n"
    image = home_image(tmp_path, status, {"alpha": "1.0.0"})

    apps = inspect_apps(image, tmp_path / "scratch")

    assert len(apps.problems) == 1
    assert apps.problems[0].startswith("application database, line 6:")
    assert apps.versions == {"alpha": "1.0.0"}


def test_apps_current_without_database_entry(tmp_path: Path) -> None:
    image = home_image(tmp_path, "", {"alpha": "1.0.0"})

    apps = inspect_apps(image, tmp_path / "scratch")

    assert apps.problems == [
        "alpha: release 1.0.0 is current, but the database has no entry"
    ]


def test_apps_none_installed(tmp_path: Path) -> None:
    image = tmp_path / "home.img"
    subprocess.run(["mke2fs", "-F", "-q", "-t", "ext4", str(image), "8M"], check=True)

    apps = inspect_apps(image, tmp_path / "scratch")

    assert apps.problems == []
    assert apps.versions == {}
