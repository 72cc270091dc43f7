"""``mbl-update``: install a payload, show the A/B state, confirm a booted update.

Exit codes: 0 success, 1 the update failed or was rejected (the reason is printed on
stderr after ``mbl-update: error:``), 2 invalid command line.

``install`` prints two progress lines that the test harness waits for::

    mbl-update: root filesystem written to slot b (/dev/vda3)
    mbl-update: active slot is now b

The first appears once the new filesystem is synced, unmounted and checked, the second
once the environment write that makes it active is fsynced.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, NoReturn

from updater.bootenv import BootEnv, load_fw_env_config, read_env
from updater.command import Runner, run_command
from updater.config import DEFAULT_CONFIG_PATH, DeviceConfig, load_config
from updater.errors import CommandError, PayloadError, UpdaterError
from updater.payload import Payload, PayloadKind, classify_payload
from updater.rootfs import install_rootfs
from updater.slots import (
    ACTIVE_SLOT,
    FILESYSTEM_LABELS,
    PROC_CMDLINE,
    UPGRADE_AVAILABLE,
    SlotStatus,
    flip_to,
    mark_good,
    other_slot,
    read_running_slot,
    read_status,
)

log = logging.getLogger(__name__)

PROGRAM = "mbl-update"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


@dataclass(frozen=True)
class _Context:
    args: argparse.Namespace
    cmdline_path: str
    runner: Runner


def main(
    argv: Sequence[str] | None = None,
    *,
    cmdline_path: str = PROC_CMDLINE,
    runner: Runner = run_command,
) -> int:
    """Run ``mbl-update`` and return its exit code.

    ``argv`` defaults to ``sys.argv[1:]``. ``cmdline_path`` and ``runner`` replace
    /proc/cmdline and the external command runner in tests.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    _configure_logging(args.verbose)
    context = _Context(args=args, cmdline_path=cmdline_path, runner=runner)
    try:
        result: int = args.handler(context)
    except UpdaterError as exc:
        print(f"{PROGRAM}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return result


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with the install, status and mark-good commands."""
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Install A/B root filesystem updates and manage the boot slots.",
    )
    _add_common_options(parser, config=DEFAULT_CONFIG_PATH, verbose=0)
    commands = parser.add_subparsers(dest="command", required=True)

    install = commands.add_parser(
        "install",
        help="write a payload into the inactive slot and make it active on trial",
    )
    install.add_argument("payload", metavar="PAYLOAD.tar", help="payload tar file")
    install.add_argument(
        "--no-reboot",
        action="store_true",
        help="do not reboot after switching the active slot",
    )
    install.set_defaults(handler=_install)

    status = commands.add_parser(
        "status", help="show the running and active slots and the U-Boot environment"
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=_status)

    mark = commands.add_parser(
        "mark-good", help="confirm the running slot after a successful boot on trial"
    )
    mark.set_defaults(handler=_mark_good)

    # SUPPRESS as the default in the commands keeps a value given before the command.
    for command in (install, status, mark):
        _add_common_options(
            command, config=argparse.SUPPRESS, verbose=argparse.SUPPRESS
        )
    return parser


def _add_common_options(
    parser: argparse.ArgumentParser, *, config: str, verbose: int | str
) -> None:
    # Each parser gets its own option objects: argparse's parents= would share them,
    # and then a default set on one parser would change the others.
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=config,
        help=f"device configuration file (default: {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=verbose,
        help="log steps on stderr; repeat for debug output",
    )


def _configure_logging(verbosity: int) -> None:
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(
        level=level, format=f"{PROGRAM}: %(levelname)s: %(name)s: %(message)s"
    )


def _install(context: _Context) -> int:
    config = load_config(context.args.config)
    payload = classify_payload(context.args.payload)
    if payload.kind is PayloadKind.APPS:
        _reject_apps(payload)
    locations = load_fw_env_config(config.fw_env_config)
    env = read_env(locations)
    running = read_running_slot(context.cmdline_path)
    target = other_slot(running)
    _warn_if_on_trial(env, running)

    device = config.slot_device(target)
    install_rootfs(
        payload, device, label=FILESYSTEM_LABELS[target], runner=context.runner
    )
    print(f"{PROGRAM}: root filesystem written to slot {target} ({device})", flush=True)

    flip_to(locations, target, running)
    print(f"{PROGRAM}: active slot is now {target}", flush=True)

    if not context.args.no_reboot:
        _reboot(context.runner)
    return EXIT_OK


def _reject_apps(payload: Payload) -> NoReturn:
    raise PayloadError(
        f"payload {payload.path} contains application packages"
        f" ({', '.join(payload.names)}); application updates are not supported yet,"
        " so nothing was changed"
    )


def _warn_if_on_trial(env: BootEnv, running: str) -> None:
    on_trial = env.variables.get(UPGRADE_AVAILABLE) == "1"
    if on_trial and env.variables.get(ACTIVE_SLOT) == running:
        # NOTE: the install still goes ahead. It overwrites the fallback slot, so
        # until the new slot is marked good, the only other bootable slot is the one
        # on trial.
        log.warning(
            "slot %s is on trial and not marked good; installing overwrites the"
            " fallback slot %s",
            running,
            other_slot(running),
        )


def _reboot(runner: Runner) -> None:
    try:
        runner(["reboot"])
    except CommandError as exc:
        raise CommandError(
            f"reboot failed ({exc}); the new slot becomes active at the next boot",
            exc.argv,
            exc.returncode,
            exc.stderr,
            exc.stdout,
        ) from exc


def _status(context: _Context) -> int:
    config = load_config(context.args.config)
    locations = load_fw_env_config(config.fw_env_config)
    status = read_status(locations, context.cmdline_path)
    if context.args.json:
        print(json.dumps(status_to_json(status, config), indent=2, sort_keys=True))
    else:
        print(format_status(status))
    return EXIT_OK


def status_to_json(status: SlotStatus, config: DeviceConfig) -> dict[str, Any]:
    """Return the status as a JSON-ready dict, with the slot devices from ``config``."""
    document = asdict(status)
    document["slots"] = dict(config.slots)
    return document


def format_status(status: SlotStatus) -> str:
    """Return the status as ``name: value`` lines followed by the whole environment."""
    location = status.env_location
    other = status.other_copy_error or "valid"
    lines = [
        f"running slot: {_show(status.running_slot)}",
        f"active slot: {_show(status.active_slot)}",
        f"previous slot: {_show(status.previous_slot)}",
        f"upgrade_available: {_show(status.upgrade_available)}",
        f"bootcount: {_show(status.bootcount)}",
        f"bootlimit: {_show(status.bootlimit)}",
        f"rolled back from: {_show(status.rolled_back_from)}",
        f"environment copy: {status.env_copy} on {location.device} at offset"
        f" {location.offset:#x}, flag {status.env_flag}",
        f"other environment copy: {other}",
        "environment:",
    ]
    lines += [f"  {name}={value}" for name, value in sorted(status.environment.items())]
    return "\n".join(lines)


def _show(value: str | None) -> str:
    return "(not set)" if value is None else value


def _mark_good(context: _Context) -> int:
    config = load_config(context.args.config)
    locations = load_fw_env_config(config.fw_env_config)
    running = read_running_slot(context.cmdline_path)
    mark_good(locations, running)
    print(f"{PROGRAM}: slot {running} marked good")
    return EXIT_OK
