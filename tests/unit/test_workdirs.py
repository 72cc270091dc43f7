"""Output directories: created when missing, refused when unusable, and cleaned on a
rerun only when an earlier run of mbl-sim claimed them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mbl_sim.errors import ConfigError
from mbl_sim.workdirs import claim_directory, writable_directory

MARKER = ".mbl-sim-test"


def test_writable_directory_creates_parents(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b"

    assert writable_directory(path, "--out") == path
    assert path.is_dir()


def test_writable_directory_rejects_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")

    with pytest.raises(ConfigError, match=r"--out .*file: not a directory"):
        writable_directory(path, "--out")


def test_writable_directory_rejects_uncreatable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")

    with pytest.raises(ConfigError, match="cannot create the directory"):
        writable_directory(blocker / "sub", "--out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any directory")
def test_writable_directory_rejects_read_only(tmp_path: Path) -> None:
    path = tmp_path / "ro"
    path.mkdir(mode=0o500)

    with pytest.raises(ConfigError, match="not writable"):
        writable_directory(path, "--out")


def test_claim_new_directory_then_rerun(tmp_path: Path) -> None:
    path = tmp_path / "out"

    assert claim_directory(path, MARKER, "--output") is False
    assert (path / MARKER).is_file()
    (path / "device").mkdir()
    assert claim_directory(path, MARKER, "--output") is True


def test_claim_refuses_foreign_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me\n")

    with pytest.raises(ConfigError, match="contains files that mbl-sim did not write"):
        claim_directory(tmp_path, MARKER, "--output")
    assert (tmp_path / "notes.txt").read_text() == "keep me\n"
    assert not (tmp_path / MARKER).exists()


def test_claim_empty_existing_directory(tmp_path: Path) -> None:
    assert claim_directory(tmp_path, MARKER, "--output") is False
