"""When an armed power cut fires.

Triggers on writes and flushes are evaluated on the write log, after the fact: the
guest runs on, and the cut point is the log index where the trigger matched. The
disk state at that index is the same whether the guest was stopped there or ran
further, because the state of a cut at point N depends only on entries before N.
So these cuts are exact and deterministic. A console trigger cuts the power when
its pattern appears, at whatever log index QEMU has reached by then.

Counts start at the log index where the cut was armed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mbl_sim.board import Board
from mbl_sim.errors import ConfigError
from mbl_sim.storage.writelog import WriteLog

__all__ = [
    "AfterFlushes",
    "AfterWrites",
    "AtRandomWrite",
    "CutTrigger",
    "LogTrigger",
    "OnConsole",
    "OnWriteRange",
]


def _check_count(count: int, what: str) -> None:
    if count < 1:
        raise ConfigError(f"{what} must be at least 1, got {count}")


def _nth_write(log: WriteLog, start: int, count: int) -> int | None:
    seen = 0
    for entry in log.entries[start:]:
        if entry.is_write:
            seen += 1
            if seen == count:
                return entry.index + 1
    return None


@dataclass(frozen=True)
class AfterWrites:
    """Cut once the ``count``-th write since arming has completed."""

    count: int

    def __post_init__(self) -> None:
        _check_count(self.count, "write count")

    def describe(self) -> str:
        return f"after write {self.count} since arming"

    def find(self, log: WriteLog, start: int) -> int | None:
        """Return the cut point, or None while fewer writes are logged."""
        return _nth_write(log, start, self.count)


@dataclass(frozen=True)
class AfterFlushes:
    """Cut once the ``count``-th flush since arming has completed."""

    count: int

    def __post_init__(self) -> None:
        _check_count(self.count, "flush count")

    def describe(self) -> str:
        return f"after flush {self.count} since arming"

    def find(self, log: WriteLog, start: int) -> int | None:
        """Return the cut point, or None while fewer flushes are logged."""
        seen = 0
        for entry in log.entries[start:]:
            if entry.is_flush:
                seen += 1
                if seen == self.count:
                    return entry.index + 1
        return None


@dataclass(frozen=True)
class OnWriteRange:
    """Cut once the first write into ``[offset, offset+length)`` has completed.

    The write itself is then still in the write cache: the cut policy decides
    whether it is lost, kept or torn.
    """

    offset: int
    length: int
    name: str = ""

    def __post_init__(self) -> None:
        if self.offset < 0 or self.length < 1:
            raise ConfigError(
                f"byte range {self.offset}+{self.length}: expected offset >= 0 and"
                " length >= 1"
            )

    @classmethod
    def partition(cls, board: Board, name: str) -> OnWriteRange:
        """Return the trigger for the first write into partition ``name``.

        Raises:
            ConfigError: the board has no such partition.
        """
        for partition in board.storage.layout:
            if partition.name == name:
                return cls(partition.start, partition.size, f"partition {name}")
        names = ", ".join(p.name for p in board.storage.layout)
        raise ConfigError(
            f"board {board.name} has no partition {name!r}; its partitions: {names}"
        )

    @classmethod
    def environment(cls, board: Board, copy: int) -> OnWriteRange:
        """Return the trigger for the first write into environment copy ``copy``
        (0 or 1).

        Raises:
            ConfigError: the board keeps no environment in raw disk bytes.
        """
        env = board.storage.env
        if env is None:
            raise ConfigError(f"board {board.name} has no raw environment copies")
        return cls(env.offsets[copy], env.size, f"environment copy {copy + 1}")

    def describe(self) -> str:
        where = f"bytes {self.offset:#x}+{self.length:#x}"
        if self.name:
            where = f"{self.name} ({where})"
        return f"on the first write into {where}"

    def find(self, log: WriteLog, start: int) -> int | None:
        """Return the cut point, or None while no such write is logged."""
        for entry in log.entries[start:]:
            if entry.overlaps(self.offset, self.length):
                return entry.index + 1
        return None


@dataclass(frozen=True)
class AtRandomWrite:
    """Cut after a seeded random number of writes, from 1 to ``limit``."""

    seed: int
    limit: int

    def __post_init__(self) -> None:
        _check_count(self.limit, "write limit")

    @property
    def count(self) -> int:
        """The number of writes after which the cut fires."""
        return random.Random(self.seed).randint(1, self.limit)

    def describe(self) -> str:
        return (
            f"after write {self.count} since arming (seed {self.seed}, random in"
            f" 1..{self.limit})"
        )

    def find(self, log: WriteLog, start: int) -> int | None:
        """Return the cut point, or None while fewer writes are logged."""
        return _nth_write(log, start, self.count)


@dataclass(frozen=True)
class OnConsole:
    """Cut as soon as ``pattern``, a regular expression, appears on the console."""

    pattern: str

    def describe(self) -> str:
        return f"when the console shows {self.pattern!r}"


LogTrigger = AfterWrites | AfterFlushes | OnWriteRange | AtRandomWrite
CutTrigger = LogTrigger | OnConsole
