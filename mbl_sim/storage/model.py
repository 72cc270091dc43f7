"""The storage model of one device: its eMMC behind QEMU's write log.

While the device is on, QEMU attaches the eMMC as a ``blklogwrites`` node on top of
a qcow2 session overlay whose backing file is the device's disk. Every write, and
every flush, goes into the session log in completion order; the device's disk is
not written while QEMU runs. The session ends in one of two ways:

- a clean power-off commits the session overlay into the device's disk, because
  QEMU flushed everything on ``quit``;
- a power cut builds the crash state that the cut policy chooses on a raw copy of
  the disk, and makes it the device's disk through a new qcow2 overlay. By default
  every write that no flush covered is lost.

A disk without a write cache (an SD card: ``write_cache=False``) makes each write
durable when it completes, so the model reads its log with every write marked FUA,
and a cut loses only what had not completed. An SD card slot is filled by
``-drive if=sd``, so the same graph is also given as nested ``-drive`` options.

Files in the device's directory: ``session.qcow2`` and ``writes.log`` of the running
session, ``emmc-cut-N.raw`` (the disk after cut N, backing ``emmc.qcow2``),
``power-cut-N.log`` (the session log of cut N) and ``power-cuts.jsonl`` (one JSON
record per cut, with what reproduces it).

The guest's virtio-blk device gets ``write-zeroes=off``, as an eMMC has no such
command; this also avoids QEMU 7.2's blklogwrites misplacing the logged zeroes of
concurrent write-zeroes requests. It also gets ``request-merging=off``, because
QEMU 7.2 fails merged requests of 1024 buffers with EINVAL once blklogwrites adds
its header to them (seen as guest I/O errors during ``mke2fs``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mbl_sim.commands import run as run_command
from mbl_sim.errors import ConfigError, TargetError
from mbl_sim.machine import BlockdevDisk, Machine, create_overlay
from mbl_sim.storage.crash import (
    CrashState,
    CutPolicy,
    apply_state,
    durable_indices,
    image_digest,
    volatile_indices,
)
from mbl_sim.storage.triggers import CutTrigger, OnConsole
from mbl_sim.storage.writelog import (
    WriteLog,
    read_log,
    with_writes_durable,
    write_log_slice,
)

__all__ = [
    "PowerCut",
    "StorageModel",
    "blklogwrites_disk",
    "convert_to_raw",
]

log = logging.getLogger(__name__)

SESSION_DISK = "session.qcow2"
SESSION_LOG = "writes.log"
CUT_RECORDS = "power-cuts.jsonl"
LOG_SECTOR_SIZE = 512
POLL_SECONDS = 0.2

DEVICE_PROPERTIES = ("write-zeroes=off", "request-merging=off")


def _option_value(path: Path) -> str:
    # QEMU's option syntax ends a value at a comma, and ",," is a literal comma.
    return str(path).replace(",", ",,")


def blklogwrites_disk(image: Path, log_file: Path, node: str = "emmc") -> BlockdevDisk:
    """Return the ``-blockdev`` graph that attaches the qcow2 ``image`` through
    ``blklogwrites`` with its log in ``log_file``, which must exist.

    Host flushes are turned off on both files (``cache.no-flush=on``): what a flush
    makes durable is read from the log, so fsync on the host would only cost time.
    """
    return BlockdevDisk(
        nodes=(
            f"driver=file,node-name={node}-file,filename={_option_value(image)},"
            "cache.no-flush=on",
            f"driver=qcow2,node-name={node}-image,file={node}-file",
            f"driver=file,node-name={node}-log-file,filename={_option_value(log_file)},"
            "cache.no-flush=on",
            f"driver=blklogwrites,node-name={node},file={node}-image,"
            f"log={node}-log-file,log-sector-size={LOG_SECTOR_SIZE}",
        ),
        top=node,
        device_properties=DEVICE_PROPERTIES,
        drive=(
            f"node-name={node},driver=blklogwrites,log-sector-size={LOG_SECTOR_SIZE},"
            "file.driver=qcow2,file.file.driver=file,"
            f"file.file.filename={_option_value(image)},file.file.cache.no-flush=on,"
            f"log.driver=file,log.filename={_option_value(log_file)},"
            "log.cache.no-flush=on"
        ),
    )


def convert_to_raw(image: Path, output: Path) -> Path:
    """Write the whole content of disk ``image`` (raw or qcow2 with its backing
    chain) to the sparse raw file ``output``.

    Raises:
        BuildError: qemu-img failed.
    """
    # -U: QEMU may have the image open as a read-only backing file.
    run_command(["qemu-img", "convert", "-q", "-U", "-O", "raw", image, output])
    return output


@dataclass(frozen=True)
class PowerCut:
    """The record of one power cut, with what reproduces it.

    Attributes:
        number: cuts of this device so far, this one included.
        trigger: what fired the cut.
        policy: the cut policy, described.
        seed: the policy's seed.
        armed_at: log index at which the cut was armed, or None.
        state: the crash state that became the device's disk.
        entries: complete entries in the session log when QEMU was killed.
        durable_writes: writes that a flush or FUA had made durable.
        dropped_writes: cached writes that were lost (not kept, not torn).
        disk_before: content digest of the disk before the session.
        disk_after: content digest of the disk after the cut.
        log: the session log, kept for reproduction.
    """

    number: int
    trigger: str
    policy: str
    seed: int
    armed_at: int | None
    state: CrashState
    entries: int
    durable_writes: int
    dropped_writes: int
    disk_before: str
    disk_after: str
    log: Path

    def describe(self) -> str:
        """Return a one-line summary for the log."""
        torn = self.state.torn
        torn_text = (
            f", write {torn.index} torn after {torn.kept_bytes} bytes" if torn else ""
        )
        armed = f", armed at entry {self.armed_at}" if self.armed_at is not None else ""
        return (
            f"power cut {self.number}: {self.trigger}{armed}; cut point"
            f" {self.state.point} of {self.entries} log entries; policy"
            f" {self.policy}; {self.durable_writes} durable writes,"
            f" {len(self.state.kept)} cached writes kept, {self.dropped_writes}"
            f" dropped{torn_text}; disk before {self.disk_before[:16]},"
            f" after {self.disk_after[:16]}; log {self.log}"
        )

    def to_json(self) -> dict[str, Any]:
        """Return the record as a JSON-ready dictionary."""
        return {
            "number": self.number,
            "trigger": self.trigger,
            "policy": self.policy,
            "seed": self.seed,
            "armed_at": self.armed_at,
            "state": self.state.to_json(),
            "entries": self.entries,
            "durable_writes": self.durable_writes,
            "dropped_writes": self.dropped_writes,
            "disk_before": self.disk_before,
            "disk_after": self.disk_after,
            "log": str(self.log),
        }


class StorageModel:
    """The eMMC of one device, with a volatile write cache that power cuts empty.

    ``disk`` is the device's qcow2 disk, which the model replaces after a cut.
    ``write_cache`` False models a disk without one, such as an SD card.
    """

    def __init__(
        self,
        disk: Path,
        disk_size: int,
        *,
        name: str = "device",
        write_cache: bool = True,
    ) -> None:
        self.disk = disk
        self.disk_size = disk_size
        self.write_cache = write_cache
        self.workdir = disk.parent
        self.session_disk = self.workdir / SESSION_DISK
        self.session_log = self.workdir / SESSION_LOG
        self.cuts: list[PowerCut] = []
        self._session = False
        self._cut_backing: Path | None = None
        self._log = log.getChild(name)

    # -- sessions -------------------------------------------------------------------

    def start_session(self) -> BlockdevDisk:
        """Create an empty session overlay and log; return what QEMU attaches."""
        for path in (self.session_disk, self.session_log):
            path.unlink(missing_ok=True)
        create_overlay(self.disk, self.session_disk)
        self.session_log.touch()
        self._session = True
        self._log.debug(
            "session started: %s, log %s", self.session_disk, self.session_log
        )
        return blklogwrites_disk(self.session_disk, self.session_log)

    def read_log(self) -> WriteLog:
        """Read the session log as QEMU has written it so far.

        Raises:
            ConfigError: no session, or the log is invalid.
        """
        if not self._session:
            raise ConfigError(f"{self.disk}: no storage session; power the device on")
        if self.session_log.stat().st_size == 0:
            # QEMU writes the superblock at the first flush.
            return WriteLog(self.session_log, LOG_SECTOR_SIZE, (), 0)
        session_log = read_log(
            self.session_log, disk_size=self.disk_size, sector_size=LOG_SECTOR_SIZE
        )
        return session_log if self.write_cache else with_writes_durable(session_log)

    def settle(self, machine: Machine) -> int:
        """Pause the guest, count the log entries and resume; return the count.

        QEMU 7.2 completes every request in flight and flushes every disk when the
        guest stops (``do_vm_stop``), so all entries before the count are complete
        and durable.
        """
        machine.stop()
        try:
            count = len(self.read_log())
        finally:
            machine.cont()
        self._log.debug("settled at log entry %d", count)
        return count

    def commit_session(self) -> None:
        """Merge the session into the device's disk after QEMU exited cleanly."""
        if not self._session:
            return
        run_command(["qemu-img", "commit", "-q", self.session_disk])
        self.session_disk.unlink()
        self._session = False
        self._log.debug("session committed into %s", self.disk)

    def export_window(
        self, start: int, end: int, base: Path, window_log: Path
    ) -> WriteLog:
        """Write the disk as it was at log entry ``start`` to the raw image ``base``,
        and entries ``[start, end)`` to ``window_log``; return the window's log.

        ``start`` must be a count that ``settle()`` returned, so that nothing
        before it is still cached.

        Raises:
            ConfigError: a write before ``start`` is not durable.
        """
        session_log = self.read_log()
        cached = volatile_indices(session_log, start)
        if cached:
            raise ConfigError(
                f"{self.session_log}: {len(cached)} writes before entry {start} are"
                " not covered by a flush; take the start from settle()"
            )
        convert_to_raw(self.disk, base)
        apply_state(base, session_log, CrashState(start))
        return write_log_slice(session_log, start, end, window_log)

    # -- power cuts -----------------------------------------------------------------

    def cut(
        self,
        policy: CutPolicy,
        *,
        trigger: str,
        point: int | None = None,
        armed_at: int | None = None,
    ) -> PowerCut:
        """Replace the device's disk with the crash state of a cut at ``point``
        (default: after every complete log entry). QEMU must have exited.

        Raises:
            ConfigError: no session, or ``point`` is outside the log.
        """
        session_log = self.read_log()
        if point is None:
            point = len(session_log)
        state = policy.choose(session_log, point)
        number = len(self.cuts) + 1
        image = self.workdir / f"emmc-cut-{number}.raw"
        convert_to_raw(self.disk, image)
        before = image_digest(image)
        apply_state(image, session_log, state)
        after = image_digest(image)
        kept_log = self.workdir / f"power-cut-{number}.log"
        self.session_log.replace(kept_log)
        self._replace_disk(image)
        cut = PowerCut(
            number=number,
            trigger=trigger,
            policy=policy.describe(),
            seed=policy.seed,
            armed_at=armed_at,
            state=state,
            entries=len(session_log),
            durable_writes=len(durable_indices(session_log, point)),
            dropped_writes=self._dropped(session_log, state),
            disk_before=before,
            disk_after=after,
            log=kept_log,
        )
        self.cuts.append(cut)
        self._record(cut)
        return cut

    @staticmethod
    def _dropped(session_log: WriteLog, state: CrashState) -> int:
        volatile = volatile_indices(session_log, state.point)
        torn = {state.torn.index} if state.torn else set()
        return len([i for i in volatile if i not in state.kept and i not in torn])

    def _replace_disk(self, image: Path) -> None:
        """Make the raw ``image`` the device's disk, through a new overlay."""
        self.session_disk.unlink(missing_ok=True)
        self.disk.unlink()
        create_overlay(image, self.disk)
        if self._cut_backing is not None:
            self._cut_backing.unlink(missing_ok=True)
        self._cut_backing = image
        self._session = False

    def _record(self, cut: PowerCut) -> None:
        self._log.warning("%s", cut.describe())
        with (self.workdir / CUT_RECORDS).open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(cut.to_json(), sort_keys=True) + "\n")

    # -- armed cuts -----------------------------------------------------------------

    def wait_for_trigger(
        self,
        trigger: CutTrigger,
        armed_at: int,
        timeout: float,
        *,
        expect: Callable[[str, float], object],
        drain: Callable[[float], object],
    ) -> int | None:
        """Wait until ``trigger`` fires and return its cut point, or None for a
        console trigger (the cut point is then wherever QEMU is when it dies).

        ``expect(pattern, timeout)`` waits for a console pattern. ``drain(seconds)``
        reads the console while the log is polled, because a guest whose serial
        output fills the pty stalls.

        Raises:
            TargetError: a log trigger did not fire within ``timeout`` seconds.
            ConsoleTimeoutError, ConsoleAbortError: from ``expect``.
        """
        if isinstance(trigger, OnConsole):
            expect(trigger.pattern, timeout)
            return None
        deadline = time.monotonic() + timeout
        while True:
            session_log = self.read_log()
            point = trigger.find(session_log, armed_at)
            if point is not None:
                return point
            if time.monotonic() > deadline:
                since = session_log.entries[armed_at:]
                writes = sum(entry.is_write for entry in since)
                flushes = sum(entry.is_flush for entry in since)
                raise TargetError(
                    f"armed power cut {trigger.describe()} did not fire within"
                    f" {timeout:g} s; the log has {writes} writes and {flushes}"
                    f" flushes since entry {armed_at}"
                )
            drain(POLL_SECONDS)
