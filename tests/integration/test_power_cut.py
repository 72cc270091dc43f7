"""Power cuts through the storage model on real guests: what survives a cut, armed
cuts, and a cut right after the updater reports the new root filesystem written."""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest

from mbl_sim.board import FLAGS_PARTITION
from mbl_sim.campaign.ext4 import check_filesystem, dump_files, replay_journal
from mbl_sim.campaign.record import payload_digests
from mbl_sim.device import Device
from mbl_sim.images.recipe import SLOT_PARTITIONS
from mbl_sim.storage import (
    KEEP_ALL,
    AfterFlushes,
    OnConsole,
    OnWriteRange,
    convert_to_raw,
    sparse_copy,
)
from updater.bootenv import EnvLocation, decode_env

pytestmark = pytest.mark.qemu

WRITTEN = r"mbl-update: root filesystem written to slot (?P<slot>[ab])"


def modelled_device(device_factory: Callable[..., Device]) -> Device:
    device = device_factory(power_on=False)
    device.attach_storage_model()
    device.power_on()
    return device


def test_power_cut_drops_unflushed_writes(
    device_factory: Callable[..., Device],
) -> None:
    device = modelled_device(device_factory)
    device.check_output("echo synced > /home/synced; sync")
    device.check_output("echo cached > /home/cached")

    cut = device.power_cut()

    assert cut is not None
    if device.board.storage.write_cache:
        assert cut.dropped_writes > 0
    else:
        # An SD card has no write cache: every completed write is durable.
        assert cut.dropped_writes == 0
        assert cut.durable_writes > 0
    assert cut.state.kept == frozenset()
    device.power_on()
    assert device.check_output("cat /home/synced") == "synced\n"
    assert device.run("test -e /home/cached").exit_status == 1
    assert (device.workdir / "power-cuts.jsonl").read_text().count("\n") == 1


def test_armed_cut_on_partition_write(device_factory: Callable[..., Device]) -> None:
    device = modelled_device(device_factory)
    device.arm_power_cut(OnWriteRange.partition(device.board, "home"), KEEP_ALL)
    device.check_output("echo kept > /home/kept; sync")

    cut = device.wait_for_power_cut(timeout=60)

    assert cut.armed_at is not None
    assert "partition home" in cut.trigger
    assert cut.state.point > cut.armed_at
    device.power_on()
    # The power failed right after the first write into the partition, before the
    # file's journal commit, so the file is missing but the filesystem mounts.
    assert device.run("test -e /home/kept").exit_status == 1
    assert device.booted_slot == "a"


def test_armed_cut_after_flushes(device_factory: Callable[..., Device]) -> None:
    device = device_factory(power_on=False)
    if not device.board.storage.write_cache:
        pytest.skip(f"board {device.board.name}: an SD card is never sent a flush")
    device.attach_storage_model()
    device.power_on()
    device.arm_power_cut(AfterFlushes(1))
    device.check_output("echo one > /home/one; sync; echo two > /home/two; sync")

    cut = device.wait_for_power_cut(timeout=60)

    assert "after flush 1" in cut.trigger
    device.power_on()
    assert device.booted_slot == "a"
    assert device.run("test -e /home/two").exit_status == 1


def partition_image(disk: Path, device: Device, slot: str, directory: Path) -> Path:
    partition = device.board.storage.layout[SLOT_PARTITIONS[slot]]
    image = directory / f"slot-{slot}.img"
    sparse_copy(disk, image, partition.start, partition.size)
    assert replay_journal(image) is None
    return image


def active_slot(disk: Path, device: Device, directory: Path) -> str:
    """Return the slot that the boot state on ``disk`` names: the environment's
    active_slot, or ``b`` when the bootflags partition contains the file rootfs2."""
    storage = device.board.storage
    if storage.env is None:
        flags = storage.layout[FLAGS_PARTITION]
        image = directory / "bootflags.img"
        sparse_copy(disk, image, flags.start, flags.size)
        assert replay_journal(image) is None
        found = dump_files(image, ["/rootfs2"], directory / "flags")
        return "a" if found["/rootfs2"] is None else "b"
    raw = []
    for offset in storage.env.offsets:
        with disk.open("rb") as stream:
            stream.seek(offset)
            raw.append(stream.read(storage.env.size))
    locations = [
        EnvLocation(str(disk), offset, storage.env.size)
        for offset in storage.env.offsets
    ]
    return decode_env(raw, locations).variables["active_slot"]


def test_cut_after_rootfs_written(
    device_factory: Callable[..., Device],
    rootfs_payload: Callable[..., Path],
    tmp_path: Path,
) -> None:
    payload = rootfs_payload(
        version="2.0.0", files={"etc/power-cut": b"after written\n"}
    )
    expected = payload_digests(payload)
    device = modelled_device(device_factory)
    on_device = device.deliver(payload)
    device.arm_power_cut(OnConsole(WRITTEN))
    device.console.sendline(f"mbl-update install --no-reboot {shlex.quote(on_device)}")

    cut = device.wait_for_power_cut(timeout=900)

    disk = convert_to_raw(device.disk, tmp_path / "after-cut.raw")
    active = active_slot(disk, device, tmp_path)
    new_slot = partition_image(disk, device, "b", tmp_path)
    assert check_filesystem(new_slot) is None
    contents = dump_files(new_slot, list(expected), tmp_path / "files")
    wrong = [
        path
        for path, digest in expected.items()
        if contents[path] is None
        or hashlib.sha256(contents[path] or b"").hexdigest() != digest
    ]
    assert wrong == [], (
        f"{len(wrong)} of {len(expected)} files differ, cut: {cut.describe()}"
    )

    device.power_on()

    booted = device.booted_slot
    assert booted == active
    assert check_filesystem(partition_image(disk, device, booted, tmp_path)) is None
    version = "2.0.0" if booted == "b" else device.images.factory_version
    assert device.version() == version
