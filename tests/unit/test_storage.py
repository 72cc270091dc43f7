"""Tests for the storage model: the dm-log-writes format, durability under a
volatile write cache, cut policies, crash-state disks and triggers."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest

from mbl_sim.errors import ConfigError
from mbl_sim.storage import (
    DROP_UNFLUSHED,
    KEEP_ALL,
    AfterFlushes,
    AfterWrites,
    AtRandomWrite,
    CrashState,
    CutPolicy,
    LogWriter,
    OnWriteRange,
    TornWrite,
    durable_indices,
    image_digest,
    materialise,
    read_log,
    read_state,
    sparse_copy,
    state_writes,
    volatile_indices,
    with_writes_durable,
    write_log_slice,
)
from mbl_sim.storage.writelog import DISCARD, FLUSH, FUA, MAGIC

SECTOR = 512
DISK_SIZE = 64 * 1024


def sectors(value: int, count: int = 1) -> bytes:
    """Return ``count`` sectors filled with the byte ``value``."""
    return bytes([value]) * (SECTOR * count)


def make_base(tmp_path: Path) -> Path:
    """A 64 KiB raw disk: sector N contains the byte N + 1, and a hole after 16 KiB."""
    base = tmp_path / "base.raw"
    with base.open("wb") as stream:
        for number in range(32):
            stream.write(sectors(number + 1))
        stream.truncate(DISK_SIZE)
    return base


def write_example_log(path: Path) -> Path:
    """Entries: 0 write s2, 1 write s4-5, 2 flush, 3 write s2 (again), 4 write s8-11,
    5 FUA write s20, 6 flush, 7 write s12, 8 write s13-14."""
    with LogWriter(path) as log:
        log.write(2 * SECTOR, sectors(0xA0))
        log.write(4 * SECTOR, sectors(0xA1, 2))
        log.flush()
        log.write(2 * SECTOR, sectors(0xB0))
        log.write(8 * SECTOR, sectors(0xB1, 4))
        log.write(20 * SECTOR, sectors(0xB2), fua=True)
        log.flush()
        log.write(12 * SECTOR, sectors(0xC0))
        log.write(13 * SECTOR, sectors(0xC1, 2))
    return path


def expected_disk(base: Path, writes: list[tuple[int, bytes]]) -> bytes:
    data = bytearray(base.read_bytes())
    for offset, chunk in writes:
        data[offset : offset + len(chunk)] = chunk
    return bytes(data)


# -- the log format -------------------------------------------------------------------


def test_log_round_trip(tmp_path: Path) -> None:
    log = read_log(write_example_log(tmp_path / "w.log"))

    assert len(log) == 9
    assert log.counted == 9
    assert log.sector_size == SECTOR
    assert log.flush_indices() == [2, 6]
    first, second = log.entries[0], log.entries[1]
    assert (first.offset, first.length, first.flags) == (2 * SECTOR, SECTOR, 0)
    assert (second.offset, second.length) == (4 * SECTOR, 2 * SECTOR)
    assert log.entries[5].flags == FUA
    assert log.entries[2].flags == FLUSH
    assert log.read_data(second) == sectors(0xA1, 2)
    assert log.read_data(second, SECTOR, 10) == bytes([0xA1]) * 10


def test_log_superblock_layout(tmp_path: Path) -> None:
    path = write_example_log(tmp_path / "w.log")
    magic, version, count, sector_size = struct.unpack_from("<QQQI", path.read_bytes())
    assert magic == MAGIC == 0x6A736677736872
    assert version == 1
    assert count == 9
    assert sector_size == SECTOR


def test_log_reads_past_superblock_count(tmp_path: Path) -> None:
    # QEMU 7.2 rewrites the superblock only when a flush completes.
    path = write_example_log(tmp_path / "w.log")
    with path.open("r+b") as stream:
        stream.seek(16)
        stream.write(struct.pack("<Q", 7))

    log = read_log(path)

    assert log.counted == 7
    assert len(log) == 9


def test_log_before_first_flush_has_no_superblock(tmp_path: Path) -> None:
    # An SD card never flushes, so QEMU has not written the superblock yet.
    path = write_example_log(tmp_path / "w.log")
    with path.open("r+b") as stream:
        stream.write(bytes(SECTOR))

    with pytest.raises(ConfigError, match="not a dm-log-writes log"):
        read_log(path)
    log = read_log(path, sector_size=SECTOR)

    assert log.counted == 0
    assert len(log) == 9
    assert log.entries[8].length == 2 * SECTOR


def test_writes_durable_marks_every_write_fua(tmp_path: Path) -> None:
    log = with_writes_durable(read_log(write_example_log(tmp_path / "w.log")))

    assert [entry.is_fua for entry in log.entries] == [
        True, True, False, True, True, True, False, True, True
    ]  # fmt: skip
    assert volatile_indices(log, len(log)) == []
    assert durable_indices(log, 2) == [0, 1]


def test_log_stops_at_entry_cut_short(tmp_path: Path) -> None:
    path = write_example_log(tmp_path / "w.log")
    with path.open("r+b") as stream:
        stream.seek(16)
        stream.write(struct.pack("<Q", 7))
    # The last entry's data (two sectors) loses its second sector.
    os.truncate(path, path.stat().st_size - SECTOR)

    assert len(read_log(path)) == 8


def test_log_stops_at_unwritten_header(tmp_path: Path) -> None:
    path = write_example_log(tmp_path / "w.log")
    with path.open("r+b") as stream:
        stream.seek(16)
        stream.write(struct.pack("<Q", 7))
    # Entry 7's header follows the superblock and entries 0 to 6, which take
    # 1+1, 1+2, 1, 1+1, 1+4, 1+1 and 1 sectors.
    header = (1 + 2 + 3 + 1 + 2 + 5 + 2 + 1) * SECTOR
    with path.open("r+b") as stream:
        stream.seek(header)
        stream.write(bytes(SECTOR))

    assert len(read_log(path)) == 7


def test_log_rejects_invalid_counted_entry(tmp_path: Path) -> None:
    path = write_example_log(tmp_path / "w.log")
    with path.open("r+b") as stream:
        stream.seek(SECTOR + 16)
        stream.write(struct.pack("<Q", 1 << 40))

    with pytest.raises(ConfigError, match="unknown flags"):
        read_log(path)


def test_log_rejects_wrong_magic(tmp_path: Path) -> None:
    path = tmp_path / "w.log"
    path.write_bytes(bytes(2 * SECTOR))

    with pytest.raises(ConfigError, match="not a dm-log-writes log"):
        read_log(path)


def test_log_rejects_write_past_disk(tmp_path: Path) -> None:
    path = write_example_log(tmp_path / "w.log")

    with pytest.raises(ConfigError, match="past the"):
        read_log(path, disk_size=8 * SECTOR)


def test_log_discard_has_no_data(tmp_path: Path) -> None:
    path = tmp_path / "w.log"
    with LogWriter(path) as log:
        log.discard(0, 8 * SECTOR)
        log.write(0, sectors(1))

    entries = read_log(path).entries

    assert entries[0].flags == DISCARD
    assert not entries[0].is_write
    assert entries[1].data_offset == 3 * SECTOR


def test_log_writer_rejects_unaligned_write(tmp_path: Path) -> None:
    with LogWriter(tmp_path / "w.log") as log, pytest.raises(ConfigError):
        log.write(100, sectors(1))


def test_log_slice_renumbers_entries(tmp_path: Path) -> None:
    log = read_log(write_example_log(tmp_path / "w.log"))

    window = write_log_slice(log, 3, 7, tmp_path / "slice.log")

    assert len(window) == 4
    assert [entry.index for entry in window.entries] == [0, 1, 2, 3]
    assert window.flush_indices() == [3]
    assert window.read_data(window.entries[1]) == sectors(0xB1, 4)


# -- durability -----------------------------------------------------------------------


def test_durable_writes_need_a_later_flush(tmp_path: Path) -> None:
    log = read_log(write_example_log(tmp_path / "w.log"))

    assert durable_indices(log, 2) == []
    assert volatile_indices(log, 2) == [0, 1]
    assert durable_indices(log, 3) == [0, 1]
    assert volatile_indices(log, 3) == []


def test_fua_write_is_durable_at_once(tmp_path: Path) -> None:
    log = read_log(write_example_log(tmp_path / "w.log"))

    assert durable_indices(log, 6) == [0, 1, 5]
    assert volatile_indices(log, 6) == [3, 4]
    assert volatile_indices(log, 9) == [7, 8]


def test_preflush_write_data_is_not_durable(tmp_path: Path) -> None:
    # Linux logs a write with REQ_PREFLUSH as one entry with FLUSH and data.
    path = tmp_path / "w.log"
    with LogWriter(path) as writer:
        writer.write(0, sectors(1))
        writer._entry(SECTOR, SECTOR, FLUSH, sectors(2))
    log = read_log(path)

    assert durable_indices(log, 2) == [0]
    assert volatile_indices(log, 2) == [1]


# -- cut policies ---------------------------------------------------------------------


def test_drop_unflushed_keeps_nothing_cached(tmp_path: Path) -> None:
    log = read_log(write_example_log(tmp_path / "w.log"))

    state = DROP_UNFLUSHED.choose(log, 6)

    assert state == CrashState(6)


def test_keep_all_keeps_every_cached_write(tmp_path: Path) -> None:
    log = read_log(write_example_log(tmp_path / "w.log"))

    assert KEEP_ALL.choose(log, 6) == CrashState(6, frozenset({3, 4}))


def test_random_subset_is_seeded(tmp_path: Path) -> None:
    path = tmp_path / "w.log"
    with LogWriter(path) as writer:
        for number in range(40):
            writer.write(number * SECTOR, sectors(number))
    log = read_log(path)

    first = CutPolicy(keep=0.5, seed=7).choose(log, 40)
    again = CutPolicy(keep=0.5, seed=7).choose(log, 40)
    other = CutPolicy(keep=0.5, seed=8).choose(log, 40)

    assert first == again
    assert first != other
    assert 0 < len(first.kept) < 40


def test_tear_cuts_on_sector_boundary(tmp_path: Path) -> None:
    log = read_log(write_example_log(tmp_path / "w.log"))

    for seed in range(20):
        state = CutPolicy(tear=True, seed=seed).choose(log, 6)
        assert state.torn is not None
        assert state.torn.index == 4
        assert state.torn.kept_bytes in (SECTOR, 2 * SECTOR, 3 * SECTOR)
        assert state.kept == frozenset()


def test_tear_without_multi_sector_write(tmp_path: Path) -> None:
    log = read_log(write_example_log(tmp_path / "w.log"))

    assert CutPolicy(tear=True).choose(log, 8).torn is None


def test_policy_rejects_invalid_probability() -> None:
    with pytest.raises(ConfigError, match=r"outside 0\.\.1"):
        CutPolicy(keep=1.5)


def test_state_rejects_durable_write_as_kept(tmp_path: Path) -> None:
    log = read_log(write_example_log(tmp_path / "w.log"))

    with pytest.raises(ConfigError, match="not cached writes"):
        state_writes(log, CrashState(6, frozenset({0})))


def test_state_rejects_torn_write_that_is_kept(tmp_path: Path) -> None:
    log = read_log(write_example_log(tmp_path / "w.log"))
    state = CrashState(6, frozenset({4}), TornWrite(4, SECTOR))

    with pytest.raises(ConfigError, match="torn write 4"):
        state_writes(log, state)


def test_state_rejects_torn_length_out_of_range(tmp_path: Path) -> None:
    log = read_log(write_example_log(tmp_path / "w.log"))

    with pytest.raises(ConfigError, match="expected 1 to 2047"):
        state_writes(log, CrashState(6, torn=TornWrite(4, 4 * SECTOR)))


def test_state_json_round_trip() -> None:
    state = CrashState(12, frozenset({3, 9}), TornWrite(10, 1024))

    assert CrashState.from_json(state.to_json()) == state
    assert state.label() == "p12-k2-t10.1024"


# -- crash-state disks ----------------------------------------------------------------


def test_materialise_drops_cached_writes(tmp_path: Path) -> None:
    base = make_base(tmp_path)
    log = read_log(write_example_log(tmp_path / "w.log"))

    disk = materialise(base, log, CrashState(6), tmp_path / "state.raw")

    expected = expected_disk(
        base,
        [
            (2 * SECTOR, sectors(0xA0)),
            (4 * SECTOR, sectors(0xA1, 2)),
            (20 * SECTOR, sectors(0xB2)),
        ],
    )
    assert disk.read_bytes() == expected


def test_materialise_keeps_and_tears_in_log_order(tmp_path: Path) -> None:
    base = make_base(tmp_path)
    log = read_log(write_example_log(tmp_path / "w.log"))
    state = CrashState(6, frozenset({3}), TornWrite(4, 3 * SECTOR))

    disk = materialise(base, log, state, tmp_path / "state.raw")

    expected = expected_disk(
        base,
        [
            (2 * SECTOR, sectors(0xA0)),
            (4 * SECTOR, sectors(0xA1, 2)),
            (2 * SECTOR, sectors(0xB0)),
            (8 * SECTOR, sectors(0xB1, 3)),
            (20 * SECTOR, sectors(0xB2)),
        ],
    )
    assert disk.read_bytes() == expected


def test_materialise_later_write_wins(tmp_path: Path) -> None:
    base = make_base(tmp_path)
    log = read_log(write_example_log(tmp_path / "w.log"))

    disk = materialise(base, log, CrashState(7), tmp_path / "state.raw")

    assert disk.read_bytes()[2 * SECTOR : 3 * SECTOR] == sectors(0xB0)


def test_materialise_range_matches_whole_disk(tmp_path: Path) -> None:
    base = make_base(tmp_path)
    log = read_log(write_example_log(tmp_path / "w.log"))
    state = CrashState(9, frozenset({7, 8}))
    whole = materialise(base, log, state, tmp_path / "whole.raw").read_bytes()

    part = materialise(
        base, log, state, tmp_path / "part.raw", offset=3 * SECTOR, length=10 * SECTOR
    )

    assert part.read_bytes() == whole[3 * SECTOR : 13 * SECTOR]
    assert (
        read_state(base, log, state, 3 * SECTOR + 7, 5000)
        == whole[3 * SECTOR + 7 : 3 * SECTOR + 5007]
    )


def test_materialise_ignores_discards(tmp_path: Path) -> None:
    base = make_base(tmp_path)
    path = tmp_path / "w.log"
    with LogWriter(path) as writer:
        writer.discard(0, 16 * SECTOR)
        writer.flush()
    log = read_log(path)

    disk = materialise(base, log, CrashState(2), tmp_path / "state.raw")

    assert disk.read_bytes() == base.read_bytes()


def test_materialise_rejects_qcow2_base(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    base.write_bytes(b"QFI\xfb" + bytes(SECTOR))
    log = read_log(write_example_log(tmp_path / "w.log"))

    with pytest.raises(ConfigError, match="is qcow2"):
        materialise(base, log, CrashState(0), tmp_path / "state.raw")


def test_sparse_copy_keeps_holes(tmp_path: Path) -> None:
    source = tmp_path / "sparse.raw"
    with source.open("wb") as stream:
        stream.truncate(8 << 20)
        stream.seek(4 << 20)
        stream.write(b"data" * 1024)

    copied = sparse_copy(source, tmp_path / "copy.raw")

    target = tmp_path / "copy.raw"
    assert target.read_bytes() == source.read_bytes()
    assert copied < 1 << 20
    assert target.stat().st_blocks * 512 < 1 << 20


def test_image_digest_holes_equal_zeros(tmp_path: Path) -> None:
    holes = tmp_path / "holes.raw"
    zeros = tmp_path / "zeros.raw"
    with holes.open("wb") as stream:
        stream.truncate(1 << 20)
        stream.seek(300_000)
        stream.write(b"x")
    data = bytearray(1 << 20)
    data[300_000] = ord("x")
    zeros.write_bytes(bytes(data))
    data[300_001] = ord("y")
    (tmp_path / "other.raw").write_bytes(bytes(data))

    assert image_digest(holes) == image_digest(zeros)
    assert image_digest(holes) != image_digest(tmp_path / "other.raw")


# -- triggers -------------------------------------------------------------------------


def test_after_writes_counts_from_arming(tmp_path: Path) -> None:
    log = read_log(write_example_log(tmp_path / "w.log"))

    assert AfterWrites(1).find(log, 0) == 1
    assert AfterWrites(3).find(log, 0) == 4
    assert AfterWrites(2).find(log, 3) == 5
    assert AfterWrites(10).find(log, 0) is None


def test_after_flushes_counts_from_arming(tmp_path: Path) -> None:
    log = read_log(write_example_log(tmp_path / "w.log"))

    assert AfterFlushes(1).find(log, 0) == 3
    assert AfterFlushes(1).find(log, 3) == 7
    assert AfterFlushes(3).find(log, 0) is None


def test_write_range_fires_on_first_overlap(tmp_path: Path) -> None:
    log = read_log(write_example_log(tmp_path / "w.log"))

    assert OnWriteRange(10 * SECTOR, SECTOR).find(log, 0) == 5
    assert OnWriteRange(2 * SECTOR + 100, 1).find(log, 1) == 4
    assert OnWriteRange(30 * SECTOR, SECTOR).find(log, 0) is None


def test_random_write_trigger_is_seeded() -> None:
    counts = {AtRandomWrite(seed, 50).count for seed in range(30)}

    assert AtRandomWrite(3, 50).count == AtRandomWrite(3, 50).count
    assert len(counts) > 1
    assert all(1 <= count <= 50 for count in counts)
    assert random.Random(3).randint(1, 50) == AtRandomWrite(3, 50).count


def test_trigger_rejects_zero_count() -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        AfterWrites(0)
