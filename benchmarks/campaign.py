"""Benchmark: crash states checked per minute per core, on the host and by booting.

A root filesystem update is recorded once (or an earlier recording is reused), then
its crash states are checked four times: host checks only, and host plus boot
checks, each with one worker process and with two. The rate per core is states
per minute divided by the number of workers; the speed-up compares two workers with
one on the same states.

Usage: python3 benchmarks/campaign.py [--host-states N] [--boot-states N]
                                      [--recording DIR] [--board NAME]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mbl_sim.board import DEFAULT_BOARD, load_board
from mbl_sim.campaign import (
    CampaignOptions,
    PlanOptions,
    Recording,
    check_recording,
    record,
)
from mbl_sim.campaign.updates import resolve_update
from mbl_sim.images.recipe import DeviceImages, ImageBuilder

HOST_TARGET = 30.0
BOOT_TARGET = 6.0
SPEED_UP_TARGET = 1.8


@dataclass(frozen=True)
class Run:
    kind: str
    workers: int
    states: int
    seconds: float

    @property
    def per_minute(self) -> float:
        return self.states / self.seconds * 60.0

    @property
    def per_core(self) -> float:
        return self.per_minute / self.workers


def check(
    images: DeviceImages,
    recording: Recording,
    directory: Path,
    kind: str,
    workers: int,
    plan: PlanOptions,
) -> Run:
    options = CampaignOptions(workers=workers, plan=plan, bundles=False)
    started = time.monotonic()
    result = check_recording(
        images, recording, directory / f"{kind}-{workers}", options
    )
    seconds = time.monotonic() - started
    if result.bad or result.errors:
        raise SystemExit(
            f"{kind} with {workers} workers: bad states, see {result.report}"
        )
    return Run(kind, workers, len(result.results), seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--host-states", type=int, default=400, help="host-checked states"
    )
    parser.add_argument("--boot-states", type=int, default=16, help="booted states")
    parser.add_argument(
        "--recording", type=Path, default=None, help="reuse this recording"
    )
    parser.add_argument("--board", default=DEFAULT_BOARD)
    args = parser.parse_args()
    images = ImageBuilder(load_board(args.board), report=lambda _: None).build()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="mbl-bench-campaign-") as scratch:
        directory = Path(scratch)
        if args.recording is not None:
            recording = Recording.load(args.recording)
        else:
            recording = record(
                images, resolve_update("rootfs"), directory / "recording"
            )
        # More variants per flush interval than the default, so that the host runs
        # have enough states to time.
        host_plan = PlanOptions(
            subsets=12, torn=6, max_states=args.host_states, boot_share=0.0
        )
        boot_plan = PlanOptions(max_states=args.boot_states, boot_share=1.0)
        runs = [
            check(images, recording, directory, kind, workers, plan)
            for kind, plan in (("host", host_plan), ("boot", boot_plan))
            for workers in (1, 2)
        ]
        entries = len(recording.read_log())
    load_after = os.getloadavg()[0]
    print(f"board {images.board.name}, kernel {images.kernel_release}")
    print(
        f"{os.cpu_count()} CPUs; 1-minute load average {load_before:.1f} before,"
        f" {load_after:.1f} after (other work on the machine counts too)"
    )
    print(f"recording: {entries} log entries, update ran {recording.seconds:.1f} s")
    print("| check | workers | states | seconds | states/min | per core | target |")
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        target = HOST_TARGET if run.kind == "host" else BOOT_TARGET
        print(
            f"| {run.kind} | {run.workers} | {run.states} | {run.seconds:.1f}"
            f" | {run.per_minute:.1f} | {run.per_core:.1f} | ≥ {target:g} |"
        )
    for kind in ("host", "boot"):
        one, two = (run for run in runs if run.kind == kind)
        speed_up = two.per_minute / one.per_minute
        print(
            f"| {kind}, 2 workers against 1 | | | | {speed_up:.2f} times | |"
            f" ≥ {SPEED_UP_TARGET} times |"
        )


if __name__ == "__main__":
    main()
