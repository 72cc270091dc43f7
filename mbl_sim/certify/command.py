"""The ``mbl-sim certify`` and ``mbl-sim board new`` subcommands.

    mbl-sim certify BOARD [--output DIR] [--check NAME ...] [--skip NAME ...]
    mbl-sim board new NAME [--output FILE] [--force]

``certify`` exits with 0 when the verdict is PASS and 1 otherwise. ``board new``
writes a board file from the commented template ``images/board-template.yaml``.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mbl_sim.board import load_board
from mbl_sim.certify import certify, check_names
from mbl_sim.errors import ConfigError
from mbl_sim.images.recipe import recipe_dir

__all__ = ["COMMANDS", "add_parsers", "render_board_template"]

TEMPLATE = "board-template.yaml"
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")


def add_parsers(commands: Any) -> None:
    """Add ``certify`` and ``board`` to the subcommands of the ``mbl-sim`` parser."""
    certify_parser = commands.add_parser(
        "certify",
        help="run the conformance checks of a board port and write a report",
        description="Build the board's images, boot one device and run every "
        "conformance check: boot and console, storage layout and device names, "
        "boot state both ways, root filesystem update a→b→a, rollback of an update "
        "that fails to boot, and the optional checks. Writes report.md and "
        "report.xml (JUnit). Checks: " + ", ".join(check_names()),
    )
    certify_parser.add_argument("board", help="board name or board file")
    certify_parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="directory for the reports, transcripts and disk overlays "
        "(default results/certify-BOARD-TIME)",
    )
    certify_parser.add_argument(
        "--check",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this check (repeatable); checks it requires must be named too",
    )
    certify_parser.add_argument(
        "--skip", action="append", default=[], metavar="NAME", help="leave a check out"
    )

    board_parser = commands.add_parser("board", help="board files")
    board_commands = board_parser.add_subparsers(dest="board_command", metavar="ACTION")
    new = board_commands.add_parser(
        "new", help="write a new board file from the commented template"
    )
    new.add_argument("name", help="board name: lower-case letters, digits and '-'")
    new.add_argument(
        "--output", type=Path, default=None, help="file to write (default NAME.yaml)"
    )
    new.add_argument("--force", action="store_true", help="overwrite an existing file")


def _say(message: str) -> None:
    print(message, flush=True)


def run_certify(args: argparse.Namespace) -> int:
    """Run ``mbl-sim certify``; return 0 for a PASS verdict, else 1."""
    board = load_board(args.board)
    output = args.output
    if output is None:
        output = Path("results") / time.strftime(f"certify-{board.name}-%Y%m%d-%H%M%S")
    result = certify(
        board,
        output,
        cache_dir=args.cache_dir,
        report=_say,
        only=args.check,
        skip=args.skip,
    )
    return 0 if result.passed else 1


def render_board_template(name: str) -> str:
    """Return the board template with ``name`` filled in.

    Raises:
        ConfigError: ``name`` is not a valid board name.
    """
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"invalid board name {name!r}: use lower-case letters, digits and '-', "
            "starting with a letter or digit"
        )
    text = (recipe_dir() / TEMPLATE).read_text()
    return text.replace("@NAME@", name)


def run_board(args: argparse.Namespace) -> int:
    """Run ``mbl-sim board new``; return 0, or raise ConfigError."""
    if args.board_command != "new":
        raise ConfigError("usage: mbl-sim board new NAME [--output FILE]")
    text = render_board_template(args.name)
    output = args.output or Path(f"{args.name}.yaml")
    if output.name.removesuffix(".yaml") != args.name:
        raise ConfigError(
            f"--output {output}: a board file's name must be the board's name, "
            f"{args.name}.yaml"
        )
    if output.exists() and not args.force:
        raise ConfigError(f"{output} exists; pass --force to overwrite it")
    output.write_text(text)
    _say(
        f"wrote {output}; edit the keys marked TODO, then run: mbl-sim certify {output}"
    )
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "certify": run_certify,
    "board": run_board,
}
"""Handlers of the subcommands this module adds, by name."""
