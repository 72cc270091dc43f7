"""``mbl-sim board new``: where it writes the board file and what it prints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mbl_sim.board import load_board
from mbl_sim.cli import main

EXIT_USAGE = 2


def board_new(*options: str) -> int:
    return main(["board", "new", "ok-board", *options])


def test_board_new_prints_loadable_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)

    status = board_new()

    assert status == 0
    output = capsys.readouterr().out
    match = re.search(r"then run: mbl-sim certify (\S+)", output)
    assert match is not None
    assert match[1] == "ok-board.yaml"
    assert load_board(match[1]).name == "ok-board"


def test_board_new_output_without_suffix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)

    status = board_new("--output", "ok-board")

    assert status == EXIT_USAGE
    error = capsys.readouterr().err
    assert "--output ok-board: a board file's name must be" in error
    assert "--output ok-board.yaml" in error
    assert not (tmp_path / "ok-board").exists()


def test_board_new_missing_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "sub" / "ok-board.yaml"

    status = board_new("--output", str(output))

    assert status == EXIT_USAGE
    error = capsys.readouterr().err
    assert f"directory {tmp_path / 'sub'} not found; create it first" in error


def test_board_new_parent_is_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("")

    status = board_new("--output", str(tmp_path / "file" / "ok-board.yaml"))

    assert status == EXIT_USAGE
    assert f"{tmp_path / 'file'} is not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_board_new_output_is_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], force: list[str]
) -> None:
    directory = tmp_path / "ok-board.yaml"
    directory.mkdir()

    status = board_new("--output", str(directory), *force)

    assert status == EXIT_USAGE
    error = capsys.readouterr().err
    assert f"board file {directory} is a directory" in error
    assert f"--output {directory / 'ok-board.yaml'}" in error


def test_board_new_unwritable_location(capsys: pytest.CaptureFixture[str]) -> None:
    # procfs rejects a new file at its top level, even from root.
    status = board_new("--output", "/proc/ok-board.yaml")

    assert status == EXIT_USAGE
    assert "cannot write board file /proc/ok-board.yaml: " in capsys.readouterr().err
