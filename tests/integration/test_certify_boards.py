"""``mbl-sim certify`` on real guests: each board passes, broken board files fail.

The passing run takes the board from ``--board`` (repeatable; default qemu-virt-a53),
so ``pytest --board rpi3 --board imx7-warp tests/integration/test_certify_boards.py``
certifies those boards. One SD-attached board, which boots without U-Boot and keeps its
boot state in flag files, is certified in every run as well, so that both boot-state
mechanisms and both storage kinds are covered. The broken board files are variants of
qemu-virt-a53, which every host that runs the integration tests can boot.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from mbl_sim.board import Board, load_board
from mbl_sim.certify import certify
from mbl_sim.cli import main

pytestmark = pytest.mark.qemu

BOARDS_DIR = Path(__file__).parents[2] / "mbl_sim" / "boards"
SD_BOARD = "imx6ul-evk"


def test_certify_passes(board: Board, tmp_path: Path) -> None:
    assert_certified(board, tmp_path)


def test_certify_sd_board_passes(tmp_path: Path) -> None:
    board = load_board(SD_BOARD)
    assert board.storage.interface == "sd"
    assert_certified(board, tmp_path)


def assert_certified(board: Board, tmp_path: Path) -> None:
    report = certify(board, tmp_path, report=print)

    failed = [r for r in report.results if r.status == "failed"]
    assert report.error == ""
    assert failed == [], (tmp_path / "report.md").read_text()
    assert report.verdict == "PASS"
    assert (tmp_path / "report.xml").is_file()
    assert "kernel release (running)" in report.facts
    assert "device tree model" in report.facts


def broken_board(tmp_path: Path, change: dict[str, Any]) -> Path:
    """Write a copy of qemu-virt-a53 with ``change`` ({section: {key: value}})."""
    data = yaml.safe_load((BOARDS_DIR / "qemu-virt-a53.yaml").read_text())
    data = copy.deepcopy(data)
    for section, values in change.items():
        data[section].update(values)
    directory = tmp_path / "boards"
    directory.mkdir()
    path = directory / "qemu-virt-a53.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_wrong_storage_node_fails_with_node_named(tmp_path: Path) -> None:
    path = broken_board(tmp_path, {"device_tree": {"storage": "/pcie@20000000"}})

    report = certify(load_board(path), tmp_path / "report", report=print)

    assert report.verdict == "FAIL"
    assert "device_tree.storage" in report.error
    assert "node /pcie@20000000 not found" in report.error
    assert str(path) in report.error
    assert "/pcie@20000000" in (tmp_path / "report" / "report.md").read_text()


def test_wrong_console_fails_boot_with_console_named(tmp_path: Path) -> None:
    path = broken_board(tmp_path, {"console": {"device": "ttyAMA1"}})

    report = certify(
        load_board(path),
        tmp_path / "report",
        report=print,
        only=["boot"],
        boot_timeout=45.0,
    )

    (boot,) = report.results
    assert boot.status == "failed"
    assert "Linux printed nothing on the console" in boot.detail
    assert "console=ttyAMA1 (console.device)" in boot.detail
    assert report.verdict == "FAIL"


def test_certify_command_exit_status(tmp_path: Path) -> None:
    path = broken_board(tmp_path, {"device_tree": {"console": "/pl011@9999000"}})

    status = main(["certify", str(path), "--output", str(tmp_path / "out")])

    assert status == 1
    assert "/pl011@9999000" in (tmp_path / "out" / "report.md").read_text()
