"""Record an update once, with every write and flush, for the campaign to replay.

A device boots with its eMMC behind the storage model, receives the payload, and
runs the update. Just before and just after the update the guest is paused, which
completes and flushes everything in flight, so the update's window of the write log
starts on a durable disk. The recording directory then holds:

- ``start.raw``: the disk when the update started (sparse, raw);
- ``update.log``: the update's writes and flushes, a dm-log-writes log;
- ``recording.json``: the slots, versions and file digests that the checks expect;
- ``device/``: the recording device's console transcript.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import shutil
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mbl_sim.campaign.apps import APPS_PARTITION, inspect_apps
from mbl_sim.campaign.ext4 import dump_files, replay_journal
from mbl_sim.campaign.updates import MARKER_PATH, UpdateScenario
from mbl_sim.device import Device
from mbl_sim.errors import ConfigError, UpdateFailedError
from mbl_sim.images.recipe import SLOT_PARTITIONS, DeviceImages
from mbl_sim.payloads import (
    ROOTFS_MEMBER,
    VERSION_FILE,
)
from mbl_sim.storage import (
    CrashState,
    WriteLog,
    image_digest,
    materialise,
    read_log,
    volatile_indices,
)

__all__ = ["Recording", "SlotExpectation", "record"]

log = logging.getLogger(__name__)

RECORDING_FILE = "recording.json"
BASE_FILE = "start.raw"
LOG_FILE = "update.log"
UPDATE_TIMEOUT = 900.0
LAST_MEMBERS = 8
"""Payload members written last, always in the sample: a flag that flips too
early loses them first."""


@dataclass(frozen=True)
class SlotExpectation:
    """The expected content of a slot, for the states that boot it.

    Attributes:
        slot: ``a`` or ``b``.
        partition: the slot's partition name.
        version: the content of /etc/mbl-version.
        files: SHA-256 of sampled files by absolute path; None for a file that
            must not exist there.
    """

    slot: str
    partition: str
    version: str
    files: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Recording:
    """One recorded update, as the checks read it.

    Attributes:
        directory: where the files are.
        update: the update's name.
        faulty: whether the update is wrong on purpose.
        board_source: the board file.
        old: the slot that ran the update.
        new: the slot the update wrote.
        base_digest: content digest of ``start.raw``.
        log_digest: SHA-256 of ``update.log``.
        seconds: how long the update took in the guest.
        output: the update command's output.
        apps_before: application versions by name when the update started.
        apps_after: application versions by name once it finished.
    """

    directory: Path
    update: str
    faulty: bool
    board_source: str
    old: SlotExpectation
    new: SlotExpectation
    base_digest: str
    log_digest: str
    seconds: float
    output: str
    apps_before: dict[str, str] = field(default_factory=dict)
    apps_after: dict[str, str] = field(default_factory=dict)

    @property
    def base(self) -> Path:
        """The disk when the update started."""
        return self.directory / BASE_FILE

    @property
    def log_path(self) -> Path:
        """The update's write log."""
        return self.directory / LOG_FILE

    def read_log(self) -> WriteLog:
        """Read the update's write log."""
        return read_log(self.log_path)

    def expectation(self, slot: str) -> SlotExpectation | None:
        """Return the expected content of ``slot``, or None for an unknown slot."""
        return {self.old.slot: self.old, self.new.slot: self.new}.get(slot)

    def save(self) -> None:
        """Write ``recording.json``."""
        document = asdict(self)
        document["directory"] = None
        text = json.dumps(document, indent=2, sort_keys=True) + "\n"
        (self.directory / RECORDING_FILE).write_text(text)

    @classmethod
    def load(cls, directory: Path) -> Recording:
        """Read the recording in ``directory``.

        Raises:
            ConfigError: the file is missing or invalid.
        """
        path = directory / RECORDING_FILE
        try:
            document: dict[str, Any] = json.loads(path.read_text())
            document["directory"] = directory
            document["old"] = SlotExpectation(**document["old"])
            document["new"] = SlotExpectation(**document["new"])
            return cls(**document)
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise ConfigError(f"cannot read recording {path}: {error!r}") from error


def file_digest(path: Path) -> str:
    """Return the SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def payload_digests(payload: Path) -> dict[str, str]:
    """Return the SHA-256 of every regular file in a root filesystem payload, by
    absolute path, in the order the updater writes them (tar order).

    Raises:
        ConfigError: the payload has no regular ``rootfs.tar.xz`` member.
    """
    digests: dict[str, str] = {}
    with tarfile.open(payload) as outer:
        inner_file = outer.extractfile(ROOTFS_MEMBER)
        if inner_file is None:
            raise ConfigError(f"payload {payload} has no regular {ROOTFS_MEMBER}")
        with inner_file, tarfile.open(fileobj=inner_file, mode="r|xz") as inner:
            for member in inner:
                if not member.isreg():
                    continue
                data = inner.extractfile(member)
                assert data is not None
                name = "/" + member.name.removeprefix("./").lstrip("/")
                digests[name] = hashlib.sha256(data.read()).hexdigest()
    return digests


def choose_sample(paths: Sequence[str], count: int | None, seed: int) -> list[str]:
    """Return the files to compare: the version file, the marker, the last
    ``LAST_MEMBERS`` in order, and seeded random others up to ``count`` in all.
    ``count`` None takes every file. The result keeps the order of ``paths``."""
    if count is None:
        return list(paths)
    always = {"/" + VERSION_FILE, "/" + MARKER_PATH, *paths[-LAST_MEMBERS:]}
    chosen = {path for path in paths if path in always}
    rest = [path for path in paths if path not in chosen]
    extra = max(0, count - len(chosen))
    chosen.update(random.Random(seed).sample(rest, min(extra, len(rest))))
    return [path for path in paths if path in chosen]


def slot_contents(
    images: DeviceImages,
    base: Path,
    window: WriteLog,
    slot: str,
    paths: Sequence[str],
    scratch: Path,
) -> dict[str, str | None]:
    """Return the SHA-256 of ``paths`` in ``slot`` of the disk ``base`` (None for
    a missing file), after replaying the slot's journal as a mount would."""
    partition = images.board.storage.layout[SLOT_PARTITIONS[slot]]
    scratch.mkdir(parents=True, exist_ok=True)
    image = scratch / f"slot-{slot}.img"
    materialise(
        base,
        window,
        CrashState(0),
        image,
        offset=partition.start,
        length=partition.size,
    )
    problem = replay_journal(image)
    if problem is not None:
        raise ConfigError(f"slot {slot} of {base} before the update: {problem}")
    contents = dump_files(image, paths, scratch / f"files-{slot}")
    return {
        path: None if data is None else hashlib.sha256(data).hexdigest()
        for path, data in contents.items()
    }


def app_versions(
    images: DeviceImages, base: Path, window: WriteLog, state: CrashState, scratch: Path
) -> dict[str, str]:
    """Return the application versions of ``state``, as the device would run them.

    Raises:
        ConfigError: the applications are inconsistent in that state.
    """
    layout = images.board.storage.layout
    if APPS_PARTITION not in {partition.name for partition in layout}:
        return {}
    partition = layout[APPS_PARTITION]
    scratch.mkdir(parents=True, exist_ok=True)
    image = scratch / "home.img"
    materialise(
        base, window, state, image, offset=partition.start, length=partition.size
    )
    apps = inspect_apps(image, scratch / "apps")
    if apps.problems:
        raise ConfigError(
            f"applications of {base} at {state.label()}: {'; '.join(apps.problems)}"
        )
    return apps.versions


def record(
    images: DeviceImages,
    update: UpdateScenario,
    directory: Path,
    *,
    content_files: int | None = 32,
    seed: int = 0,
    report: Callable[[str], None] = lambda message: None,
) -> Recording:
    """Run ``update`` once on a fresh device and record it into ``directory``.

    ``content_files`` is how many files of each slot the checks compare (None:
    every file of the payload).

    Raises:
        UpdateFailedError: the update command failed.
        MblSimError: the device did not boot or the recording failed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    payload = update.payload(images, directory)
    report(f"recording {update.name}: {update.description}")
    device = Device(images, directory / "device", name="recording")
    try:
        device.attach_storage_model()
        device.power_on()
        if update.prepare is not None:
            update.prepare(device, directory)
        old_slot = device.running_slot()
        old_version = device.version()
        seconds, output = _run_update(device, update, payload, directory)
    finally:
        device.close()
    report(f"  update ran in {seconds:.1f} s; computing expected contents")
    scratch = directory / "scratch"
    try:
        recording = _finish(
            images, update, directory, payload, old_slot, old_version, scratch
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    recording = dataclasses.replace(
        recording,
        seconds=seconds,
        output=output,
        old=_sampled(recording.old, content_files, seed),
        new=_sampled(recording.new, content_files, seed),
    )
    recording.save()
    return recording


def _run_update(
    device: Device, update: UpdateScenario, payload: Path, directory: Path
) -> tuple[float, str]:
    storage = device.storage
    machine = device.machine
    assert storage is not None and machine is not None
    on_device = device.deliver(payload)
    command = update.command(device, on_device)
    start = storage.settle(machine)
    started = time.monotonic()
    result = device.run(command, UPDATE_TIMEOUT)
    seconds = time.monotonic() - started
    if result.exit_status != 0:
        raise UpdateFailedError(
            f"recording {update.name}: {command!r} exited with status"
            f" {result.exit_status}:\n{result.output}"
        )
    end = storage.settle(machine)
    window = storage.export_window(
        start, end, directory / BASE_FILE, directory / LOG_FILE
    )
    log.info(
        "recorded %s: log entries %d..%d of the session, %d writes, %d flushes",
        update.name,
        start,
        end,
        len(window.writes()),
        len(window.flush_indices()),
    )
    return seconds, result.output


def _sampled(
    expected: SlotExpectation, count: int | None, seed: int
) -> SlotExpectation:
    sample = choose_sample(list(expected.files), count, seed)
    return dataclasses.replace(expected, files={p: expected.files[p] for p in sample})


def _finish(
    images: DeviceImages,
    update: UpdateScenario,
    directory: Path,
    payload: Path,
    old_slot: str,
    old_version: str,
    scratch: Path,
) -> Recording:
    """Return the recording with every expected file; ``record`` samples them."""
    window = read_log(directory / LOG_FILE)
    base = directory / BASE_FILE
    end = CrashState(len(window), frozenset(volatile_indices(window, len(window))))
    old_partition = SLOT_PARTITIONS[old_slot]
    if update.writes_slot:
        new_slot = "b" if old_slot == "a" else "a"
        new_files: dict[str, str | None] = dict(payload_digests(payload))
        old_files = slot_contents(
            images, base, window, old_slot, list(new_files), scratch
        )
        old = SlotExpectation(old_slot, old_partition, old_version, old_files)
        new = SlotExpectation(
            new_slot, SLOT_PARTITIONS[new_slot], update.version, new_files
        )
    else:
        old = new = SlotExpectation(old_slot, old_partition, old_version, {})
    return Recording(
        directory=directory,
        update=update.name,
        faulty=update.faulty,
        board_source=images.board.source,
        old=old,
        new=new,
        base_digest=image_digest(base),
        log_digest=file_digest(directory / LOG_FILE),
        seconds=0.0,
        output="",
        apps_before=app_versions(
            images, base, window, CrashState(0), scratch / "before"
        ),
        apps_after=app_versions(images, base, window, end, scratch / "after"),
    )
