"""Certification of a board port: one command that runs the conformance checks.

``certify(board)`` builds the board's images (which loads and checks its device
tree), boots one device and runs every registered check in order, then writes
``report.md`` and ``report.xml`` (JUnit) into the work directory. ``mbl-sim certify
BOARD`` is the command line for it.

Modules: ``registry`` (checks, context, plugin checks), ``checks`` (the checks
themselves) and ``report`` (Markdown and JUnit XML).

Exceptions: checks raise ``CheckFailed`` and ``CheckSkipped``, both ``MblSimError``;
``certify`` itself raises only ``ConfigError`` for an unknown check name, and records
everything else in the report.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from mbl_sim.board import Board
from mbl_sim.certify import checks as _checks  # noqa: F401  (registers the checks)
from mbl_sim.certify.registry import (
    CHECKS,
    FAILED,
    PASSED,
    SKIPPED,
    CertifyContext,
    Check,
    CheckFailed,
    CheckResult,
    CheckSkipped,
    Finding,
    plugin_check,
    register,
)
from mbl_sim.certify.report import CertificationReport, write_junit, write_markdown
from mbl_sim.device import BOOT_TIMEOUT
from mbl_sim.errors import ConfigError, MblSimError
from mbl_sim.images.recipe import DeviceImages, ImageBuilder
from mbl_sim.workdirs import claim_directory

__all__ = [
    "CHECKS",
    "CertificationReport",
    "CertifyContext",
    "Check",
    "CheckFailed",
    "CheckResult",
    "CheckSkipped",
    "Finding",
    "certify",
    "check_names",
    "plugin_check",
    "register",
]

log = logging.getLogger(__name__)

WORKDIR_MARKER = ".mbl-sim-certify"
"""The file that marks a directory as certification output."""

RUN_DIRECTORIES = ("device", "firmware-env", "power-cut")
"""Subdirectories that a rerun into the same directory removes first: the devices
and the campaign of the run before."""


def check_names() -> list[str]:
    """Return the registered checks' names in the order they run."""
    return list(CHECKS)


def _selected_checks(only: Sequence[str], skip: Sequence[str]) -> list[Check]:
    for name in [*only, *skip]:
        if name not in CHECKS:
            raise ConfigError(
                f"unknown certification check {name!r}; checks: {', '.join(CHECKS)}"
            )
    names = list(only) or list(CHECKS)
    selected = [CHECKS[name] for name in CHECKS if name in names and name not in skip]
    if not selected:
        raise ConfigError(
            f"no check left to run: --check {' '.join(only)} and --skip"
            f" {' '.join(skip)} exclude them all"
        )
    return selected


def _run_check(
    check: Check, context: CertifyContext, results: dict[str, CheckResult]
) -> tuple[CheckResult, str]:
    """Run one check; return its result and the long failure text, if any."""
    blocked = [
        r for r in check.requires if r in results and results[r].status != PASSED
    ]
    missing = [r for r in check.requires if r not in results]
    if blocked or missing:
        reason = (
            f"not run: check {(blocked or missing)[0]} "
            f"{'did not pass' if blocked else 'was not selected'}"
        )
        return CheckResult(
            check.name, check.title, SKIPPED, 0.0, reason, check.core
        ), ""
    started = time.monotonic()
    status, detail, long_text = PASSED, "", ""
    try:
        detail = check.function(context) or ""
    except CheckSkipped as error:
        status, detail = SKIPPED, str(error)
    except (MblSimError, OSError) as error:
        status, detail = FAILED, str(error)
        long_text = _failure_text(error, context)
        log.debug("check %s failed:\n%s", check.name, traceback.format_exc())
    seconds = time.monotonic() - started
    return CheckResult(
        check.name, check.title, status, seconds, detail, check.core
    ), long_text


def _failure_text(error: BaseException, context: CertifyContext) -> str:
    text = f"{type(error).__name__}: {error}"
    notes = getattr(error, "__notes__", [])
    if notes:
        text += "\n" + "\n".join(notes)
    device = context.device
    if device is not None and "console tail" not in text:
        transcript = device.workdir / "console.log"
        if transcript.exists():
            tail = transcript.read_text(errors="replace")[-1500:]
            text += f"\n\nconsole tail ({transcript}):\n{tail}"
    return text


def _board_facts(board: Board, images: DeviceImages) -> dict[str, str]:
    facts = {
        "QEMU machine": f"{board.qemu.binary} -M {board.qemu.machine}"
        + (f" -cpu {board.qemu.cpu}" if board.qemu.cpu else "")
        + f" -m {board.qemu.memory >> 20}M",
        "kernel": f"{board.kernel.package} → {images.kernel_release} "
        f"({board.kernel.file_name}, started with "
        f"{board.kernel.boot_command if board.firmware.is_u_boot else 'QEMU -kernel'})",
        "console": f"/dev/{board.console.device} at {board.console.baud} baud, "
        f"QEMU serial port {board.console.serial_port}",
    }
    summary = images.dtb_summary
    if summary is not None:
        facts["device tree"] = summary.source
        facts["device tree model"] = summary.model
        facts["device tree compatible"] = ", ".join(summary.compatible)
        facts["memory node"] = (
            summary.memory_node
            + " ("
            + ", ".join(
                f"{size >> 20} MiB at {base:#x}" for base, size in summary.memory
            )
            + ")"
        )
        facts["console node"] = (
            f"{summary.console_node} ({', '.join(summary.console_compatible)})"
        )
        facts["storage node"] = (
            f"{summary.storage_node} ({', '.join(summary.storage_compatible)})"
        )
    return facts


def certify(
    board: Board,
    workdir: Path,
    *,
    cache_dir: Path | None = None,
    report: Callable[[str], None] = print,
    only: Sequence[str] = (),
    skip: Sequence[str] = (),
    boot_timeout: float = BOOT_TIMEOUT,
) -> CertificationReport:
    """Certify ``board``: build its images, run the checks, write the reports.

    ``only`` restricts the run to those checks, ``skip`` leaves checks out.
    ``boot_timeout`` bounds each stage of the first boot, in seconds.
    ``workdir`` receives ``report.md``, ``report.xml`` and the device directory.

    Raises:
        ConfigError: a name in ``only`` or ``skip`` is not a registered check, they
            leave no check, or ``workdir`` is unusable or contains files that an
            earlier certification did not write.
    """
    selected = _selected_checks(only, skip)
    if claim_directory(workdir, WORKDIR_MARKER, "--output"):
        # Devices left by an earlier run would start from that run's slot and state.
        for device_dir in RUN_DIRECTORIES:
            shutil.rmtree(workdir / device_dir, ignore_errors=True)
    started = time.monotonic()
    command = "mbl-sim certify " + shlex.quote(board.name)
    result = CertificationReport(
        board=board.name,
        description=board.description,
        board_file=board.source,
        results=[],
        facts={},
        findings=[],
        seconds=0.0,
        command=command,
        workdir=workdir,
        not_selected=[c.name for c in CHECKS.values() if c.core and c not in selected],
    )
    report(f"certifying {board.name}: building images")
    try:
        images = ImageBuilder(
            board, cache_dir, report=lambda m: report(f"  {m}")
        ).build()
    except MblSimError as error:
        result.error = f"{type(error).__name__}: {error}"
        report(f"  ✗ images: {error}")
        return _finish(result, started, report)
    result.facts.update(_board_facts(board, images))
    context = CertifyContext(board, images, workdir, report, boot_timeout=boot_timeout)
    results: dict[str, CheckResult] = {}
    try:
        for check in selected:
            report(f"  … {check.name}: {check.title}")
            outcome, long_text = _run_check(check, context, results)
            results[check.name] = outcome
            result.results.append(outcome)
            if long_text:
                result.details[check.name] = long_text
            _report_result(outcome, report)
    finally:
        context.close()
    result.facts.update(context.facts)
    result.findings = list(context.findings)
    return _finish(result, started, report)


def _report_result(result: CheckResult, report: Callable[[str], None]) -> None:
    mark = {PASSED: "✓", FAILED: "✗", SKIPPED: "-"}[result.status]
    first_line = result.detail.splitlines()[0] if result.detail else ""
    report(f"  {mark} {result.name} ({result.seconds:.1f} s): {first_line}")


def _finish(
    result: CertificationReport, started: float, report: Callable[[str], None]
) -> CertificationReport:
    result.seconds = time.monotonic() - started
    markdown = result.workdir / "report.md"
    write_markdown(result, markdown)
    write_junit(result, result.workdir / "report.xml")
    counts = result.counts()
    report(
        f"verdict {result.verdict}: {counts[PASSED]} passed, {counts[FAILED]} "
        f"failed, {counts[SKIPPED]} skipped, {len(result.findings)} "
        f"finding{'' if len(result.findings) == 1 else 's'}"
    )
    report(f"report: {markdown}")
    return result
