"""An update's environment write under a power cut at every byte: the environment
reads as entirely old or entirely new, through the storage model and the updater's
own codec."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mbl_sim.storage import (
    CrashState,
    LogWriter,
    TornWrite,
    WriteLog,
    read_log,
    read_state,
)
from updater.bootenv import EnvLocation, decode_env, encode_copy
from updater.slots import flip_to

# Smaller than the board's 16 KiB copies, so that a cut at every byte stays fast.
SIZE = 0x1000
OFFSETS = (0x10000, 0x20000)
IMAGE_SIZE = 0x30000
OLD = {
    "active_slot": "a",
    "previous_slot": "a",
    "upgrade_available": "0",
    "bootcount": "0",
    "bootlimit": "3",
}
NEW = {**OLD, "active_slot": "b", "upgrade_available": "1"}


def make_image(path: Path, other_copy: bytes) -> list[EnvLocation]:
    """Write the old environment as copy 1 (flag 5) and ``other_copy`` as copy 2."""
    data = bytearray(IMAGE_SIZE)
    data[OFFSETS[0] : OFFSETS[0] + SIZE] = encode_copy(OLD, 5, SIZE)
    data[OFFSETS[1] : OFFSETS[1] + SIZE] = other_copy
    path.write_bytes(bytes(data))
    return [EnvLocation(str(path), offset, SIZE) for offset in OFFSETS]


def record_flip(tmp_path: Path, other_copy: bytes) -> tuple[Path, WriteLog]:
    """Run the updater's slot flip on a copy of the image and log its one write.

    Returns the image before the flip and the write log (the write, then a flush).
    """
    base = tmp_path / "before.raw"
    make_image(base, other_copy)
    after = tmp_path / "after.raw"
    locations = make_image(after, other_copy)
    flip_to(locations, "b", "a")
    before_bytes, after_bytes = base.read_bytes(), after.read_bytes()
    changed = [i for i in range(IMAGE_SIZE) if before_bytes[i] != after_bytes[i]]
    # One write of one whole copy, in the place of the copy that was not current.
    assert changed[0] >= OFFSETS[1]
    assert changed[-1] < OFFSETS[1] + SIZE
    log_path = tmp_path / "flip.log"
    with LogWriter(log_path) as writer:
        writer.write(OFFSETS[1], after_bytes[OFFSETS[1] : OFFSETS[1] + SIZE])
        writer.flush()
    return base, read_log(log_path)


def environment(base: Path, log: WriteLog, state: CrashState) -> dict[str, str]:
    raw = [read_state(base, log, state, offset, SIZE) for offset in OFFSETS]
    locations = [EnvLocation(str(base), offset, SIZE) for offset in OFFSETS]
    return decode_env(raw, locations).variables


OTHER_COPIES = {
    "other copy older": encode_copy({**OLD, "bootcount": "2"}, 4, SIZE),
    "other copy invalid": bytes(SIZE),
    "other copy corrupt": b"\xff" * SIZE,
}


@pytest.mark.parametrize("other_copy", OTHER_COPIES.values(), ids=OTHER_COPIES.keys())
def test_env_write_cut_at_every_byte(
    tmp_path: Path, other_copy: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    # decode_env warns about every invalid copy; thousands of warnings cost seconds.
    caplog.set_level(logging.ERROR, logger="updater.bootenv")
    base, log = record_flip(tmp_path, other_copy)
    outcomes = []
    for kept in range(SIZE + 1):
        if kept == 0:
            state = CrashState(1)
        elif kept == SIZE:
            state = CrashState(1, frozenset({0}))
        else:
            state = CrashState(1, torn=TornWrite(0, kept))
        variables = environment(base, log, state)
        assert variables in (OLD, NEW), f"cut after {kept} bytes: {variables}"
        outcomes.append(variables == NEW)

    assert outcomes[0] is False
    assert outcomes[-1] is True
    # Once the new copy reads as valid, every longer write does too.
    first_new = outcomes.index(True)
    assert all(outcomes[first_new:])


def test_env_write_lost_without_flush(tmp_path: Path) -> None:
    base, log = record_flip(tmp_path, OTHER_COPIES["other copy older"])

    assert environment(base, log, CrashState(1)) == OLD
    assert environment(base, log, CrashState(2)) == NEW
