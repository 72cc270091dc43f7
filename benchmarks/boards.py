"""Benchmark: boot to shell and full certification per board, against raw QEMU.

For each board, in one invocation so that the figures share the machine's load:

- raw boot: QEMU started by pexpect alone with the command line the harness uses:
  same firmware or kernel, device tree and disk overlay, its QMP socket left unused.
  It is driven to the shell prompt, with U-Boot's countdown stopped and ``boot`` typed
  on U-Boot boards;
- harness boot: ``Device.power_on()`` to its shell (overlay, QMP, console, shell setup);
- certification: ``mbl-sim certify`` of the board with every check (skipped when
  ``--no-certify`` is given).

Prints a Markdown table. Usage:

    python3 benchmarks/boards.py [--board NAME ...] [--rounds N] [--no-certify]
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

import pexpect

from mbl_sim.board import board_names, load_board
from mbl_sim.certify import certify
from mbl_sim.device import Device
from mbl_sim.images.recipe import DeviceImages, ImageBuilder
from mbl_sim.machine import create_overlay, qemu_command

BOOT_TIMEOUT = 180


def raw_qemu_boot(images: DeviceImages, workdir: Path) -> float:
    """Return the seconds from starting QEMU to the guest's shell prompt."""
    board = images.board
    overlay = workdir / "raw.qcow2"
    overlay.unlink(missing_ok=True)
    create_overlay(images.disk, overlay)
    transfer = workdir / "raw-transfer.img"
    with transfer.open("wb") as stream:
        stream.truncate(1 << 30)

    device = Device(images, workdir / "raw-files")
    command = qemu_command(
        board, [overlay, transfer], workdir / "raw-qmp.sock", boot=device.boot_files()
    )

    started = time.monotonic()
    # The mcimx6ul-evk console printed a byte that is not UTF-8 (0xb2) in one run.
    child = pexpect.spawn(
        command[0],
        command[1:],
        encoding="utf-8",
        codec_errors="replace",
        timeout=BOOT_TIMEOUT,
    )
    try:
        if board.firmware.is_u_boot:
            child.expect("Hit any key to stop autoboot")
            child.send(" ")
            child.expect(re.escape(board.firmware.prompt))
            child.sendline("boot")
        child.expect(r"mbl: system ready")
        child.sendline("")
        child.expect(r"mbl:/# ")
        return time.monotonic() - started
    finally:
        child.terminate(force=True)


def harness_boot(images: DeviceImages, workdir: Path, index: int) -> float:
    started = time.monotonic()
    with Device(images, workdir / f"harness-{index}") as device:
        device.power_on()
        return time.monotonic() - started


def measure(name: str, rounds: int, run_certify: bool, workdir: Path) -> list[str]:
    """Return the table row of one board."""
    board = load_board(name)
    images = ImageBuilder(board, report=lambda _: None).build()
    workdir.mkdir(parents=True)
    raw = [raw_qemu_boot(images, workdir) for _ in range(rounds)]
    harness = [harness_boot(images, workdir, index) for index in range(rounds)]
    raw_median = statistics.median(raw)
    harness_median = statistics.median(harness)
    certification = "not run"
    if run_certify:
        started = time.monotonic()
        report = certify(board, workdir / f"certify-{name}", report=lambda _: None)
        seconds = time.monotonic() - started
        certification = f"{seconds:.0f} s ({report.verdict})"
    return [
        name,
        images.kernel_release,
        f"{raw_median:.2f} s",
        f"{harness_median:.2f} s",
        f"{harness_median / raw_median:.2f}",
        certification,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--board",
        action="append",
        default=None,
        help="board to measure; repeat for several (default: every shipped board)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="boots of each kind")
    parser.add_argument("--no-certify", action="store_true", help="measure boots only")
    args = parser.parse_args()
    names = args.board or board_names()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mbl-bench-boards-") as scratch:
        for name in names:
            rows.append(
                measure(name, args.rounds, not args.no_certify, Path(scratch) / name)
            )
    print(
        "| board | kernel | raw QEMU boot to shell | mbl-sim boot to shell | ratio "
        "| full certification |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"boots: median of {args.rounds} each")


if __name__ == "__main__":
    main()
