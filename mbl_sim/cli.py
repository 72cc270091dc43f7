"""The ``mbl-sim`` command line.

    mbl-sim run [--board B] [--scenario S ...]   build, boot and run update scenarios
    mbl-sim images build [--board B] [--refresh] build (or reuse) a board's images
    mbl-sim payload rootfs -o OUT.tar ...         build a root filesystem payload
    mbl-sim payload app -o OUT.tar SOURCE ...     build an application payload
    mbl-sim boards                                list the shipped boards
    mbl-sim certify BOARD [--check NAME ...]      certify a board port, write a report
    mbl-sim board new NAME                        write a board file from the template
    mbl-sim campaign SCENARIO [options]           check every crash state of an update
    mbl-sim replay BUNDLE                         rebuild, check and boot a bad state

Exit status: 0 success, 1 a scenario or build failed, 2 invalid usage or configuration.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mbl_sim import scenarios
from mbl_sim.board import DEFAULT_BOARD, Board, board_names, check_host, load_board
from mbl_sim.campaign import cli as campaign_cli
from mbl_sim.certify import command as certify_command
from mbl_sim.errors import BuildError, ConfigError, MblSimError
from mbl_sim.images.cache import default_cache_dir
from mbl_sim.images.recipe import DeviceImages, ImageBuilder
from mbl_sim.ipk import (
    COMPRESSIONS,
    WRAPPERS,
    IpkFormat,
    build_app_payload,
    build_ipk_from_directory,
)
from mbl_sim.payloads import RootfsChange, build_rootfs_payload

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _say(message: str) -> None:
    print(message, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mbl-sim",
        description="Simulate over-the-air updates of embedded ARM Linux devices "
        "in QEMU.",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more: -v shows console lines, -vv debug messages",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"build and download cache (default {default_cache_dir()})",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="build images, boot a device, run scenarios")
    _add_board(run)
    run.add_argument(
        "--scenario",
        action="append",
        dest="scenarios",
        metavar="NAME",
        help="scenario to run; repeat for several (default: "
        f"{', '.join(scenarios.DEFAULT_SCENARIOS)}; known: "
        f"{', '.join(scenarios.scenario_names())})",
    )
    run.add_argument(
        "--workdir",
        type=Path,
        default=Path("results"),
        help="directory for device overlays and console transcripts (default results/)",
    )

    images = commands.add_parser("images", help="device images")
    image_commands = images.add_subparsers(dest="images_command", metavar="ACTION")
    build = image_commands.add_parser("build", help="build or reuse a board's images")
    _add_board(build)
    build.add_argument(
        "--refresh", action="store_true", help="refresh the Debian package lists first"
    )

    payload = commands.add_parser("payload", help="build update payloads")
    payload_commands = payload.add_subparsers(dest="payload_command", metavar="KIND")
    rootfs = payload_commands.add_parser(
        "rootfs", help="root filesystem payload from a directory or the device's recipe"
    )
    _add_board(rootfs)
    rootfs.add_argument(
        "--from",
        dest="source",
        type=Path,
        default=None,
        help="root filesystem directory (default: the board's built root filesystem)",
    )
    rootfs.add_argument("--version", help="new content of /etc/mbl-version")
    rootfs.add_argument(
        "--add",
        action="append",
        default=[],
        metavar="HOST_FILE:PATH",
        help="add or replace a file: host file, colon, path inside the root filesystem",
    )
    rootfs.add_argument(
        "--remove",
        action="append",
        default=[],
        metavar="PATH",
        help="leave PATH (and everything below it) out of the root filesystem",
    )
    rootfs.add_argument(
        "-o", "--output", type=Path, required=True, help="payload .tar to write"
    )
    _add_app_payload_parser(payload_commands)

    commands.add_parser("boards", help="list the shipped boards")
    certify_command.add_parsers(commands)
    campaign_cli.add_parsers(commands)
    return parser


def _add_app_payload_parser(
    payload_commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    app = payload_commands.add_parser(
        "app",
        help="application payload: one .ipk per SOURCE",
        description="Build an application payload: a tar of one .ipk per SOURCE. A"
        " SOURCE is an .ipk file, taken as it is, or a directory in opkg-build's"
        " layout: the control file in SOURCE/CONTROL/control (Package, Version,"
        " Architecture, App-Exec, and optionally Depends, App-Stop-Timeout,"
        " App-Health-Window) and the application's files beside it. Example:"
        " mbl-sim payload app -o hello.tar --set Version=2.0.0 ./hello",
    )
    app.add_argument(
        "sources", nargs="+", type=Path, metavar="SOURCE", help=".ipk or directory"
    )
    app.add_argument(
        "-o", "--output", type=Path, required=True, help="payload .tar to write"
    )
    app.add_argument(
        "--wrapper",
        choices=WRAPPERS,
        default="ar",
        help="outer format of built packages: ar (opkg-build, Yocto) or tar"
        " (gzip-compressed tar, OpenWrt's ipkg-build) (default ar)",
    )
    app.add_argument(
        "--compression",
        choices=COMPRESSIONS,
        default="gz",
        help="compression of data.tar in built packages (default gz)",
    )
    app.add_argument(
        "--dot-slash",
        action="store_true",
        help="start member names of built packages with ./ (tar wrapper and inner"
        " tarballs)",
    )
    app.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="set a control field of every package built from a directory, for"
        " example Version=2.0.0; repeat for several",
    )


def _add_board(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--board",
        default=DEFAULT_BOARD,
        help=f"board name or board file (default {DEFAULT_BOARD})",
    )


def _configure_logging(verbosity: int) -> None:
    level = {0: logging.WARNING, 1: 15, 2: logging.DEBUG}.get(verbosity, logging.DEBUG)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _build(board: Board, cache_dir: Path | None, refresh: bool = False) -> DeviceImages:
    builder = ImageBuilder(board, cache_dir, report=lambda m: _say(f"  {m}"))
    if refresh:
        builder.target_apt.update(force=True)
    return builder.build()


def _cmd_run(args: argparse.Namespace) -> int:
    board = load_board(args.board)
    check_host(board)
    names = scenarios.resolve(args.scenarios or list(scenarios.DEFAULT_SCENARIOS))
    _say(f"mbl-sim: board {board.name} ({board.description})")
    _say("images:")
    images = _build(board, args.cache_dir)
    _say(f"  kernel {images.kernel_release}, disk {images.disk}")
    run_dir = args.workdir / time.strftime("run-%Y%m%d-%H%M%S")
    results = []
    for name in names:
        result = scenarios.run_scenario(name, images, run_dir / name, _say)
        results.append(result)
        if not result.passed:
            _say(f"  error: {result.error}")
            _say(f"  console transcript: {run_dir / name / 'console.log'}")
    _say("summary:")
    for result in results:
        verdict = "PASS" if result.passed else "FAIL"
        _say(
            f"  {verdict} {result.name} "
            f"({result.seconds:.1f} s, {len(result.steps)} steps)"
        )
    passed = sum(r.passed for r in results)
    _say(f"{passed} passed, {len(results) - passed} failed")
    return EXIT_OK if passed == len(results) else EXIT_FAILED


def _cmd_images(args: argparse.Namespace) -> int:
    if args.images_command != "build":
        raise ConfigError("usage: mbl-sim images build [--board B] [--refresh]")
    board = load_board(args.board)
    _say(f"building images for {board.name}")
    images = _build(board, args.cache_dir, args.refresh)
    _say(f"disk image: {images.disk}")
    _say(f"kernel: {images.kernel} ({images.kernel_release})")
    _say(f"initramfs: {images.initrd}")
    _say(f"root filesystem: {images.rootfs}")
    return EXIT_OK


def _parse_added_files(specs: Sequence[str]) -> dict[str, bytes]:
    files = {}
    for spec in specs:
        host, separator, target = spec.partition(":")
        if not separator or not host or not target:
            raise ConfigError(
                f"--add {spec!r}: expected HOST_FILE:PATH, "
                "for example ./app.conf:etc/app.conf"
            )
        source = Path(host)
        if not source.is_file():
            raise ConfigError(f"--add {spec!r}: host file {source} not found")
        files[target] = source.read_bytes()
    return files


def _cmd_payload(args: argparse.Namespace) -> int:
    if args.payload_command == "app":
        return _cmd_payload_app(args)
    if args.payload_command != "rootfs":
        raise ConfigError(
            "usage: mbl-sim payload rootfs -o OUT.tar [options], or"
            " mbl-sim payload app -o OUT.tar SOURCE..."
        )
    change = RootfsChange(
        version=args.version, files=_parse_added_files(args.add), remove=args.remove
    )
    source = args.source
    if source is None:
        source = _build(load_board(args.board), args.cache_dir).rootfs
    output = build_rootfs_payload(source, args.output, change)
    _say(f"wrote {output} ({output.stat().st_size} bytes)")
    return EXIT_OK


def _parse_fields(specs: Sequence[str]) -> dict[str, str]:
    fields = {}
    for spec in specs:
        name, separator, value = spec.partition("=")
        if not separator or not name or not value:
            raise ConfigError(
                f"--set {spec!r}: expected FIELD=VALUE, for example Version=2.0.0"
            )
        fields[name] = value
    return fields


def _cmd_payload_app(args: argparse.Namespace) -> int:
    package_format = IpkFormat(
        wrapper=args.wrapper,
        data_compression=args.compression,
        dot_slash=args.dot_slash,
    )
    overrides = _parse_fields(args.set)
    package_dir = args.output.with_name(args.output.name + ".packages")
    packages = []
    for source in args.sources:
        if source.is_dir():
            package = build_ipk_from_directory(
                source, package_dir, package_format, overrides
            )
            _say(f"built {package}")
        elif source.is_file():
            package = source
        else:
            raise ConfigError(f"package source {source} not found")
        packages.append(package)
    output = build_app_payload(packages, args.output)
    _say(f"wrote {output} ({output.stat().st_size} bytes, {len(packages)} packages)")
    return EXIT_OK


def _cmd_boards(args: argparse.Namespace) -> int:
    for name in board_names():
        board = load_board(name)
        default = " (default)" if name == DEFAULT_BOARD else ""
        _say(f"{name}{default}: {board.description}")
    return EXIT_OK


def _check_board_output(name: str, output: Path) -> None:
    """Check that ``board new`` can write the board file ``output``.

    Raises:
        ConfigError: ``output`` is not named NAME.yaml, is a directory, or its
            directory is missing.
    """
    file_name = f"{name}.yaml"
    if output.is_dir():
        raise ConfigError(
            f"board file {output} is a directory; pass --output "
            f"{output / file_name} to write the file into it"
        )
    if output.name != file_name:
        # load_board takes NAME.yaml as a path and a bare NAME as a shipped board,
        # so the certify command printed after writing needs the suffix.
        raise ConfigError(
            f"--output {output}: a board file's name must be the board's name with "
            f".yaml, for example --output {output.parent / file_name}"
        )
    directory = output.parent
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"--output {output}: {directory} is not a directory")
    if not directory.exists():
        raise ConfigError(
            f"--output {output}: directory {directory} not found; create it first"
        )


def _cmd_board(args: argparse.Namespace) -> int:
    """Run ``mbl-sim board`` with the handler of ``mbl_sim.certify.command``.

    For ``board new`` it checks the output path first and turns a failed write of
    the board file into a ConfigError, which the CLI reports with exit status 2.
    """
    if args.board_command != "new":
        return certify_command.run_board(args)
    args.output = args.output or Path(f"{args.name}.yaml")
    _check_board_output(args.name, args.output)
    try:
        return certify_command.run_board(args)
    except OSError as error:
        if error.filename != str(args.output):
            raise
        raise ConfigError(
            f"cannot write board file {args.output}: {error.strerror}; write it "
            "into a directory you can write to"
        ) from error


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    handlers = {
        "run": _cmd_run,
        "images": _cmd_images,
        "payload": _cmd_payload,
        "boards": _cmd_boards,
        **certify_command.COMMANDS,
        **campaign_cli.COMMANDS,
        "board": _cmd_board,
    }
    try:
        return handlers[args.command](args)
    except ConfigError as error:
        print(f"mbl-sim: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BuildError as error:
        print(f"mbl-sim: build failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    except MblSimError as error:
        print(f"mbl-sim: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("mbl-sim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
