"""Crash states: the content of a disk with a volatile write cache after a power cut.

The model follows the eMMC's and Linux's contract for a volatile write cache. A
write that completed is only in the cache until a later flush completes, or, with
FUA, at once. At a power cut each cached write may or may not have reached the
medium, and one that was being programmed may be torn part-way.

A crash state is named by the number of log entries that had completed when power
failed (the cut point), the cached writes that reached the medium anyway, and at
most one torn write. Its disk is the image before the log started plus, in log
order, every durable write, every kept cached write, and the first bytes of the
torn write.

Discards are not applied: the model, like QEMU with its default ``discard=ignore``,
keeps the old data in a discarded range, which an eMMC is allowed to return.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mbl_sim.errors import ConfigError
from mbl_sim.storage.writelog import LogEntry, WriteLog

__all__ = [
    "DROP_UNFLUSHED",
    "KEEP_ALL",
    "CrashState",
    "CutPolicy",
    "TornWrite",
    "apply_state",
    "durable_indices",
    "image_digest",
    "materialise",
    "read_state",
    "sparse_copy",
    "state_writes",
    "volatile_indices",
]

_log = logging.getLogger(__name__)

_QCOW2_MAGIC = b"QFI\xfb"
_DIGEST_BLOCK = 64 * 1024


@dataclass(frozen=True)
class TornWrite:
    """A cached write that was cut short while it reached the medium.

    Attributes:
        index: the write's log index.
        kept_bytes: bytes from the start of the write that reached the medium,
            more than 0 and fewer than the write's length.
    """

    index: int
    kept_bytes: int


@dataclass(frozen=True)
class CrashState:
    """The disk after a power cut.

    Attributes:
        point: log entries ``[0, point)`` had completed when power failed.
        kept: log indices of cached (unflushed) writes that reached the medium.
        torn: the write cut short while it reached the medium, if any.
    """

    point: int
    kept: frozenset[int] = field(default_factory=frozenset)
    torn: TornWrite | None = None

    def label(self) -> str:
        """Return a short name: ``p120``, ``p120-k3`` (3 cached writes kept),
        ``p120-k3-t117.4096`` (write 117 torn after 4096 bytes)."""
        text = f"p{self.point}"
        if self.kept:
            text += f"-k{len(self.kept)}"
        if self.torn is not None:
            text += f"-t{self.torn.index}.{self.torn.kept_bytes}"
        return text

    def to_json(self) -> dict[str, Any]:
        """Return the state as a JSON-ready dictionary."""
        torn = None
        if self.torn is not None:
            torn = {"index": self.torn.index, "kept_bytes": self.torn.kept_bytes}
        return {"point": self.point, "kept": sorted(self.kept), "torn": torn}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> CrashState:
        """Read a state written by ``to_json``.

        Raises:
            ConfigError: a key is missing or has the wrong type.
        """
        try:
            torn_value = value["torn"]
            torn = None
            if torn_value is not None:
                torn = TornWrite(
                    int(torn_value["index"]), int(torn_value["kept_bytes"])
                )
            return cls(
                point=int(value["point"]),
                kept=frozenset(int(index) for index in value["kept"]),
                torn=torn,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"invalid crash state {value!r}: {error!r}") from error


def _last_flush(log: WriteLog, point: int) -> int:
    """Return the index of the last flush entry before ``point``, or -1."""
    for entry in reversed(log.entries[:point]):
        if entry.is_flush:
            return entry.index
    return -1


def durable_indices(log: WriteLog, point: int) -> list[int]:
    """Return the writes before ``point`` that a cut at ``point`` cannot lose.

    A write is durable when a flush entry follows it before ``point``, or when it
    was a FUA write. The data of a flush entry that carries data (Linux's
    preflush writes) is written after its flush, so it needs a later one.
    """
    # NOTE: QEMU logs a write when it completes. A write that completed while a
    # flush was running is logged before that flush and counts as durable here,
    # though a real cache need not have covered it.
    last_flush = _last_flush(log, point)
    return [
        entry.index
        for entry in log.entries[:point]
        if entry.is_write and (entry.index < last_flush or entry.is_fua)
    ]


def volatile_indices(log: WriteLog, point: int) -> list[int]:
    """Return the writes before ``point`` that were still only in the write cache."""
    durable = set(durable_indices(log, point))
    return [
        entry.index
        for entry in log.entries[:point]
        if entry.is_write and entry.index not in durable
    ]


def _check_point(log: WriteLog, point: int) -> None:
    if not 0 <= point <= len(log):
        raise ConfigError(
            f"cut point {point} is outside the log {log.path}, which has"
            f" {len(log)} entries"
        )


def state_writes(log: WriteLog, state: CrashState) -> list[tuple[LogEntry, int]]:
    """Return what reaches the disk in ``state``: (entry, bytes from its start), in
    log order.

    Raises:
        ConfigError: the point is outside the log, or a kept or torn index is not a
            cached write at that point.
    """
    _check_point(log, state.point)
    volatile = set(volatile_indices(log, state.point))
    stray = sorted(state.kept - volatile)
    if stray:
        raise ConfigError(
            f"crash state {state.label()}: entries {stray} are not cached writes at"
            f" point {state.point}"
        )
    torn = state.torn
    if torn is not None:
        _check_torn(log, state, volatile, torn)
    durable = set(durable_indices(log, state.point))
    writes = []
    for entry in log.entries[: state.point]:
        if entry.index in durable or entry.index in state.kept:
            writes.append((entry, entry.length))
        elif torn is not None and entry.index == torn.index:
            writes.append((entry, torn.kept_bytes))
    return writes


def _check_torn(
    log: WriteLog, state: CrashState, volatile: set[int], torn: TornWrite
) -> None:
    if torn.index not in volatile or torn.index in state.kept:
        raise ConfigError(
            f"crash state {state.label()}: torn write {torn.index} is not a cached"
            f" write at point {state.point}, or it is also kept whole"
        )
    length = log.entries[torn.index].length
    if not 0 < torn.kept_bytes < length:
        raise ConfigError(
            f"crash state {state.label()}: torn write {torn.index} keeps"
            f" {torn.kept_bytes} bytes, expected 1 to {length - 1}"
        )


@dataclass(frozen=True)
class CutPolicy:
    """A rule for the cached writes that survive a power cut.

    Attributes:
        keep: probability that each cached write reached the medium; 0 drops them
            all (the default), 1 keeps them all, as QEMU's host file does.
        tear: also tear one cached write of more than one sector, cut after a
            whole number of sectors.
        seed: seed of the random choices.
    """

    keep: float = 0.0
    tear: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.keep <= 1.0:
            raise ConfigError(f"keep probability {self.keep} is outside 0..1")

    def describe(self) -> str:
        """Return ``drop unflushed``, ``keep 50% of unflushed, tear one, seed 7``…"""
        if self.keep == 0.0:
            text = "drop unflushed"
        elif self.keep == 1.0:
            text = "keep unflushed"
        else:
            text = f"keep {self.keep:.0%} of unflushed"
        if self.tear:
            text += ", tear one"
        if (0.0 < self.keep < 1.0) or self.tear:
            text += f", seed {self.seed}"
        return text

    def choose(self, log: WriteLog, point: int) -> CrashState:
        """Return the crash state of a cut at ``point`` under this policy.

        The same policy, log and point always give the same state.

        Raises:
            ConfigError: ``point`` is outside the log.
        """
        _check_point(log, point)
        rng = random.Random(f"{self.seed}:{point}")
        volatile = volatile_indices(log, point)
        kept = frozenset(index for index in volatile if rng.random() < self.keep)
        torn = None
        if self.tear:
            torn = choose_torn_write(log, [i for i in volatile if i not in kept], rng)
        return CrashState(point, kept, torn)


def choose_torn_write(
    log: WriteLog, candidates: Sequence[int], rng: random.Random
) -> TornWrite | None:
    """Pick one write of more than one sector among ``candidates`` and a sector
    boundary inside it; None when no candidate spans two sectors."""
    multi_sector = [i for i in candidates if log.entries[i].length > log.sector_size]
    if not multi_sector:
        return None
    index = rng.choice(multi_sector)
    sectors = log.entries[index].length // log.sector_size
    return TornWrite(index, rng.randrange(1, sectors) * log.sector_size)


DROP_UNFLUSHED = CutPolicy()
"""A power cut loses every write that no flush or FUA covered."""

KEEP_ALL = CutPolicy(keep=1.0)
"""Every completed write survives, as in QEMU's host file after SIGKILL."""


# --------------------------------------------------------------------------
# Materialising states


def _require_raw(base: Path) -> None:
    try:
        with base.open("rb") as stream:
            magic = stream.read(len(_QCOW2_MAGIC))
    except OSError as error:
        raise ConfigError(f"cannot read base image {base}: {error}") from error
    if magic == _QCOW2_MAGIC:
        raise ConfigError(
            f"base image {base} is qcow2; crash states are built on a raw image"
            " (convert it with `qemu-img convert -O raw`)"
        )


def _data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Yield the (start, end) byte ranges of ``fd`` within ``[start, end)`` that may
    hold data, skipping holes (SEEK_DATA and SEEK_HOLE)."""
    position = start
    while position < end:
        try:
            data = os.lseek(fd, position, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after position
            return
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        position = hole


def _copy_range(
    source: int, target: int, source_offset: int, target_offset: int, length: int
) -> None:
    """Copy bytes between two files inside the kernel where it can, else by reading.

    copy_file_range failed with EXDEV from an ext4 file to a tmpfs file under
    Linux 6.18, where sendfile still copies in the kernel.
    """
    while length > 0:
        copied = _kernel_copy(source, target, source_offset, target_offset, length)
        if copied == 0:
            chunk = os.pread(source, min(length, 1 << 22), source_offset)
            if not chunk:
                raise ConfigError(f"unexpected end of file at byte {source_offset}")
            copied = os.pwrite(target, chunk, target_offset)
        source_offset += copied
        target_offset += copied
        length -= copied


def _kernel_copy(
    source: int, target: int, source_offset: int, target_offset: int, length: int
) -> int:
    try:
        return os.copy_file_range(source, target, length, source_offset, target_offset)
    except OSError:
        pass
    try:
        os.lseek(target, target_offset, os.SEEK_SET)
        return os.sendfile(target, source, source_offset, length)
    except OSError:
        return 0


def sparse_copy(
    source: Path, target: Path, offset: int = 0, length: int | None = None
) -> int:
    """Copy bytes ``[offset, offset+length)`` of ``source`` into a new sparse file
    ``target`` at offset 0, and return the number of bytes copied. Only the ranges
    that contain data are copied.

    Raises:
        OSError: a file cannot be read or written.
    """
    source_fd = os.open(source, os.O_RDONLY)
    try:
        size = os.fstat(source_fd).st_size
        if length is None:
            length = size - offset
        target_fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(target_fd, length)
            copied = 0
            for start, end in _data_extents(
                source_fd, offset, min(offset + length, size)
            ):
                _copy_range(source_fd, target_fd, start, start - offset, end - start)
                copied += end - start
            return copied
        finally:
            os.close(target_fd)
    finally:
        os.close(source_fd)


def _apply_writes(
    log: WriteLog, state: CrashState, target_fd: int, offset: int, length: int
) -> int:
    """Apply the state's writes that fall into ``[offset, offset+length)`` to
    ``target_fd``, whose byte 0 is disk byte ``offset``; return bytes written."""
    written = 0
    end = offset + length
    log_fd = os.open(log.path, os.O_RDONLY)
    try:
        for entry, kept_bytes in state_writes(log, state):
            start = max(entry.offset, offset)
            stop = min(entry.offset + kept_bytes, end)
            if start >= stop:
                continue
            source = entry.data_offset + (start - entry.offset)
            _copy_range(log_fd, target_fd, source, start - offset, stop - start)
            written += stop - start
    finally:
        os.close(log_fd)
    return written


def materialise(
    base: Path,
    log: WriteLog,
    state: CrashState,
    output: Path,
    *,
    offset: int = 0,
    length: int | None = None,
) -> Path:
    """Write the disk bytes ``[offset, offset+length)`` of ``state`` to ``output``.

    ``base`` is the raw disk image before the log's first entry; ``length``
    defaults to the rest of it. ``output`` is sparse: it gets only the base's
    data ranges and the state's writes, so a crash state of a 1 GiB disk with
    150 MiB of data costs about 150 MiB of copying, most of it inside the kernel.

    Raises:
        ConfigError: ``base`` is not a raw image, or the state does not fit the log.
    """
    _require_raw(base)
    if length is None:
        length = base.stat().st_size - offset
    copied = sparse_copy(base, output, offset, length)
    fd = os.open(output, os.O_WRONLY)
    try:
        written = _apply_writes(log, state, fd, offset, length)
    finally:
        os.close(fd)
    _log.debug(
        "materialised %s bytes %#x+%#x into %s: %d base bytes, %d written",
        state.label(),
        offset,
        length,
        output,
        copied,
        written,
    )
    return output


def apply_state(image: Path, log: WriteLog, state: CrashState) -> int:
    """Write the state's writes into ``image``, the raw disk before the log's first
    entry, in place, and return the number of bytes written.

    Raises:
        ConfigError: ``image`` is not a raw image, or the state does not fit the log.
    """
    _require_raw(image)
    fd = os.open(image, os.O_WRONLY)
    try:
        return _apply_writes(log, state, fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def read_state(
    base: Path, log: WriteLog, state: CrashState, offset: int, length: int
) -> bytes:
    """Return the disk bytes ``[offset, offset+length)`` of ``state``, in memory.

    Raises:
        ConfigError: as for ``materialise``.
    """
    with base.open("rb") as stream:
        if stream.read(len(_QCOW2_MAGIC)) == _QCOW2_MAGIC:
            _require_raw(base)
        stream.seek(offset)
        data = bytearray(stream.read(length).ljust(length, b"\0"))
    end = offset + length
    pieces = []
    for entry, kept_bytes in state_writes(log, state):
        start = max(entry.offset, offset)
        stop = min(entry.offset + kept_bytes, end)
        if start < stop:
            pieces.append((entry.data_offset + start - entry.offset, start, stop))
    if pieces:
        with log.path.open("rb") as log_stream:
            for source, start, stop in pieces:
                log_stream.seek(source)
                data[start - offset : stop - offset] = log_stream.read(stop - start)
    return bytes(data)


def image_digest(path: Path) -> str:
    """Return a SHA-256 content digest of the raw image at ``path``.

    The digest covers the image size and every 64 KiB block that contains a
    non-zero byte, with its offset. So a hole and written zeros hash alike, and
    only the data ranges are read. It is not the ``sha256sum`` of the file.

    Raises:
        OSError: the file cannot be read.
    """
    digest = hashlib.sha256()
    zero = bytes(_DIGEST_BLOCK)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        digest.update(size.to_bytes(8, "little"))
        next_block = 0
        for start, end in _data_extents(fd, 0, size):
            # Two data ranges can share a block; each block is hashed once.
            first = max(start - start % _DIGEST_BLOCK, next_block)
            for position in range(first, end, _DIGEST_BLOCK):
                block = os.pread(fd, _DIGEST_BLOCK, position)
                if block != zero[: len(block)]:
                    digest.update(position.to_bytes(8, "little"))
                    digest.update(block)
                next_block = position + _DIGEST_BLOCK
    finally:
        os.close(fd)
    return digest.hexdigest()
