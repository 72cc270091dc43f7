"""Benchmark: application update of a 5 MiB app, updater against a bare extract.

Both measurements run on one booted device in one invocation, alternating for
``--rounds`` rounds, and the medians are compared:

- update: ``mbl-update install`` of a payload that upgrades the app to the next
  version. It checks the package, unpacks it into a new release, syncs, stops the
  running version, switches ``current``, starts the new version and waits for its
  health window;
- baseline: busybox ``tar -xzf`` of the same data tarball (``data.tar.gz``, built on
  the host from the same files) into an empty directory on /home, then a background
  start of the app's program with ``setsid``.

The app is a ``/bin/sh`` loop and 5 MiB of random bytes, so gzip does not shrink
the data. Times are wall-clock seconds on the host around one shell command on the
serial console; the console round trip of ``true`` is printed for scale. The payload
is delivered before the timer starts.

Usage: python3 benchmarks/app_update.py [--rounds N] [--board NAME]
                                       [--health-window SECONDS]
"""

from __future__ import annotations

import argparse
import gzip
import io
import random
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

from mbl_sim.board import DEFAULT_BOARD, load_board
from mbl_sim.device import Device
from mbl_sim.images.recipe import ImageBuilder
from mbl_sim.ipk import ShellApp, build_shell_app_payload

APP_BYTES = 5 << 20
SCRIPT = "while :; do sleep 10; done"


def bench_app(version: str, blob: bytes, health_window: float) -> ShellApp:
    return ShellApp(
        "bench",
        version,
        SCRIPT,
        health_window=health_window,
        files={"share/bench/blob.bin": blob},
    )


def data_tar_gz(app: ShellApp, output: Path) -> Path:
    """Write the app's files as a gzip-compressed tar, like its data.tar.gz."""
    with tempfile.TemporaryDirectory(prefix="mbl-bench-data-") as scratch:
        tree = app.write_tree(Path(scratch))
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for path in sorted(tree.rglob("*")):
                tar.add(
                    path, arcname=path.relative_to(tree).as_posix(), recursive=False
                )
    output.write_bytes(gzip.compress(buffer.getvalue(), compresslevel=6, mtime=0))
    return output


def timed(device: Device, command: str) -> float:
    started = time.monotonic()
    device.run(command, timeout=900, check=True)
    return time.monotonic() - started


def measure(
    device: Device, payloads: list[Path], data: Path
) -> tuple[list[float], list[float]]:
    """Install ``payloads[0]``, then alternate a bare extract of ``data`` plus a
    start, and an update to the next payload. Return both lists of seconds."""
    device.install_apps(payloads[0]).check()
    data_on_device = device.deliver(data)
    updates = []
    baselines = []
    for payload in payloads[1:]:
        on_device = device.deliver(payload)
        baselines.append(
            timed(
                device,
                f"mkdir /home/bench && tar -xzf {data_on_device} -C /home/bench"
                " && (setsid /home/bench/bin/bench </dev/null >/dev/null 2>&1 &)",
            )
        )
        device.run("pkill -f /home/bench/bin/bench; rm -rf /home/bench")
        updates.append(timed(device, f"mbl-update install {on_device}"))
        state = device.app_state("bench")
        if state != "running":
            raise SystemExit(f"the benchmark app is {state} after an update")
    return updates, baselines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--board", default=DEFAULT_BOARD)
    parser.add_argument("--rounds", type=int, default=3, help="updates and extracts")
    parser.add_argument(
        "--health-window",
        type=float,
        default=1.0,
        help="App-Health-Window of the app, in seconds (default 1)",
    )
    args = parser.parse_args()
    images = ImageBuilder(load_board(args.board), report=lambda _: None).build()
    blob = random.Random(0).randbytes(APP_BYTES)
    apps = [
        bench_app(f"{number}.0.0", blob, args.health_window)
        for number in range(1, args.rounds + 2)
    ]

    with tempfile.TemporaryDirectory(prefix="mbl-bench-") as scratch:
        workdir = Path(scratch)
        payloads = [
            build_shell_app_payload([app], workdir / f"bench-{app.version}.tar")
            for app in apps
        ]
        data = data_tar_gz(apps[-1], workdir / "data.tar.gz")
        with Device(images, workdir / "device") as device:
            device.power_on()
            round_trip = timed(device, "true")
            updates, baselines = measure(device, payloads, data)
        payload_size = payloads[-1].stat().st_size

    update = statistics.median(updates)
    baseline = statistics.median(baselines)
    window = args.health_window
    print(f"board {images.board.name}, kernel {images.kernel_release}")
    print(
        f"app: {APP_BYTES} bytes of data, payload {payload_size} bytes,"
        f" console round trip {round_trip:.2f} s"
    )
    print(
        "updates: " + ", ".join(f"{t:.2f} s" for t in updates),
        "; tar -xzf + start: " + ", ".join(f"{t:.2f} s" for t in baselines),
        sep="",
    )
    print("| measurement | mbl-sim | baseline | ratio | target |")
    print("|---|---|---|---|---|")
    print(
        f"| application update, 5 MiB app (median of {args.rounds}, health window"
        f" {window:g} s) | {update:.2f} s | {baseline:.2f} s (tar -xzf + start)"
        f" | {update / baseline:.2f} | |"
    )
    print(
        f"| same, without the health window | {update - window:.2f} s"
        f" | {baseline:.2f} s | {(update - window) / baseline:.2f} | |"
    )


if __name__ == "__main__":
    main()
