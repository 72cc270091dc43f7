"""The plan of the crash states that a campaign checks.

The durability points of the update's write log split it into intervals. A
durability point is a flush, or a FUA write, whose data is durable once it
completes; on a device without a write cache (an SD card) every write is one.
Interval k runs from the end of point k-1 to the end of point k (point 0 is the
start of the log). For each interval the plan contains:

- ``fNNN``: the state after point k, in which every earlier write that a flush or
  FUA covered is durable; ``f000`` is the disk when the update started;
- ``fNNN-sJ``: power fails while flush k is still running: a seeded random subset
  of the interval's writes reached the medium (neither none nor all of them,
  which are ``fNNN`` of the interval before and this one);
- ``fNNN-tJ``: as ``-sJ``, and one write of more than one sector is torn after a
  seeded number of sectors.

Writes after the last flush form one more interval, ``end``, with the same
variants and ``end-all``, in which all of them reached the medium.

Each variant has its own seed, derived from the campaign seed and its name, so
a state is the same whatever else the plan holds. When the plan is limited, the
states around writes into the focus ranges (by default the environment copies,
where an update flips its slot) come first: the intervals with such a write and
the ``focus_after`` intervals after each.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

from mbl_sim.errors import ConfigError
from mbl_sim.storage import CrashState, LogEntry, TornWrite, WriteLog

__all__ = [
    "DEFAULT_BOOT_STATES",
    "UNLIMITED_CAP",
    "PlanOptions",
    "PlannedState",
    "focus_intervals",
    "plan_states",
]

UNLIMITED_CAP = 1000
"""States planned without ``max_states`` when the log has more. On an SD card every
write is a durability point, and a root filesystem update makes about 700,000."""

DEFAULT_BOOT_STATES = 16
"""States booted when no boot share is given. A boot check takes about ten
seconds, against a fraction of a second for host checks."""


@dataclass(frozen=True)
class PlanOptions:
    """Limits of the plan: the number of states and the share of them to boot.

    Attributes:
        seed: the campaign seed.
        subsets: random subset variants per interval.
        torn: torn-write variants per interval.
        max_states: plan at most this many states; None for all, but at most
            ``UNLIMITED_CAP``.
        boot_share: share of the planned states to boot, 0 to 1; None boots all
            of them when there are at most ``DEFAULT_BOOT_STATES``, else that many.
        focus_after: intervals after each focus write that are in focus too.
    """

    seed: int = 0
    subsets: int = 2
    torn: int = 1
    max_states: int | None = None
    boot_share: float | None = None
    focus_after: int = 8

    def __post_init__(self) -> None:
        if self.subsets < 0 or self.torn < 0 or self.focus_after < 0:
            raise ConfigError("subsets, torn and focus_after must not be negative")
        if self.max_states is not None and self.max_states < 1:
            raise ConfigError(f"max_states must be at least 1, got {self.max_states}")
        if self.boot_share is not None and not 0.0 <= self.boot_share <= 1.0:
            raise ConfigError(f"boot share {self.boot_share} is outside 0..1")


@dataclass(frozen=True)
class PlannedState:
    """One crash state to check.

    Attributes:
        name: ``f012``, ``f012-s1``, ``f012-t0``, ``end-all``…
        interval: the interval's number; the ``end`` interval follows the last.
        kind: ``flush``, ``subset``, ``torn`` or ``all``.
        seed: the variant's seed; 0 for ``flush`` states.
        state: the crash state.
        focus: whether the state is near a write into a focus range.
        boot: whether the state is also booted.
    """

    name: str
    interval: int
    kind: str
    seed: int
    state: CrashState
    focus: bool = False
    boot: bool = False


def _variant_seed(seed: int, name: str) -> int:
    return random.Random(f"{seed}/{name}").getrandbits(32)


def _random_subset(items: Sequence[int], rng: random.Random) -> frozenset[int]:
    return frozenset(item for item in items if rng.random() < 0.5)


def _subset_variants(
    prefix: str, interval: int, point: int, cached: Sequence[int], options: PlanOptions
) -> list[PlannedState]:
    if len(cached) < 2:
        return []
    states: list[PlannedState] = []
    seen: set[frozenset[int]] = set()
    for number in range(options.subsets):
        name = f"{prefix}-s{number}"
        seed = _variant_seed(options.seed, name)
        rng = random.Random(seed)
        for _attempt in range(16):
            kept = _random_subset(cached, rng)
            if 0 < len(kept) < len(cached) and kept not in seen:
                seen.add(kept)
                state = CrashState(point, kept)
                states.append(PlannedState(name, interval, "subset", seed, state))
                break
    return states


def _torn_variants(
    log: WriteLog,
    prefix: str,
    interval: int,
    point: int,
    cached: Sequence[int],
    options: PlanOptions,
) -> list[PlannedState]:
    multi_sector = [i for i in cached if log.entries[i].length > log.sector_size]
    if not multi_sector:
        return []
    states: list[PlannedState] = []
    seen: set[CrashState] = set()
    for number in range(options.torn):
        name = f"{prefix}-t{number}"
        seed = _variant_seed(options.seed, name)
        rng = random.Random(seed)
        index = rng.choice(multi_sector)
        sectors = log.entries[index].length // log.sector_size
        torn = TornWrite(index, rng.randrange(1, sectors) * log.sector_size)
        kept = _random_subset([i for i in cached if i != index], rng)
        state = CrashState(point, kept, torn)
        if state not in seen:
            seen.add(state)
            states.append(PlannedState(name, interval, "torn", seed, state))
    return states


def _interval_states(
    log: WriteLog,
    options: PlanOptions,
    interval: int,
    start: int,
    end: int,
    flush: int | None,
) -> list[PlannedState]:
    """Return the states of the interval whose writes are ``entries[start:end]`` and
    whose durability point is entry ``flush`` (None for the writes after the last)."""
    cached = [
        entry.index
        for entry in log.entries[start:end]
        if entry.is_write and not entry.is_fua
    ]
    prefix = f"f{interval:03d}" if flush is not None else "end"
    point = end
    states = _subset_variants(prefix, interval, point, cached, options)
    states += _torn_variants(log, prefix, interval, point, cached, options)
    if flush is not None:
        states.append(PlannedState(prefix, interval, "flush", 0, CrashState(flush + 1)))
    elif cached:
        everything = CrashState(point, frozenset(cached))
        states.append(PlannedState("end-all", interval, "all", 0, everything))
    return states


def _ends_interval(entry: LogEntry) -> bool:
    return entry.is_flush or (entry.is_write and entry.is_fua)


def _all_states(log: WriteLog, options: PlanOptions) -> list[PlannedState]:
    states = [PlannedState("f000", 0, "flush", 0, CrashState(0))]
    start = 0
    interval = 0
    for entry in log.entries:
        if _ends_interval(entry):
            interval += 1
            index = entry.index
            states += _interval_states(log, options, interval, start, index, index)
            start = index + 1
    states += _interval_states(log, options, interval + 1, start, len(log), None)
    return states


def focus_intervals(
    log: WriteLog, ranges: Sequence[tuple[int, int]], focus_after: int = 0
) -> frozenset[int]:
    """Return the intervals with a write into one of the (offset, length) byte
    ``ranges``, and the ``focus_after`` intervals after each."""
    focus: set[int] = set()
    interval = 1
    for entry in log.entries:
        if any(entry.overlaps(offset, length) for offset, length in ranges):
            focus.update(range(interval, interval + focus_after + 1))
        if _ends_interval(entry):
            interval += 1
    return frozenset(focus)


def _spread(items: Sequence[PlannedState], count: int) -> list[PlannedState]:
    """Return ``count`` of ``items``, evenly spaced, the first and last included."""
    if count >= len(items):
        return list(items)
    if count <= 0:
        return []
    if count == 1:
        return [items[0]]
    step = (len(items) - 1) / (count - 1)
    return [items[round(number * step)] for number in range(count)]


def _prioritised(states: Sequence[PlannedState], count: int) -> list[PlannedState]:
    """Return ``count`` states: focus states first, the rest evenly spaced; in the
    order of ``states``."""
    focus = [state for state in states if state.focus]
    other = [state for state in states if not state.focus]
    if len(focus) >= count:
        chosen = _spread(focus, count)
    else:
        chosen = focus + _spread(other, count - len(focus))
    names = {state.name for state in chosen}
    return [state for state in states if state.name in names]


def _boot_count(total: int, share: float | None) -> int:
    if share is None:
        return min(total, DEFAULT_BOOT_STATES)
    return round(share * total)


def plan_states(
    log: WriteLog,
    options: PlanOptions,
    focus_ranges: Sequence[tuple[int, int]] = (),
) -> list[PlannedState]:
    """Return the crash states to check for ``log``, in log order.

    ``focus_ranges`` are (offset, length) byte ranges of the disk.
    """
    focus = focus_intervals(log, focus_ranges, options.focus_after)
    states = [
        replace(state, focus=state.interval in focus)
        for state in _all_states(log, options)
    ]
    limit = UNLIMITED_CAP if options.max_states is None else options.max_states
    if len(states) > limit:
        states = _prioritised(states, limit)
    booted = {
        state.name
        for state in _prioritised(states, _boot_count(len(states), options.boot_share))
    }
    return [replace(state, boot=state.name in booted) for state in states]
