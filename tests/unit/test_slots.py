"""Tests for A/B slot logic: running slot, flip, mark-good and status."""

from __future__ import annotations

from pathlib import Path

import pytest

from updater.bootenv import EnvLocation, encode_copy, read_env
from updater.errors import BootEnvCorruptError, SlotError
from updater.slots import (
    flip_to,
    mark_good,
    other_slot,
    parse_running_slot,
    read_running_slot,
    read_status,
)

SIZE = 0x1000
OFFSETS = (0x0, 0x1000)
INITIAL = {
    "active_slot": "a",
    "bootlimit": "3",
    "bootcount": "0",
    "upgrade_available": "0",
    "bootcmd": "run mbl_boot",
}


def env_image(
    tmp_path: Path, variables: dict[str, str], flag: int = 1
) -> list[EnvLocation]:
    image = tmp_path / "env.img"
    image.write_bytes(encode_copy(variables, flag, SIZE) + bytes(SIZE))
    return [EnvLocation(str(image), offset, SIZE) for offset in OFFSETS]


@pytest.mark.parametrize(
    ("cmdline", "slot"),
    [
        ("console=ttyAMA0 root=/dev/vda2 mbl.slot=a rw\n", "a"),
        ("mbl.slot=b", "b"),
        ("mbl.slot=a quiet mbl.slot=b", "b"),
    ],
)
def test_parse_running_slot(cmdline: str, slot: str) -> None:
    assert parse_running_slot(cmdline) == slot


@pytest.mark.parametrize(
    ("cmdline", "message"),
    [
        ("console=ttyAMA0 root=/dev/vda2", "has no mbl.slot= parameter"),
        ("mbl.slot=c", "invalid mbl.slot in /proc/cmdline 'c'"),
        ("mbl.slot=", "invalid mbl.slot"),
        ("xmbl.slot=a", "has no mbl.slot= parameter"),
    ],
)
def test_parse_running_slot_rejects(cmdline: str, message: str) -> None:
    with pytest.raises(SlotError, match=message):
        parse_running_slot(cmdline)


def test_read_running_slot_from_file(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("root=/dev/vda3 mbl.slot=b\n")
    assert read_running_slot(str(cmdline)) == "b"


def test_read_running_slot_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SlotError, match="cannot read the kernel command line"):
        read_running_slot(str(tmp_path / "missing"))


def test_other_slot() -> None:
    assert other_slot("a") == "b"
    assert other_slot("b") == "a"
    with pytest.raises(SlotError, match="invalid slot 'c'"):
        other_slot("c")


def test_flip_to_sets_trial_in_one_write(tmp_path: Path) -> None:
    locations = env_image(tmp_path, {**INITIAL, "bootcount": "2"})
    env = flip_to(locations, "b", "a")
    assert env.current == 1
    assert env.flag == 2
    expected = {
        **INITIAL,
        "active_slot": "b",
        "previous_slot": "a",
        "upgrade_available": "1",
        "bootcount": "0",
    }
    assert read_env(locations).variables == expected
    # Copy 1 still contains the old environment: one write changed one copy.
    assert read_env(locations[:1] * 2).variables == {**INITIAL, "bootcount": "2"}


@pytest.mark.parametrize(("slot", "previous"), [("a", "a"), ("c", "a"), ("b", "")])
def test_flip_to_rejects_slots(tmp_path: Path, slot: str, previous: str) -> None:
    locations = env_image(tmp_path, INITIAL)
    before = Path(locations[0].device).read_bytes()
    with pytest.raises(SlotError):
        flip_to(locations, slot, previous)
    assert Path(locations[0].device).read_bytes() == before


def test_flip_to_both_copies_corrupt(tmp_path: Path) -> None:
    image = tmp_path / "env.img"
    image.write_bytes(b"\xff" * 2 * SIZE)
    locations = [EnvLocation(str(image), offset, SIZE) for offset in OFFSETS]
    with pytest.raises(BootEnvCorruptError):
        flip_to(locations, "b", "a")
    assert image.read_bytes() == b"\xff" * 2 * SIZE


def test_mark_good_ends_trial(tmp_path: Path) -> None:
    trial = {**INITIAL, "active_slot": "b", "upgrade_available": "1", "bootcount": "2"}
    locations = env_image(tmp_path, trial)
    env = mark_good(locations, "b")
    assert env.variables == {**trial, "upgrade_available": "0", "bootcount": "0"}
    assert read_env(locations).variables == env.variables
    assert env.current == 1


def test_mark_good_without_change_skips_write(tmp_path: Path) -> None:
    locations = env_image(tmp_path, INITIAL)
    before = Path(locations[0].device).read_bytes()
    env = mark_good(locations, "a")
    assert env.current == 0
    assert Path(locations[0].device).read_bytes() == before


def test_mark_good_rejects_slot_not_active(tmp_path: Path) -> None:
    # After "install --no-reboot" the new slot is active but still not booted.
    trial = {**INITIAL, "active_slot": "b", "upgrade_available": "1"}
    locations = env_image(tmp_path, trial)
    before = Path(locations[0].device).read_bytes()
    with pytest.raises(SlotError, match="running slot 'a' is not the active slot 'b'"):
        mark_good(locations, "a")
    assert Path(locations[0].device).read_bytes() == before


def test_read_status(tmp_path: Path) -> None:
    locations = env_image(tmp_path, INITIAL, flag=9)
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("mbl.slot=a\n")
    status = read_status(locations, str(cmdline))
    assert status.running_slot == "a"
    assert status.active_slot == "a"
    assert status.previous_slot is None
    assert status.upgrade_available == "0"
    assert status.bootlimit == "3"
    assert status.env_copy == 1
    assert status.env_flag == 9
    assert status.env_location == locations[0]
    assert status.other_copy_error is not None
    assert status.environment == INITIAL


def test_read_status_unknown_running_slot(tmp_path: Path) -> None:
    locations = env_image(tmp_path, INITIAL)
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("root=/dev/vda2\n")
    assert read_status(locations, str(cmdline)).running_slot is None
