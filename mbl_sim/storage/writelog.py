"""Read and write dm-log-writes logs: the ordered record of a disk's writes and flushes.

QEMU's ``blklogwrites`` block driver and Linux's dm-log-writes target write the same
format. All integers are little endian:

- log sector 0, the superblock: magic (u64, ``0x6a736677736872``), version (u64, 1),
  entry count (u64), log sector size (u32), zero padding to one log sector;
- then one record per entry. A header sector contains the disk sector (u64), the
  number of sectors (u64), flags (u64) and ``data_len`` (u64), zero padded. The
  entry's data follows, ``nr_sectors`` sectors, padded to whole log sectors.
  Discards and flushes carry no data, and Linux keeps a mark's text in its header
  sector.

Flags: ``FLUSH`` 1, ``FUA`` 2, ``DISCARD`` 4, ``MARK`` 8, ``METADATA`` 16 (Linux only).

What QEMU 7.2's driver does (block/blklogwrites.c), which this reader allows for:

- Entries appear in the order their requests completed. A flush entry is written
  after the flush completed, so every write logged before it was covered by it.
- The superblock is rewritten only when a flush completes, so its count misses the
  entries after the last flush, and it is all zeros until the first flush (an SD
  card never flushes; QEMU flushes when the guest stops). The reader goes on past
  the count until the first header that is all zeros, is invalid, or whose data
  runs past the end of the file: after QEMU was killed, that is where the record
  of completed requests ends.
- Disk sectors are in units of the log sector size, which must be at least the
  guest's logical block size (512 here).
- The driver never sets ``FUA``: it passes the FUA request flag to the disk but logs
  the write with flags 0. QEMU 7.2's virtio-blk offers the guest no FUA, so Linux
  sends a flush instead, which the log records.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType

from mbl_sim.errors import ConfigError

__all__ = [
    "DISCARD",
    "FLUSH",
    "FUA",
    "MAGIC",
    "MARK",
    "METADATA",
    "LogEntry",
    "LogWriter",
    "WriteLog",
    "read_log",
    "with_writes_durable",
    "write_log_slice",
]

log = logging.getLogger(__name__)

MAGIC = 0x6A736677736872
VERSION = 1

FLUSH = 1 << 0
FUA = 1 << 1
DISCARD = 1 << 2
MARK = 1 << 3
METADATA = 1 << 4
_KNOWN_FLAGS = FLUSH | FUA | DISCARD | MARK | METADATA

_SUPERBLOCK = struct.Struct("<QQQI")
_HEADER = struct.Struct("<QQQQ")

DEFAULT_SECTOR_SIZE = 512


@dataclass(frozen=True)
class LogEntry:
    """One logged request.

    Attributes:
        index: position in the log, from 0.
        offset: disk byte offset of the request.
        length: bytes the request covers on the disk; 0 for a flush.
        flags: the dm-log-writes flags.
        data_offset: byte offset of the request's data in the log file.
    """

    index: int
    offset: int
    length: int
    flags: int
    data_offset: int

    @property
    def end(self) -> int:
        """Disk byte offset just past the request."""
        return self.offset + self.length

    @property
    def is_flush(self) -> bool:
        """Whether the request flushed the disk's write cache before its data."""
        return bool(self.flags & FLUSH)

    @property
    def is_fua(self) -> bool:
        """Whether the request's data was durable once the request completed."""
        return bool(self.flags & FUA)

    @property
    def is_discard(self) -> bool:
        """Whether the request discarded its range instead of writing it."""
        return bool(self.flags & DISCARD)

    @property
    def is_write(self) -> bool:
        """Whether the request carries data that lands on the disk."""
        return self.length > 0 and not self.flags & (DISCARD | MARK)

    def overlaps(self, offset: int, length: int) -> bool:
        """Return whether the request writes any byte of ``[offset, offset+length)``."""
        return self.is_write and self.offset < offset + length and offset < self.end

    def describe(self) -> str:
        """Return ``#INDEX write 4096 bytes at 0x...`` or similar, for messages."""
        if self.is_write:
            kind = "FUA write" if self.is_fua else "write"
            text = f"#{self.index} {kind} of {self.length} bytes at {self.offset:#x}"
            return text + (" after a flush" if self.is_flush else "")
        if self.is_flush:
            return f"#{self.index} flush"
        if self.is_discard:
            return f"#{self.index} discard of {self.length} bytes at {self.offset:#x}"
        return f"#{self.index} mark"


@dataclass(frozen=True)
class WriteLog:
    """The entries of one log file.

    Attributes:
        path: the log file.
        sector_size: the log sector size, also the unit of disk sectors.
        entries: the complete entries, in log order.
        counted: the entry count in the superblock, which QEMU updates on flushes.
    """

    path: Path
    sector_size: int
    entries: tuple[LogEntry, ...]
    counted: int

    def __len__(self) -> int:
        return len(self.entries)

    def read_data(
        self, entry: LogEntry, start: int = 0, length: int | None = None
    ) -> bytes:
        """Return ``length`` bytes of ``entry``'s data from byte ``start`` on.

        Raises:
            ConfigError: the entry carries no data, or the range is outside it.
        """
        if not entry.is_write:
            raise ConfigError(f"log entry {entry.describe()} carries no data")
        if length is None:
            length = entry.length - start
        if start < 0 or length < 0 or start + length > entry.length:
            raise ConfigError(
                f"bytes {start}..{start + length} are outside log entry"
                f" {entry.describe()}"
            )
        with self.path.open("rb") as stream:
            stream.seek(entry.data_offset + start)
            return stream.read(length)

    def flush_indices(self) -> list[int]:
        """Return the indices of the flush entries, in order."""
        return [entry.index for entry in self.entries if entry.is_flush]

    def writes(self, start: int = 0, end: int | None = None) -> list[LogEntry]:
        """Return the entries with data among ``entries[start:end]``."""
        return [entry for entry in self.entries[start:end] if entry.is_write]


def read_log(
    path: Path, *, disk_size: int | None = None, sector_size: int | None = None
) -> WriteLog:
    """Read the log at ``path``, also while QEMU is still appending to it.

    ``disk_size``, when given, rejects entries that reach past the disk.
    ``sector_size``, when given, is the log sector size QEMU was started with; it
    lets the reader take an all-zero superblock as one not written yet.

    Raises:
        ConfigError: the file cannot be read, its superblock is invalid, or an
            entry within the superblock's count is invalid or incomplete.
    """
    try:
        with path.open("rb") as stream:
            return _read_stream(path, stream.fileno(), disk_size, sector_size)
    except OSError as error:
        raise ConfigError(f"cannot read write log {path}: {error}") from error


def _read_stream(
    path: Path, fd: int, disk_size: int | None, expected_sector_size: int | None
) -> WriteLog:
    file_size = os.fstat(fd).st_size
    sector_size, counted = _read_superblock(path, fd, file_size, expected_sector_size)
    entries: list[LogEntry] = []
    position = sector_size
    while True:
        header = os.pread(fd, sector_size, position)
        problem = _header_problem(header, sector_size)
        entry = None
        if problem is None:
            entry = _entry(len(entries), header, position, sector_size)
            problem = _entry_problem(entry, file_size, disk_size)
        # NOTE: after a SIGKILL, a request whose log write was cut short can leave
        # zeros inside an entry's data that a later entry's write made the file
        # long enough to cover; such an entry reads as complete.
        if entry is None or problem is not None:
            if len(entries) < counted:
                raise ConfigError(
                    f"write log {path}: entry {len(entries)} at byte {position} is"
                    f" {problem}, but the superblock counts {counted} entries"
                )
            break
        entries.append(entry)
        position = entry.data_offset + _padded(_stored_length(entry), sector_size)
    log.debug(
        "read %s: %d entries (%d counted), %d bytes",
        path,
        len(entries),
        counted,
        file_size,
    )
    return WriteLog(path, sector_size, tuple(entries), counted)


def _read_superblock(
    path: Path, fd: int, file_size: int, expected_sector_size: int | None
) -> tuple[int, int]:
    raw = os.pread(fd, _SUPERBLOCK.size, 0)
    if expected_sector_size is not None and not any(raw):
        # Entries before the first flush, behind a superblock not written yet.
        return expected_sector_size, 0
    if len(raw) < _SUPERBLOCK.size:
        raise ConfigError(
            f"write log {path} has {file_size} bytes, fewer than its"
            f" {_SUPERBLOCK.size}-byte superblock; QEMU writes the superblock at the"
            " first flush, so the guest has not flushed yet or the file is not a log"
        )
    magic, version, counted, sector_size = _SUPERBLOCK.unpack(raw)
    if magic != MAGIC:
        raise ConfigError(
            f"write log {path}: magic {magic:#x}, expected {MAGIC:#x}"
            " (not a dm-log-writes log)"
        )
    if version != VERSION:
        raise ConfigError(f"write log {path}: version {version}, expected {VERSION}")
    if sector_size < _HEADER.size or sector_size & (sector_size - 1):
        raise ConfigError(
            f"write log {path}: sector size {sector_size}, expected a power of two"
            f" of at least {_HEADER.size}"
        )
    return sector_size, counted


def _header_problem(header: bytes, sector_size: int) -> str | None:
    if len(header) < sector_size:
        return "cut short by the end of the file"
    if not any(header):
        return "all zeros (not written)"
    flags = _HEADER.unpack_from(header)[2]
    if flags & ~_KNOWN_FLAGS:
        return f"carrying unknown flags {flags:#x}"
    # Linux stores a mark's text after the header fields, in the same sector.
    if not flags & MARK and any(header[_HEADER.size :]):
        return "not zero after its 32 header bytes"
    return None


def _entry(index: int, header: bytes, position: int, sector_size: int) -> LogEntry:
    sector, sectors, flags, _data_len = _HEADER.unpack_from(header)
    return LogEntry(
        index=index,
        offset=sector * sector_size,
        length=sectors * sector_size,
        flags=flags,
        data_offset=position + sector_size,
    )


def _entry_problem(
    entry: LogEntry, file_size: int, disk_size: int | None
) -> str | None:
    if not entry.flags & (FLUSH | DISCARD | MARK) and entry.length == 0:
        return "a write of no sectors"
    if entry.data_offset + _stored_length(entry) > file_size:
        return "missing part of its data (the file ends early)"
    if disk_size is not None and entry.end > disk_size:
        return f"reaching past the {disk_size}-byte disk ({entry.describe()})"
    return None


def _stored_length(entry: LogEntry) -> int:
    """Bytes of data the entry has in the log: discards and marks have none."""
    return 0 if entry.flags & (DISCARD | MARK) else entry.length


def _padded(length: int, sector_size: int) -> int:
    return -(-length // sector_size) * sector_size


class LogWriter:
    """Writes a dm-log-writes log file; the superblock is written by ``close()``.

    Use as a context manager. Offsets and lengths must be multiples of the sector
    size.
    """

    def __init__(self, path: Path, sector_size: int = DEFAULT_SECTOR_SIZE) -> None:
        self.path = path
        self.sector_size = sector_size
        self.count = 0
        self._stream = path.open("wb")
        self._stream.write(bytes(sector_size))

    def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        """Log a write of ``data`` at disk byte ``offset``.

        Raises:
            ConfigError: the offset or length is not a multiple of the sector size,
                or ``data`` is empty.
        """
        self._check_range(offset, len(data))
        if not data:
            raise ConfigError("a logged write needs at least one sector of data")
        self._entry(offset, len(data), FUA if fua else 0, data)

    def flush(self) -> None:
        """Log a completed flush of the write cache."""
        self._entry(0, 0, FLUSH, b"")

    def discard(self, offset: int, length: int) -> None:
        """Log a discard of ``length`` bytes at ``offset``."""
        self._check_range(offset, length)
        self._entry(offset, length, DISCARD, b"")

    def copy(self, source: WriteLog, entries: Iterable[LogEntry]) -> None:
        """Append ``entries`` of ``source`` with their data, flags unchanged."""
        for entry in entries:
            data = source.read_data(entry) if entry.is_write else b""
            self._entry(entry.offset, entry.length, entry.flags, data)

    def _check_range(self, offset: int, length: int) -> None:
        if offset % self.sector_size or length % self.sector_size:
            raise ConfigError(
                f"offset {offset} and length {length} must be multiples of the log"
                f" sector size {self.sector_size}"
            )

    def _entry(self, offset: int, length: int, flags: int, data: bytes) -> None:
        sector_size = self.sector_size
        header = _HEADER.pack(offset // sector_size, length // sector_size, flags, 0)
        self._stream.write(header.ljust(sector_size, b"\0"))
        self._stream.write(data)
        self._stream.write(bytes(_padded(len(data), sector_size) - len(data)))
        self.count += 1

    def close(self) -> None:
        """Write the superblock with the entry count and close the file."""
        if self._stream.closed:
            return
        superblock = _SUPERBLOCK.pack(MAGIC, VERSION, self.count, self.sector_size)
        self._stream.seek(0)
        self._stream.write(superblock)
        self._stream.close()

    def __enter__(self) -> LogWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def with_writes_durable(log: WriteLog) -> WriteLog:
    """Return ``log`` with every write marked FUA: the log of a disk without a
    write cache, where a write is durable once it completed."""
    entries = tuple(
        replace(entry, flags=entry.flags | FUA) if entry.is_write else entry
        for entry in log.entries
    )
    return replace(log, entries=entries)


def write_log_slice(source: WriteLog, start: int, end: int, output: Path) -> WriteLog:
    """Write ``source.entries[start:end]`` as a log of its own at ``output`` and read it
    back. Entry indices in the new log start at 0.

    Raises:
        ConfigError: the range is outside the log.
    """
    if not 0 <= start <= end <= len(source):
        raise ConfigError(
            f"log slice {start}..{end} is outside {source.path}, which has"
            f" {len(source)} entries"
        )
    entries: Sequence[LogEntry] = source.entries[start:end]
    with LogWriter(output, source.sector_size) as writer:
        writer.copy(source, entries)
    return read_log(output)
