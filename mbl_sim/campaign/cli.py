"""Command-line entry points of campaigns, for ``mbl-sim campaign`` and
``mbl-sim replay``.

    mbl-sim campaign SCENARIO [options]   record an update, check its crash states
    mbl-sim replay BUNDLE [options]       rebuild one bad state and boot it

Both exit with 0 when no state is bad, 1 when one is (or a check failed to run),
and the ``mbl-sim`` command's 2 for invalid usage. ``add_parsers`` adds both
commands to an argparse sub-command set; ``COMMANDS`` maps their names to their
handlers. ``python -m mbl_sim.campaign`` runs them on their own.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from mbl_sim.board import DEFAULT_BOARD, check_host, load_board
from mbl_sim.campaign.boot import BOOT_TIMEOUT
from mbl_sim.campaign.bundle import replay
from mbl_sim.campaign.plan import DEFAULT_BOOT_STATES, UNLIMITED_CAP, PlanOptions
from mbl_sim.campaign.run import DEFAULT_SCRATCH, CampaignOptions, run_campaign
from mbl_sim.campaign.updates import UPDATES, update_names
from mbl_sim.errors import ConfigError
from mbl_sim.images.recipe import ImageBuilder
from mbl_sim.workdirs import writable_directory

__all__ = ["COMMANDS", "add_parsers", "run_campaign_command", "run_replay_command"]

EXIT_OK = 0
EXIT_BAD = 1


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _say(message: str) -> None:
    print(message, flush=True)


def _content_files(text: str) -> int | None:
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or 'all', got {text!r}"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def _number(text: str, expected: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def _share(text: str) -> float:
    expected = "a number from 0 to 1"
    value = _number(text, expected)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def _seconds(text: str) -> float:
    expected = "a positive number of seconds"
    value = _number(text, expected)
    # float() also reads "nan" and "inf", which no timeout can use.
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


def add_parsers(commands: Any) -> None:
    """Add the ``campaign`` and ``replay`` commands to ``commands``, the result of
    ``ArgumentParser.add_subparsers()``."""
    campaign = commands.add_parser(
        "campaign", help="record an update and check every crash state of it"
    )
    _add_campaign_arguments(campaign)
    replay_parser = commands.add_parser(
        "replay", help="rebuild a crash state from its bundle, check and boot it"
    )
    replay_parser.add_argument("bundle", type=Path, help="bundle directory")
    replay_parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="new or empty directory for the state's disk and console, or one that"
        " an earlier replay wrote, which is emptied first (default BUNDLE/replay)",
    )
    replay_parser.add_argument(
        "--no-boot", action="store_true", help="run the host checks only"
    )
    replay_parser.add_argument(
        "--boot-timeout",
        type=_seconds,
        default=BOOT_TIMEOUT,
        help=f"seconds for each step of the boot (default {BOOT_TIMEOUT:g})",
    )


def _add_campaign_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "scenario",
        choices=update_names(),
        help="; ".join(
            f"{name}: {UPDATES[name].description}" for name in update_names()
        ),
    )
    parser.add_argument(
        "--board", default=DEFAULT_BOARD, help=f"board (default {DEFAULT_BOARD})"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("results"),
        help="the campaign gets a new directory in here (default results/)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="worker processes (default: one per CPU)",
    )
    parser.add_argument("--seed", type=int, default=0, help="campaign seed (default 0)")
    parser.add_argument(
        "--subsets",
        type=int,
        default=2,
        help="random cached-write subsets per flush interval (default 2; an SD"
        " card caches no writes, so its campaigns have none)",
    )
    parser.add_argument(
        "--torn",
        type=int,
        default=1,
        help="torn-write states per flush interval (default 1; none on an SD card,"
        " which logs each 512-byte block as a write of its own)",
    )
    parser.add_argument(
        "--max-states",
        type=int,
        default=None,
        help="check at most this many states, those near boot-state writes first"
        f" (default: all, at most {UNLIMITED_CAP})",
    )
    parser.add_argument(
        "--boot-share",
        type=_share,
        default=None,
        help="share of the states to boot, 0 to 1 (default: all states when there"
        f" are at most {DEFAULT_BOOT_STATES}, else {DEFAULT_BOOT_STATES})",
    )
    parser.add_argument(
        "--content-files",
        type=_content_files,
        default=32,
        help="files of each slot to compare, or 'all' (default 32)",
    )
    parser.add_argument(
        "--boot-timeout",
        type=_seconds,
        default=BOOT_TIMEOUT,
        help=f"seconds for each step of a boot (default {BOOT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--no-bundles", action="store_true", help="write no bundles for bad states"
    )
    parser.add_argument(
        "--scratch",
        type=Path,
        default=None,
        help="directory for the states' temporary disks, preferably a tmpfs"
        f" (default {DEFAULT_SCRATCH} if writable, else the campaign's directory)",
    )


def _builder(board_name: str, args: argparse.Namespace) -> ImageBuilder:
    board = load_board(board_name)
    check_host(board)
    cache_dir = getattr(args, "cache_dir", None)
    return ImageBuilder(board, cache_dir, report=lambda message: _say(f"  {message}"))


def run_campaign_command(args: argparse.Namespace) -> int:
    """Run ``mbl-sim campaign`` with parsed ``args``; return the exit status.

    Raises:
        ConfigError: invalid options or board.
        MblSimError: the recording or a worker failed.
    """
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    for option, value in (("--subsets", args.subsets), ("--torn", args.torn)):
        if value < 0:
            raise ConfigError(f"{option} must be 0 or more, got {value}")
    if args.max_states is not None and args.max_states < 1:
        raise ConfigError(f"--max-states must be at least 1, got {args.max_states}")
    # Checked before the build and the recording, which take minutes.
    writable_directory(args.workdir, "--workdir")
    if args.scratch is not None:
        writable_directory(args.scratch, "--scratch")
    # SIGTERM unwinds like Ctrl-C, so the workers are stopped and the scratch
    # directory removed.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    plan = PlanOptions(
        seed=args.seed,
        subsets=args.subsets,
        torn=args.torn,
        max_states=args.max_states,
        boot_share=args.boot_share,
    )
    options = CampaignOptions(
        workers=args.workers,
        plan=plan,
        content_files=args.content_files,
        boot_timeout=args.boot_timeout,
        bundles=not args.no_bundles,
        scratch=args.scratch,
    )
    images = _builder(args.board, args).build()
    directory = args.workdir / time.strftime(f"campaign-{args.scenario}-%Y%m%d-%H%M%S")
    _say(f"campaign {args.scenario} on {images.board.name} in {directory}")
    result = run_campaign(images, args.scenario, directory, options, _say)
    return EXIT_OK if not result.bad and not result.errors else EXIT_BAD


def run_replay_command(args: argparse.Namespace) -> int:
    """Run ``mbl-sim replay`` with parsed ``args``; return the exit status.

    Raises:
        ConfigError: the bundle is incomplete or does not match its manifest.
    """
    _say(f"replaying {args.bundle}")
    result = replay(
        args.bundle,
        workdir=args.workdir,
        boot=not args.no_boot,
        boot_timeout=args.boot_timeout,
    )
    _say(f"state {result.name} ({result.state.label()})")
    _say(f"  environment: {result.host.env}")
    if result.boot is not None:
        _say(f"  boot: {result.boot.describe()}; console {result.boot.transcript}")
    for problem in result.problems:
        _say(f"  problem: {problem.splitlines()[0]}")
    for problem in result.recorded_problems:
        _say(f"  recorded problem: {problem.splitlines()[0]}")
    _say("bad state reproduced" if result.problems else "no problem found now")
    return EXIT_BAD if result.problems else EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "campaign": run_campaign_command,
    "replay": run_replay_command,
}
