"""Benchmark: boot to shell and root filesystem update, harness against baselines.

Both measurements run in one invocation, so the ratios compare like with like on the
same machine under the same load:

- boot: ``Device.power_on()`` (overlay, QMP, console, shell setup) against a raw
  ``qemu-system-aarch64`` started with the same images and driven by pexpect to the same
  point: autoboot stopped, ``boot`` typed, the system's ready line and the shell prompt;
- update: ``mbl-update install --no-reboot`` of a payload holding the device's own root
  filesystem against the guest running ``mke2fs`` and busybox ``tar -xJf`` of the same
  ``rootfs.tar.xz`` into the same inactive partition.

Usage: python3 benchmarks/boot_and_update.py [--rounds N] [--board NAME]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pexpect

from mbl_sim.board import DEFAULT_BOARD, load_board
from mbl_sim.device import Device
from mbl_sim.images.cache import default_cache_dir
from mbl_sim.images.recipe import DeviceImages, ImageBuilder
from mbl_sim.machine import create_overlay
from mbl_sim.payloads import RootfsChange, cached_rootfs_payload


def raw_qemu_boot(images: DeviceImages, workdir: Path) -> float:
    """Return the seconds from starting a bare QEMU to the shell prompt."""
    board = images.board
    overlay = workdir / "raw.qcow2"
    overlay.unlink(missing_ok=True)
    create_overlay(images.disk, overlay)
    command = [
        board.qemu.binary,
        "-M",
        board.qemu.machine,
        "-cpu",
        board.qemu.cpu,
        "-m",
        str(board.qemu.memory >> 20),
        "-nographic",
        "-nic",
        "none",
        "-bios",
        str(board.firmware.path),
        "-drive",
        f"if=none,id=emmc,file={overlay},format=qcow2",
        "-device",
        "virtio-blk-pci,drive=emmc",
    ]
    started = time.monotonic()
    child = pexpect.spawn(command[0], command[1:], encoding="utf-8", timeout=120)
    try:
        child.expect("Hit any key to stop autoboot")
        child.send(" ")
        child.expect("=> ")
        child.sendline("boot")
        child.expect(r"mbl: system ready")
        child.sendline("")
        child.expect(r"mbl:/# ")
        return time.monotonic() - started
    finally:
        child.terminate(force=True)


def harness_boot(images: DeviceImages, workdir: Path) -> float:
    started = time.monotonic()
    with Device(images, workdir / "harness-boot") as device:
        device.power_on()
        return time.monotonic() - started


def timed(device: Device, command: str) -> float:
    started = time.monotonic()
    device.run(command, timeout=900, check=True)
    return time.monotonic() - started


def update_times(
    images: DeviceImages, workdir: Path, payload: Path
) -> tuple[float, float]:
    """Return (updater seconds, mke2fs + tar -xJf seconds) on one booted device."""
    inactive = images.board.storage.layout["rootfs2"].device
    with Device(images, workdir / "update") as device:
        device.power_on()
        on_device = device.deliver(payload)
        device.run(f"cd /scratch && tar -xf {on_device} rootfs.tar.xz", check=True)
        baseline = timed(
            device,
            # Debian's static busybox ash prefers its own applets, so e2fsprogs'
            # mke2fs is named by path, as the updater finds it through PATH.
            f"/sbin/mke2fs -F -q -t ext4 {inactive} && mkdir -p /mnt/b && "
            f"mount -t ext4 {inactive} /mnt/b && "
            "tar -xJf /scratch/rootfs.tar.xz -C /mnt/b && umount /mnt/b",
        )
        updater = timed(device, f"mbl-update install --no-reboot {on_device}")
        return updater, baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="boots of each kind")
    parser.add_argument("--board", default=DEFAULT_BOARD)
    args = parser.parse_args()
    images = ImageBuilder(load_board(args.board), report=lambda _: None).build()
    payload = cached_rootfs_payload(
        images.rootfs, default_cache_dir(), RootfsChange(version="bench")
    )
    with tempfile.TemporaryDirectory(prefix="mbl-bench-") as scratch:
        workdir = Path(scratch)
        raw = [raw_qemu_boot(images, workdir) for _ in range(args.rounds)]
        harness = [harness_boot(images, workdir) for _ in range(args.rounds)]
        updater, baseline = update_times(images, workdir, payload)
    raw_boot = statistics.median(raw)
    harness_time = statistics.median(harness)
    print(f"board {images.board.name}, kernel {images.kernel_release}")
    print(f"root filesystem: {payload.stat().st_size} bytes compressed payload")
    print("| measurement | mbl-sim | baseline | ratio | target |")
    print("|---|---|---|---|---|")
    print(
        f"| boot to shell (median of {args.rounds}) | {harness_time:.2f} s "
        f"| {raw_boot:.2f} s (raw QEMU) | {harness_time / raw_boot:.2f} | ≤ 1.15 |"
    )
    print(
        f"| root filesystem update | {updater:.2f} s | {baseline:.2f} s "
        f"(mke2fs + tar -xJf) | {updater / baseline:.2f} | ≤ 1.5 |"
    )


if __name__ == "__main__":
    main()
