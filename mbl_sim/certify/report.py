"""Certification reports: Markdown for people, JUnit XML for CI.

The Markdown report explains itself: what was certified, the verdict, the board's
facts, every check with its result and time, the findings, and the details of each
failure. The JUnit XML report has one test case per check, the board's facts as
properties, and the findings in the suite's system-out.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mbl_sim.certify.registry import FAILED, PASSED, SKIPPED, CheckResult, Finding

__all__ = ["CertificationReport", "write_junit", "write_markdown"]

PASS = "PASS"
FAIL = "FAIL"
INCOMPLETE = "INCOMPLETE"

_INTRODUCTION = (
    "mbl-sim emulates an embedded Linux device in QEMU and runs the real boot "
    "loader, kernel, root filesystem and updater on it. Certification boots one "
    "emulated device of this board and checks, one by one, what an over-the-air "
    "update needs from the board port: the boot and its serial console, the "
    "storage layout and device names, the boot state that selects the active root "
    "filesystem slot (read and written by both the boot side and the updater), "
    "a root filesystem update from slot a to slot b and back, and the rollback of "
    "an update that fails to boot. A board passes when every core check passes. "
    "Findings are properties of the board worth knowing that do not fail it."
)


@dataclass
class CertificationReport:
    """Everything a certification run produced."""

    board: str
    description: str
    board_file: str
    results: list[CheckResult]
    facts: dict[str, str]
    findings: list[Finding]
    seconds: float
    command: str
    workdir: Path
    error: str = ""
    """Reason certification stopped before the checks ran (a failed image build)."""
    details: dict[str, str] = field(default_factory=dict)
    """Long failure output by check name."""
    not_selected: list[str] = field(default_factory=list)
    """Core checks left out of this run (``--check``, ``--skip``)."""

    @property
    def verdict(self) -> str:
        """PASS when every core check passed, FAIL when any check failed, else
        INCOMPLETE (a core check was skipped or not selected)."""
        if self.error or any(r.status == FAILED for r in self.results):
            return FAIL
        core = [r for r in self.results if r.core]
        if core and all(r.status == PASSED for r in core) and not self.not_selected:
            return PASS
        return INCOMPLETE

    @property
    def passed(self) -> bool:
        """Whether the verdict is PASS."""
        return self.verdict == PASS

    def counts(self) -> dict[str, int]:
        """Return the number of checks per status."""
        return {
            status: sum(r.status == status for r in self.results)
            for status in (PASSED, FAILED, SKIPPED)
        }


def _cell(text: str) -> str:
    """Make ``text`` safe for one Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ").strip() or "—"


_SYMBOLS = {PASSED: "✅ passed", FAILED: "❌ failed", SKIPPED: "⏭ skipped"}


def _summary_line(report: CertificationReport) -> str:
    counts = report.counts()
    findings = len(report.findings)
    return (
        f"**Verdict: {report.verdict}** — {counts[PASSED]} passed, "
        f"{counts[FAILED]} failed, {counts[SKIPPED]} skipped, {findings} "
        f"finding{'s' if findings != 1 else ''}, in {report.seconds:.0f} s."
    )


def _facts_table(report: CertificationReport) -> list[str]:
    lines = ["| fact | value |", "|---|---|"]
    rows = {
        "board": report.board,
        "description": report.description,
        "board file": report.board_file,
        **report.facts,
    }
    lines += [f"| {_cell(name)} | {_cell(value)} |" for name, value in rows.items()]
    return lines


def _checks_table(results: Sequence[CheckResult]) -> list[str]:
    lines = ["| check | verifies | result | time | detail |", "|---|---|---|---|---|"]
    for result in results:
        core = "" if result.core else " (optional)"
        lines.append(
            f"| `{result.name}`{core} | {_cell(result.title)} | "
            f"{_SYMBOLS[result.status]} | {result.seconds:.1f} s | "
            f"{_cell(result.detail.splitlines()[0] if result.detail else '')} |"
        )
    return lines


def write_markdown(report: CertificationReport, path: Path) -> None:
    """Write the report as Markdown to ``path``."""
    lines = [
        f"# Certification of board `{report.board}`",
        "",
        _summary_line(report),
        "",
        _INTRODUCTION,
        "",
        f"Reproduce with `{report.command}`. Console transcripts, QEMU's stderr "
        f"and the device's disk overlays are in `{report.workdir}`.",
        "",
    ]
    if report.not_selected:
        names = ", ".join(f"`{name}`" for name in report.not_selected)
        lines += [f"Core checks left out of this run: {names}.", ""]
    if report.error:
        lines += ["## Stopped before the checks", "", "```", report.error, "```", ""]
    lines += ["## Board facts", "", *_facts_table(report), ""]
    lines += ["## Checks", "", *_checks_table(report.results), ""]
    lines += ["## Findings", ""]
    if not report.findings:
        lines += ["None.", ""]
    for finding in report.findings:
        lines += [f"### {finding.title}", "", f"Check `{finding.check}`.", ""]
        lines += [finding.detail, ""]
    failed = [r for r in report.results if r.status == FAILED]
    if failed:
        lines += ["## Failures", ""]
    for result in failed:
        lines += [f"### `{result.name}`", "", "```"]
        lines += [report.details.get(result.name, result.detail), "```", ""]
    path.write_text("\n".join(lines))


def write_junit(report: CertificationReport, path: Path) -> None:
    """Write the report as JUnit XML to ``path``: one test case per check."""
    counts = report.counts()
    suite = ElementTree.Element(
        "testsuite",
        name=f"mbl-sim certify {report.board}",
        tests=str(len(report.results) + (1 if report.error else 0)),
        failures=str(counts[FAILED]),
        errors="1" if report.error else "0",
        skipped=str(counts[SKIPPED]),
        time=f"{report.seconds:.3f}",
    )
    properties = ElementTree.SubElement(suite, "properties")
    for name, value in {"verdict": report.verdict, **report.facts}.items():
        ElementTree.SubElement(properties, "property", name=name, value=value)
    if report.error:
        case = ElementTree.SubElement(
            suite, "testcase", classname=f"certify.{report.board}", name="images"
        )
        ElementTree.SubElement(
            case, "error", message="image build failed"
        ).text = report.error
    for result in report.results:
        case = ElementTree.SubElement(
            suite,
            "testcase",
            classname=f"certify.{report.board}",
            name=result.name,
            time=f"{result.seconds:.3f}",
        )
        if result.status == FAILED:
            failure = ElementTree.SubElement(
                case, "failure", message=result.detail.splitlines()[0]
            )
            failure.text = report.details.get(result.name, result.detail)
        elif result.status == SKIPPED:
            ElementTree.SubElement(case, "skipped", message=result.detail)
    out = ElementTree.SubElement(suite, "system-out")
    out.text = "\n".join(f"finding: {f.title}: {f.detail}" for f in report.findings)
    ElementTree.indent(suite)
    ElementTree.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)
