"""Certification without QEMU: the check registry, check ordering, reports, template."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from pathlib import Path

import pytest

from mbl_sim import certify
from mbl_sim.board import load_board
from mbl_sim.certify import (
    CHECKS,
    CertificationReport,
    CertifyContext,
    CheckFailed,
    CheckResult,
    CheckSkipped,
    Finding,
    register,
)
from mbl_sim.certify.command import render_board_template
from mbl_sim.certify.registry import plugin_check
from mbl_sim.certify.report import write_junit, write_markdown
from mbl_sim.dtb import DeviceTreeError
from mbl_sim.errors import ConfigError
from mbl_sim.images.recipe import ImageBuilder

CORE_CHECKS = ["firmware-environment", "boot", "storage", "boot-state"]


@pytest.fixture
def registry() -> Iterator[dict[str, certify.Check]]:
    """The registry, restored after the test."""
    saved = dict(CHECKS)
    try:
        yield CHECKS
    finally:
        CHECKS.clear()
        CHECKS.update(saved)


def test_core_checks_registered_in_order() -> None:
    names = certify.check_names()

    assert names[:4] == CORE_CHECKS
    assert names.index("rootfs-update") < names.index("rollback")
    assert CHECKS["rollback"].requires == ("boot", "storage")
    assert not CHECKS["power-cut"].core
    assert not CHECKS["app-update"].core


def test_register_rejects_duplicate(registry: dict[str, certify.Check]) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register("boot", "again")(lambda context: None)


def test_register_rejects_unknown_requirement(
    registry: dict[str, certify.Check],
) -> None:
    with pytest.raises(ValueError, match="requires unknown checks nothing"):
        register("extra", "extra", requires=("nothing",))(lambda context: None)


def _context(tmp_path: Path) -> CertifyContext:
    return CertifyContext(
        board=load_board("qemu-virt-a53"),
        images=None,  # type: ignore[arg-type]
        workdir=tmp_path,
        report=lambda message: None,
    )


def test_plugin_check_without_module_skips(
    registry: dict[str, certify.Check], tmp_path: Path
) -> None:
    plugin_check(
        "plugin-x",
        "x",
        "mbl_sim.no_such_module:check",
        purpose="it comes later",
    )

    with pytest.raises(CheckSkipped) as caught:
        CHECKS["plugin-x"].function(_context(tmp_path))

    message = str(caught.value)
    assert message.startswith("not available: module mbl_sim.no_such_module")
    assert message.endswith("it comes later")


def test_plugin_check_without_function_skips(
    registry: dict[str, certify.Check], tmp_path: Path
) -> None:
    plugin_check("plugin-y", "y", "mbl_sim.dtb:no_such_check", purpose="later")

    with pytest.raises(CheckSkipped, match=r"mbl_sim\.dtb has no no_such_check"):
        CHECKS["plugin-y"].function(_context(tmp_path))


def test_plugin_check_calls_function(
    registry: dict[str, certify.Check], tmp_path: Path
) -> None:
    plugin_check("plugin-z", "z", "os.path:basename", purpose="later")

    with pytest.raises(TypeError):
        # os.path.basename gets the context, which is not a path: the plugin runs.
        CHECKS["plugin-z"].function(_context(tmp_path))


def _run(
    check: certify.Check, results: dict[str, CheckResult], tmp_path: Path
) -> CheckResult:
    result, _ = certify._run_check(check, _context(tmp_path), results)
    return result


def test_check_skipped_when_requirement_failed(tmp_path: Path) -> None:
    results = {"boot": CheckResult("boot", "boot", "failed", 1.0)}

    result = _run(CHECKS["storage"], results, tmp_path)

    assert result.status == "skipped"
    assert result.detail == "not run: check boot did not pass"


def test_check_failure_recorded(tmp_path: Path) -> None:
    def broken(context: CertifyContext) -> str:
        raise CheckFailed("the storage node is wrong")

    check = certify.Check("broken", "title", broken)

    result = _run(check, {}, tmp_path)

    assert result.status == "failed"
    assert result.detail == "the storage node is wrong"


def test_unknown_check_name_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown certification check 'bot'"):
        certify.certify(load_board(), tmp_path, only=["bot"])


def test_build_failure_fails_certification(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def fail(self: ImageBuilder) -> None:
        raise DeviceTreeError(
            f"{self.board.source}: device_tree.storage: node /pcie@20000000 not "
            "found in the device tree"
        )

    monkeypatch.setattr(ImageBuilder, "build", fail)

    report = certify.certify(load_board(), tmp_path, report=lambda message: None)

    assert report.verdict == "FAIL"
    assert "device_tree.storage" in report.error
    assert "/pcie@20000000" in report.error
    assert report.results == []
    markdown = (tmp_path / "report.md").read_text()
    assert "## Stopped before the checks" in markdown
    assert "/pcie@20000000" in markdown
    suite = ElementTree.parse(tmp_path / "report.xml").getroot()
    assert suite.get("errors") == "1"


def sample_report(tmp_path: Path) -> CertificationReport:
    return CertificationReport(
        board="rpi3",
        description="Raspberry Pi 3",
        board_file="mbl_sim/boards/rpi3.yaml",
        results=[
            CheckResult("boot", "boots", "passed", 5.0, "shell on /dev/ttyS1"),
            CheckResult("storage", "disk | names", "failed", 0.5, "no /dev/x\nmore"),
            CheckResult(
                "power-cut", "campaign", "skipped", 0.0, "not available", False
            ),
        ],
        facts={"kernel release (running)": "6.1.0-57-arm64"},
        findings=[Finding("firmware-environment", "FAT env", "not power-safe")],
        seconds=12.0,
        command="mbl-sim certify rpi3",
        workdir=tmp_path,
        details={"storage": "CheckFailed: no /dev/x\nconsole tail"},
    )


def test_verdict_rules(tmp_path: Path) -> None:
    report = sample_report(tmp_path)
    assert report.verdict == "FAIL"

    report.results[1].status = "passed"
    assert report.verdict == "PASS"

    report.results[1].status = "skipped"
    assert report.verdict == "INCOMPLETE"

    report.results[1].status = "passed"
    report.not_selected = ["rollback"]
    assert report.verdict == "INCOMPLETE"


def test_markdown_report_sections(tmp_path: Path) -> None:
    path = tmp_path / "report.md"

    write_markdown(sample_report(tmp_path), path)

    text = path.read_text()
    assert text.startswith("# Certification of board `rpi3`")
    assert "**Verdict: FAIL** — 1 passed, 1 failed, 1 skipped, 1 finding" in text
    assert "| kernel release (running) | 6.1.0-57-arm64 |" in text
    # A | inside a cell is escaped, and only the first line of a detail shows.
    assert "disk \\| names" in text
    assert "| no /dev/x |" in text
    assert "### FAT env" in text
    assert "### `storage`" in text
    assert "console tail" in text
    assert "`power-cut` (optional)" in text


def test_junit_report_cases(tmp_path: Path) -> None:
    path = tmp_path / "report.xml"

    write_junit(sample_report(tmp_path), path)

    suite = ElementTree.parse(path).getroot()
    assert suite.get("name") == "mbl-sim certify rpi3"
    assert suite.get("tests") == "3"
    assert suite.get("failures") == "1"
    assert suite.get("skipped") == "1"
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert sorted(cases) == ["boot", "power-cut", "storage"]
    failure = cases["storage"].find("failure")
    assert failure is not None
    assert failure.get("message") == "no /dev/x"
    assert "console tail" in (failure.text or "")
    assert cases["power-cut"].find("skipped") is not None
    properties = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert properties["verdict"] == "FAIL"
    assert properties["kernel release (running)"] == "6.1.0-57-arm64"
    out = suite.find("system-out")
    assert out is not None
    assert "FAT env" in (out.text or "")


def test_board_template_is_a_valid_board(tmp_path: Path) -> None:
    path = tmp_path / "my-board.yaml"
    path.write_text(render_board_template("my-board"))

    board = load_board(path)

    assert board.name == "my-board"
    assert board.description.startswith("TODO")
    assert board.storage.transfer.guest_disk == "/dev/vdb"


def test_board_template_rejects_bad_name() -> None:
    with pytest.raises(ConfigError, match="invalid board name 'My_Board'"):
        render_board_template("My_Board")


def test_check_and_skip_leaving_nothing_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no check left to run: --check boot"):
        certify.certify(
            load_board("qemu-virt-a53"), tmp_path, only=["boot"], skip=["boot"]
        )
    assert list(tmp_path.iterdir()) == []


def test_output_with_foreign_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "device").mkdir()
    (tmp_path / "device" / "notes.txt").write_text("mine\n")

    with pytest.raises(ConfigError, match="contains files that mbl-sim did not write"):
        certify.certify(load_board("qemu-virt-a53"), tmp_path, only=["boot"])
    assert (tmp_path / "device" / "notes.txt").read_text() == "mine\n"
