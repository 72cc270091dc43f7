"""The campaign's report: a Markdown summary, an SVG chart and JUnit XML.

The chart has one column per flush interval of the update's write log and one row
per kind of state (after the flush, random subsets of the cached writes, torn
writes, all cached writes). Each cell is one state: green good, red bad, orange
when its checks failed to run, with a dot when it was booted. A triangle above a
column marks an interval with a write into an environment copy.
"""

from __future__ import annotations

import html
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mbl_sim.campaign.plan import PlannedState
from mbl_sim.campaign.record import Recording
from mbl_sim.campaign.runner import StateResult
from mbl_sim.storage import WriteLog

__all__ = ["ReportInput", "write_junit", "write_markdown", "write_svg"]

KIND_ROWS = ("flush", "subset", "torn", "all")
KIND_LABELS = {
    "flush": "after flush",
    "subset": "cached subset",
    "torn": "torn write",
    "all": "all cached",
}
PROBLEMS_SHOWN = 3
CELL = 11
GAP = 2
LEFT = 110
TOP = 52
MIN_WIDTH = 480
COLOURS = {"good": "#2e7d32", "bad": "#c62828", "error": "#ef6c00"}


@dataclass(frozen=True)
class ReportInput:
    """The input of the report.

    Attributes:
        title: the campaign's name, for headings.
        recording: the recorded update.
        window: its write log.
        results: the checked states, in log order.
        seconds: the campaign's duration, recording included.
        workers: the number of worker processes.
        seed: the campaign seed.
        focus_intervals: intervals with a write into an environment copy.
        bundles: the bundle directory of each bad state, by state name.
    """

    title: str
    recording: Recording
    window: WriteLog
    results: Sequence[StateResult]
    seconds: float
    workers: int
    seed: int
    focus_intervals: frozenset[int]
    bundles: dict[str, Path]


def _outcome(result: StateResult) -> str:
    if result.error is not None:
        return "error"
    return "bad" if result.bad else "good"


# -- Markdown ------------------------------------------------------------------


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def _summary(report: ReportInput) -> list[str]:
    recording = report.recording
    window = report.window
    writes = window.writes()
    results = report.results
    bad = [r for r in results if r.bad]
    errors = [r for r in results if r.error is not None]
    booted = [r for r in results if r.boot is not None]
    boot_bad = [r for r in booted if r.boot is not None and r.boot.problems]
    kind = "faulty on purpose" if recording.faulty else "expected to be safe"
    return [
        f"# Crash-state campaign: {report.title}",
        "",
        f"- Update: `{recording.update}` ({kind}), slot {recording.old.slot}"
        f" {recording.old.version} → slot {recording.new.slot}"
        f" {recording.new.version}, ran {recording.seconds:.1f} s in the guest.",
        f"- Write log: {len(window)} entries, {len(writes)} writes"
        f" ({_mib(sum(e.length for e in writes))}, {sum(e.is_fua for e in writes)}"
        f" of them FUA), {len(window.flush_indices())} flushes. Seed {report.seed}.",
        f"- States: {len(results)} checked on the host, {len(booted)} booted;"
        f" {report.workers} workers, {report.seconds:.0f} s in all.",
        f"- Result: **{len(bad)} bad states** ({len(boot_bad)} of them failed to boot"
        f" well), {len(errors)} check errors.",
        "",
        "![Outcome by crash point](outcome.svg)",
        "",
    ]


def _interval_rows(report: ReportInput) -> list[str]:
    rows = [
        "## Outcome by interval",
        "",
        "Interval k ends with durability point k of the update's write log: a"
        " flush, or a FUA write (on an SD card, which has no write cache, every"
        " write); f000 is the disk when the update started.",
        "",
        "| Interval | States | Booted | Bad | Env write | Environment after it |",
        "|---|---|---|---|---|---|",
    ]
    by_interval: dict[int, list[StateResult]] = {}
    for result in report.results:
        by_interval.setdefault(result.planned.interval, []).append(result)
    for interval, results in sorted(by_interval.items()):
        flush = [r for r in results if r.planned.kind in ("flush", "all")]
        env = flush[0].host.env if flush else ""
        rows.append(
            f"| {results[0].planned.name.split('-')[0]} | {len(results)}"
            f" | {sum(r.boot is not None for r in results)}"
            f" | {sum(r.bad for r in results)}"
            f" | {'yes' if interval in report.focus_intervals else ''}"
            f" | {_cell(env)} |"
        )
    return [*rows, ""]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _describe_state(planned: PlannedState) -> str:
    state = planned.state
    torn = "—"
    if state.torn is not None:
        torn = f"#{state.torn.index} after {state.torn.kept_bytes} B"
    return f"{state.point} | {len(state.kept)} | {torn}"


def _bad_rows(report: ReportInput) -> list[str]:
    bad = [r for r in report.results if r.bad or r.error is not None]
    if not bad:
        return ["## Bad states", "", "None.", ""]
    rows = [
        "## Bad states",
        "",
        "| State | Cut point | Cached kept | Torn | Boot | Problems | Bundle |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in bad:
        problems = result.problems or (result.error or "").splitlines()[-1:]
        if len(problems) > PROBLEMS_SHOWN:
            more = len(problems) - PROBLEMS_SHOWN
            problems = [*problems[:PROBLEMS_SHOWN], f"and {more} more"]
        boot = result.boot.describe() if result.boot is not None else "not booted"
        bundle = report.bundles.get(result.planned.name)
        rows.append(
            f"| {result.planned.name} | {_describe_state(result.planned)}"
            f" | {_cell(boot)} | {_cell('; '.join(problems))}"
            f" | {f'`{bundle.name}`' if bundle else ''} |"
        )
    return [*rows, ""]


def write_markdown(report: ReportInput, path: Path) -> Path:
    """Write the Markdown report to ``path`` and return it."""
    lines = _summary(report) + _interval_rows(report) + _bad_rows(report)
    path.write_text("\n".join(lines))
    return path


# -- SVG -----------------------------------------------------------------------


def _svg_cell(x: int, y: int, result: StateResult) -> list[str]:
    planned = result.planned
    title = html.escape(
        f"{planned.name}: {_outcome(result)}"
        + (f" — {'; '.join(result.problems)[:300]}" if result.bad else "")
    )
    colour = COLOURS[_outcome(result)]
    parts = [
        f'<rect x="{x}" y="{y}" width="{CELL}" height="{CELL}" fill="{colour}">'
        f"<title>{title}</title></rect>"
    ]
    if result.boot is not None:
        centre = CELL / 2
        parts.append(
            f'<circle cx="{x + centre}" cy="{y + centre}" r="{CELL / 5:.1f}"'
            ' fill="white"/>'
        )
    return parts


def write_svg(report: ReportInput, path: Path) -> Path:
    """Write the outcome chart to ``path`` and return it."""
    intervals = sorted({r.planned.interval for r in report.results})
    column = {interval: number for number, interval in enumerate(intervals)}
    lanes: dict[tuple[int, str], int] = {}
    rows: list[str] = []
    for result in report.results:
        planned = result.planned
        key = (planned.interval, planned.kind)
        lane = lanes.get(key, 0)
        lanes[key] = lane + 1
        row_base = TOP + KIND_ROWS.index(planned.kind) * (3 * (CELL + GAP) + 6)
        x = LEFT + column[planned.interval] * (CELL + GAP)
        y = row_base + lane * (CELL + GAP)
        rows += _svg_cell(x, y, result)
    width = max(LEFT + len(intervals) * (CELL + GAP) + 20, MIN_WIDTH)
    height = TOP + len(KIND_ROWS) * (3 * (CELL + GAP) + 6) + 40
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"'
        ' font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="4" y="14" font-size="13">{html.escape(report.title)}: outcome'
        " by crash point</text>",
        '<text x="4" y="28">green good, red bad, orange check error, white dot'
        " booted, blue triangle: environment write</text>",
    ]
    for number, kind in enumerate(KIND_ROWS):
        y = TOP + number * (3 * (CELL + GAP) + 6) + CELL
        parts.append(f'<text x="4" y="{y}">{KIND_LABELS[kind]}</text>')
    for interval in intervals:
        x = LEFT + column[interval] * (CELL + GAP)
        if interval in report.focus_intervals:
            parts.append(
                f'<path d="M{x} {TOP - 12} h{CELL} l{-CELL / 2} {CELL - 3} z"'
                ' fill="#1565c0"><title>environment write in this interval</title>'
                "</path>"
            )
        if interval % 10 == 0:
            parts.append(f'<text x="{x}" y="{height - 20}">f{interval:03d}</text>')
    parts.append(
        f'<text x="{LEFT}" y="{height - 6}">flush interval of the write log →</text>'
    )
    path.write_text("\n".join([*parts, *rows, "</svg>", ""]))
    return path


# -- JUnit XML -----------------------------------------------------------------


def write_junit(report: ReportInput, path: Path) -> Path:
    """Write one JUnit test case per state to ``path`` and return it."""
    suite_name = f"crash-states.{report.recording.update}"
    results = report.results
    suite = ElementTree.Element(
        "testsuite",
        name=suite_name,
        tests=str(len(results)),
        failures=str(sum(r.bad for r in results)),
        errors=str(sum(r.error is not None for r in results)),
        time=f"{report.seconds:.3f}",
    )
    for result in results:
        case = ElementTree.SubElement(
            suite,
            "testcase",
            classname=suite_name,
            name=result.planned.name,
            time=f"{result.seconds:.3f}",
        )
        if result.error is not None:
            error = ElementTree.SubElement(case, "error", message="check failed")
            error.text = result.error
        elif result.bad:
            failure = ElementTree.SubElement(
                case, "failure", message=result.problems[0][:200]
            )
            failure.text = "\n".join(result.problems)
        bundle = report.bundles.get(result.planned.name)
        details = [f"state {result.planned.state.label()}", f"env {result.host.env}"]
        if result.boot is not None:
            details.append(f"boot {result.boot.describe()}")
        if bundle is not None:
            details.append(f"bundle {bundle}")
        ElementTree.SubElement(case, "system-out").text = "\n".join(details)
    root = ElementTree.Element("testsuites")
    root.append(suite)
    tree = ElementTree.ElementTree(root)
    ElementTree.indent(tree)
    tree.write(path, encoding="utf-8", xml_declaration=True)
    return path
