"""``mbl-update``: install a payload, show the A/B state, confirm a booted update,
start and stop applications.

Exit codes: 0 success, 1 the update failed or was rejected (the reason is printed on
stderr after ``mbl-update: error:``), 2 invalid command line.

For a root filesystem payload, ``install`` prints two progress lines that the test
harness waits for::

    mbl-update: root filesystem written to slot b (/dev/vda3)
    mbl-update: active slot is now b

The first appears once the new filesystem is synced, unmounted and checked, the second
once the environment write that makes it active is fsynced.

For an application payload, ``install`` installs every package of the payload, all or
nothing (`updater.app_install`), prints one line per step and does not reboot.
``app start`` and ``app stop`` start and stop installed applications; the system start
script runs ``mbl-update app start --no-wait`` at boot.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from updater.app_install import install_apps
from updater.apps import AppListing, AppPaths, list_apps, start_apps, stop_apps
from updater.command import Runner, run_command
from updater.config import DEFAULT_CONFIG_PATH, DeviceConfig, load_config
from updater.errors import AppError, CommandError, UpdaterError
from updater.payload import PayloadKind, classify_payload
from updater.rootfs import install_rootfs
from updater.slots import (
    ACTIVE_SLOT,
    FILESYSTEM_LABELS,
    PROC_CMDLINE,
    UPGRADE_AVAILABLE,
    SlotStatus,
    boot_store,
    flip_to,
    mark_good,
    other_slot,
    read_boot_variables,
    read_status,
    store_running_slot,
)
from updater.supervisor import Supervisor

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
    app_paths: AppPaths


def main(
    argv: Sequence[str] | None = None,
    *,
    cmdline_path: str = PROC_CMDLINE,
    runner: Runner = run_command,
    app_paths: AppPaths | None = None,
) -> int:
    """Run ``mbl-update`` and return its exit code.

    ``argv`` defaults to ``sys.argv[1:]``. ``cmdline_path``, ``runner`` and
    ``app_paths`` replace /proc/cmdline, the external command runner and the
    applications' directories in tests.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    _configure_logging(args.verbose)
    context = _Context(
        args=args,
        cmdline_path=cmdline_path,
        runner=runner,
        app_paths=app_paths or AppPaths(),
    )
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
        help="write a root filesystem payload into the inactive slot and make it"
        " active on trial, or install the applications of an application payload",
    )
    install.add_argument("payload", metavar="PAYLOAD.tar", help="payload tar file")
    install.add_argument(
        "--no-reboot",
        action="store_true",
        help="do not reboot after switching the active slot (application payloads"
        " never reboot)",
    )
    install.set_defaults(handler=_install)

    status = commands.add_parser(
        "status",
        help="show the running and active slots, the U-Boot environment and the"
        " installed applications",
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=_status)

    mark = commands.add_parser(
        "mark-good", help="confirm the running slot after a successful boot on trial"
    )
    mark.set_defaults(handler=_mark_good)

    app_commands = _add_app_commands(commands)

    # SUPPRESS as the default in the commands keeps a value given before the command.
    for command in (install, status, mark, *app_commands):
        _add_common_options(
            command, config=argparse.SUPPRESS, verbose=argparse.SUPPRESS
        )
    return parser


def _add_app_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> list[argparse.ArgumentParser]:
    app = commands.add_parser("app", help="start or stop installed applications")
    actions = app.add_subparsers(dest="app_command", required=True)
    start = actions.add_parser(
        "start",
        help="start installed applications that are not running; each must keep"
        " running for its health window",
    )
    start.add_argument(
        "names", nargs="*", metavar="NAME", help="applications (default: all)"
    )
    start.add_argument(
        "--no-wait",
        action="store_true",
        help="return once the applications are started, without waiting for their"
        " health windows (used at boot)",
    )
    start.set_defaults(handler=_app_start)
    stop = actions.add_parser(
        "stop",
        help="stop running applications: SIGTERM, then SIGKILL after the package's"
        " stop timeout",
    )
    stop.add_argument(
        "names", nargs="*", metavar="NAME", help="applications (default: all)"
    )
    stop.set_defaults(handler=_app_stop)
    return [app, start, stop]


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
        install_apps(payload, context.app_paths, report=_report)
        return EXIT_OK
    locations = boot_store(config)
    variables = read_boot_variables(locations)
    running = store_running_slot(locations, context.cmdline_path)
    target = other_slot(running)
    _warn_if_on_trial(variables, running)

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


def _report(line: str) -> None:
    print(f"{PROGRAM}: {line}", flush=True)


def _warn_if_on_trial(variables: dict[str, str], running: str) -> None:
    on_trial = variables.get(UPGRADE_AVAILABLE) == "1"
    if on_trial and variables.get(ACTIVE_SLOT) == running:
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
    locations = boot_store(config)
    status = read_status(locations, context.cmdline_path)
    apps, apps_error = _list_apps(context.app_paths)
    if context.args.json:
        document = status_to_json(status, config)
        document.update(apps_to_json(apps, apps_error))
        print(json.dumps(document, indent=2, sort_keys=True))
    else:
        # The environment listing stays last, so the applications come first.
        print(format_apps(apps, apps_error))
        print(format_status(status))
    return EXIT_OK


def _list_apps(paths: AppPaths) -> tuple[AppListing | None, str | None]:
    # The slot part of the status stays useful when the application database
    # cannot be read at all, so that error is shown instead of raised.
    try:
        return list_apps(paths, Supervisor(paths.supervisor)), None
    except AppError as exc:
        return None, str(exc)


def apps_to_json(listing: AppListing | None, error: str | None) -> dict[str, Any]:
    """Return the ``apps`` part of ``status --json``."""
    if listing is None:
        return {"apps": [], "app_database_issues": [], "app_database_error": error}
    return {
        "apps": [app.to_json() for app in listing.apps],
        "app_database": listing.database,
        "app_database_issues": [
            {"line": issue.line, "message": issue.message} for issue in listing.issues
        ],
        "app_database_error": None,
    }


def format_apps(listing: AppListing | None, error: str | None) -> str:
    """Return the installed applications as lines: name, version, state, pid."""
    if listing is None:
        return f"apps: {error}"
    lines = [f"apps ({listing.database}):"]
    for app in listing.apps:
        pid = f" (pid {app.pid})" if app.pid is not None else ""
        lines.append(f"  {app.name} {app.version} {app.state}{pid}")
    if not listing.apps:
        lines.append("  none installed")
    if listing.issues:
        lines.append("app database issues:")
        lines += [f"  {issue.message}" for issue in listing.issues]
    return "\n".join(lines)


def _app_start(context: _Context) -> int:
    paths = context.app_paths
    args = context.args
    lines = start_apps(
        paths, Supervisor(paths.supervisor), args.names, wait=not args.no_wait
    )
    for line in lines:
        _report(line)
    return EXIT_OK


def _app_stop(context: _Context) -> int:
    paths = context.app_paths
    for line in stop_apps(paths, Supervisor(paths.supervisor), context.args.names):
        _report(line)
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
    if status.store == "flag-files":
        lines[-3:] = [f"flag files: {location.device}", "flags as variables:"]
    lines += [f"  {name}={value}" for name, value in sorted(status.environment.items())]
    return "\n".join(lines)


def _show(value: str | None) -> str:
    return "(not set)" if value is None else value


def _mark_good(context: _Context) -> int:
    config = load_config(context.args.config)
    locations = boot_store(config)
    running = store_running_slot(locations, context.cmdline_path)
    mark_good(locations, running)
    print(f"{PROGRAM}: slot {running} marked good")
    return EXIT_OK
