"""``python -m mbl_sim.campaign campaign|replay …``: the campaign commands on their
own, with the ``mbl-sim`` command's exit statuses and error messages."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from mbl_sim.campaign.cli import COMMANDS, add_parsers
from mbl_sim.errors import ConfigError, MblSimError

EXIT_FAILED = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the command and return its exit status."""
    parser = argparse.ArgumentParser(prog="python -m mbl_sim.campaign")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="build and download cache"
    )
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return COMMANDS[args.command](args)
    except ConfigError as error:
        print(f"mbl-sim: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except MblSimError as error:
        print(f"mbl-sim: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("mbl-sim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
