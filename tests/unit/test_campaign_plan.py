"""Tests for the crash-state campaign without QEMU: planning states along a write
log, host checks of synthetic disks, worker processes, reports, bundles and their
replay."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from mbl_sim.board import FLAGS_PARTITION, Board, load_board
from mbl_sim.campaign.bundle import replay, write_bundle
from mbl_sim.campaign.checks import StateView, check_on_host
from mbl_sim.campaign.plan import (
    DEFAULT_BOOT_STATES,
    UNLIMITED_CAP,
    PlanOptions,
    plan_states,
)
from mbl_sim.campaign.record import (
    Recording,
    SlotExpectation,
    choose_sample,
    file_digest,
)
from mbl_sim.campaign.report import ReportInput, write_junit, write_markdown, write_svg
from mbl_sim.campaign.runner import StateResult, WorkerSettings, check_states
from mbl_sim.cli import main as campaign_main
from mbl_sim.errors import ConfigError
from mbl_sim.images.recipe import DeviceImages
from mbl_sim.storage import (
    CrashState,
    LogWriter,
    WriteLog,
    image_digest,
    read_log,
    with_writes_durable,
)
from updater.bootenv import encode_copy

SECTOR = 512
E2FSPROGS = ("mke2fs", "e2fsck", "debugfs")
needs_e2fsprogs = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in E2FSPROGS),
    reason="needs mke2fs, e2fsck and debugfs (Debian package e2fsprogs)",
)
OLD_ENV = {"active_slot": "a", "previous_slot": "a", "upgrade_available": "0"}
NEW_ENV = {"active_slot": "b", "previous_slot": "a", "upgrade_available": "1"}


# -- planning -------------------------------------------------------------------------


def write_log(path: Path, layout: str, env_offset: int | None = None) -> WriteLog:
    """Write a log from ``layout``: ``w`` a one-sector write, ``W`` a four-sector
    write, ``e`` a write at ``env_offset``, ``f`` a flush."""
    with LogWriter(path) as writer:
        for number, kind in enumerate(layout):
            if kind == "f":
                writer.flush()
            elif kind == "e":
                assert env_offset is not None
                writer.write(env_offset, bytes(SECTOR))
            else:
                count = 4 if kind == "W" else 1
                writer.write(
                    number * 8 * SECTOR, bytes([number % 256]) * count * SECTOR
                )
    return read_log(path)


def test_plan_names_every_flush(tmp_path: Path) -> None:
    log = write_log(tmp_path / "w.log", "wwfwf")

    plan = plan_states(log, PlanOptions(subsets=0, torn=0))

    assert [state.name for state in plan] == ["f000", "f001", "f002"]
    assert [state.state for state in plan] == [
        CrashState(0),
        CrashState(3),
        CrashState(5),
    ]
    assert {state.kind for state in plan} == {"flush"}


def test_plan_write_through_state_per_write(
    tmp_path: Path,
) -> None:
    log = with_writes_durable(write_log(tmp_path / "w.log", "wWwe", env_offset=SECTOR))

    plan = plan_states(log, PlanOptions(), [(SECTOR, SECTOR)])

    # Each write is durable once complete: no cached subsets, no torn writes.
    assert [state.name for state in plan] == ["f000", "f001", "f002", "f003", "f004"]
    assert [state.state for state in plan] == [CrashState(p) for p in range(5)]
    assert {state.kind for state in plan} == {"flush"}
    assert [state.focus for state in plan] == [False, False, False, False, True]


def test_plan_without_limit_stops_at_the_cap(tmp_path: Path) -> None:
    log = with_writes_durable(write_log(tmp_path / "w.log", "w" * (UNLIMITED_CAP + 5)))

    plan = plan_states(log, PlanOptions())

    assert len(plan) == UNLIMITED_CAP
    assert plan[0].name == "f000"
    assert plan[-1].name == f"f{UNLIMITED_CAP + 5:03d}"


def test_plan_variants_keep_part_of_the_cache(tmp_path: Path) -> None:
    log = write_log(tmp_path / "w.log", "wwwWwf")

    plan = plan_states(log, PlanOptions(subsets=3, torn=2, seed=4))

    subsets = [state for state in plan if state.kind == "subset"]
    torn = [state for state in plan if state.kind == "torn"]
    assert [state.name for state in subsets] == ["f001-s0", "f001-s1", "f001-s2"]
    for planned in subsets:
        assert planned.state.point == 5
        assert 0 < len(planned.state.kept) < 5
        assert planned.state.torn is None
    assert len({planned.state.kept for planned in subsets}) == 3
    for planned in torn:
        assert planned.state.torn is not None
        assert planned.state.torn.index == 3
        assert planned.state.torn.kept_bytes % SECTOR == 0
        assert 3 not in planned.state.kept


def test_plan_is_reproducible_by_seed(tmp_path: Path) -> None:
    log = write_log(tmp_path / "w.log", "wwwwwwfwwwwWwf")

    first = plan_states(log, PlanOptions(seed=1))
    again = plan_states(log, PlanOptions(seed=1))
    other = plan_states(log, PlanOptions(seed=2))

    assert first == again
    assert [p.state for p in first] != [p.state for p in other]


def test_plan_single_write_interval_has_no_subsets(tmp_path: Path) -> None:
    log = write_log(tmp_path / "w.log", "Wf")

    kinds = [state.kind for state in plan_states(log, PlanOptions())]

    assert kinds == ["flush", "torn", "flush"]


def test_plan_end_interval_after_last_flush(tmp_path: Path) -> None:
    log = write_log(tmp_path / "w.log", "wfwwW")

    plan = plan_states(log, PlanOptions())

    end = [state for state in plan if state.name.startswith("end")]
    assert [state.name for state in end] == ["end-s0", "end-s1", "end-t0", "end-all"]
    assert end[-1].state == CrashState(5, frozenset({2, 3, 4}))


def test_plan_limit_prefers_environment_writes(tmp_path: Path) -> None:
    env_offset = 1 << 20
    layout = "wf" * 20 + "ef" + "wf" * 20
    log = write_log(tmp_path / "w.log", layout, env_offset)
    options = PlanOptions(max_states=12, focus_after=2, subsets=0, torn=0)

    plan = plan_states(log, options, [(env_offset, SECTOR)])

    names = [state.name for state in plan]
    assert len(plan) == 12
    assert {"f021", "f022", "f023"} <= set(names)
    assert "f000" in names
    assert all(state.focus == (state.interval in (21, 22, 23)) for state in plan)


def test_plan_boots_all_of_few_states(tmp_path: Path) -> None:
    log = write_log(tmp_path / "w.log", "wfwf")

    plan = plan_states(log, PlanOptions(subsets=0, torn=0))

    assert all(state.boot for state in plan)


def test_plan_boots_a_share(tmp_path: Path) -> None:
    log = write_log(tmp_path / "w.log", "wf" * 40)

    default = plan_states(log, PlanOptions(subsets=0, torn=0))
    quarter = plan_states(log, PlanOptions(subsets=0, torn=0, boot_share=0.25))
    none = plan_states(log, PlanOptions(subsets=0, torn=0, boot_share=0.0))

    assert sum(state.boot for state in default) == DEFAULT_BOOT_STATES
    assert sum(state.boot for state in quarter) == round(0.25 * 41)
    assert not any(state.boot for state in none)


def test_choose_sample_keeps_version_marker_and_last() -> None:
    paths = [f"/usr/share/file{number}" for number in range(100)]
    paths.insert(3, "/etc/mbl-version")

    sample = choose_sample(paths, 20, seed=0)

    assert len(sample) == 20
    assert "/etc/mbl-version" in sample
    assert sample[-8:] == paths[-8:]
    assert sample == [path for path in paths if path in sample]
    assert choose_sample(paths, None, 0) == paths


# -- host checks of a synthetic disk --------------------------------------------------


@pytest.fixture(scope="module")
def virt_board() -> Board:
    """The board whose disk layout the synthetic disks follow."""
    return load_board("qemu-virt-a53")


def make_filesystem(
    disk: Path, board: Board, name: str, files: dict[str, bytes]
) -> None:
    partition = board.storage.layout[name]
    root = disk.parent / f"root-{name}"
    root.mkdir()
    for path, data in files.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    subprocess.run(
        [
            "mke2fs",
            "-F",
            "-q",
            "-t",
            "ext4",
            "-L",
            name,
            "-E",
            f"offset={partition.start}",
            "-d",
            str(root),
            str(disk),
            f"{partition.size // 1024}k",
        ],
        check=True,
    )


def make_recording(
    directory: Path,
    board: Board,
    new_version_file: bytes,
    flag_files: dict[str, bytes] | None = None,
) -> Recording:
    """A recording whose disk has slot a at 1.0.0 and slot b holding
    ``new_version_file`` as its version. With an environment, the log flips it to
    b; with flag files, the bootflags partition contains ``flag_files`` and the log
    only flushes.
    """
    directory.mkdir()
    env = board.storage.env
    base = directory / "start.raw"
    with base.open("wb") as stream:
        stream.truncate(board.storage.size)
        if env is not None:
            stream.seek(env.offsets[0])
            stream.write(encode_copy(OLD_ENV, 1, env.size))
    old_files = {"/etc/mbl-version": b"1.0.0\n", "/bin/tool": b"old tool\n"}
    new_files = {"/etc/mbl-version": new_version_file, "/bin/tool": b"new tool\n"}
    make_filesystem(base, board, "rootfs1", old_files)
    make_filesystem(base, board, "rootfs2", new_files)
    make_filesystem(base, board, "home", {})
    if env is None:
        make_filesystem(base, board, FLAGS_PARTITION, flag_files or {})
    with LogWriter(directory / "update.log") as writer:
        if env is not None:
            writer.write(env.offsets[1], encode_copy(NEW_ENV, 2, env.size))
        writer.flush()
    recording = Recording(
        directory=directory,
        update="synthetic",
        faulty=False,
        board_source=board.source,
        old=SlotExpectation(
            "a", "rootfs1", "1.0.0", {"/bin/tool": sha256(b"old tool\n")}
        ),
        new=SlotExpectation(
            "b", "rootfs2", "2.0.0", {"/bin/tool": sha256(b"new tool\n")}
        ),
        base_digest=image_digest(base),
        log_digest=file_digest(directory / "update.log"),
        seconds=1.0,
        output="",
    )
    recording.save()
    return recording


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def good_recording(tmp_path: Path, virt_board: Board) -> Recording:
    return make_recording(tmp_path / "good", virt_board, b"2.0.0\n")


@pytest.fixture
def bad_recording(tmp_path: Path, virt_board: Board) -> Recording:
    return make_recording(tmp_path / "bad", virt_board, b"2.0.0-half\n")


def check(
    recording: Recording, board: Board, state: CrashState, scratch: Path
) -> list[str]:
    view = StateView(board, recording, recording.read_log(), state, scratch)
    return check_on_host(view).problems


@needs_e2fsprogs
def test_host_check_good_states(
    good_recording: Recording, virt_board: Board, tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch"

    assert check(good_recording, virt_board, CrashState(0), scratch) == []
    assert check(good_recording, virt_board, CrashState(2), scratch) == []
    assert (
        check(good_recording, virt_board, CrashState(1, frozenset({0})), scratch) == []
    )


@needs_e2fsprogs
def test_host_check_wrong_version(
    bad_recording: Recording, virt_board: Board, tmp_path: Path
) -> None:
    problems = check(bad_recording, virt_board, CrashState(2), tmp_path / "scratch")

    assert problems == ["slot b: /etc/mbl-version is '2.0.0-half', expected '2.0.0'"]


@needs_e2fsprogs
def test_host_check_wrong_file(
    good_recording: Recording, virt_board: Board, tmp_path: Path
) -> None:
    partition = virt_board.storage.layout["rootfs1"]
    tool = tmp_path / "tool"
    tool.write_bytes(b"changed\n")
    subprocess.run(
        [
            "debugfs",
            "-w",
            "-R",
            f"write {tool} /bin/tool2",
            f"{good_recording.base}?offset={partition.start}",
        ],
        check=True,
        capture_output=True,
    )
    old = SlotExpectation(
        "a", "rootfs1", "1.0.0", {"/bin/tool2": sha256(b"other\n"), "/bin/none": None}
    )
    recording = dataclasses.replace(good_recording, old=old)

    problems = check(recording, virt_board, CrashState(0), tmp_path / "scratch")

    assert len(problems) == 1
    assert problems[0].startswith("slot a: 1 of 2 sampled files are wrong")
    assert "/bin/tool2 has SHA-256" in problems[0]


@needs_e2fsprogs
def test_host_check_no_valid_environment(
    good_recording: Recording, virt_board: Board, tmp_path: Path
) -> None:
    env = virt_board.storage.env
    assert env is not None
    with good_recording.base.open("r+b") as stream:
        stream.seek(env.offsets[0] + 100)
        stream.write(b"corrupt")

    problems = check(good_recording, virt_board, CrashState(0), tmp_path / "scratch")

    assert len(problems) == 1
    assert problems[0].startswith("no valid environment copy")


@needs_e2fsprogs
def test_host_check_broken_filesystem(
    good_recording: Recording, virt_board: Board, tmp_path: Path
) -> None:
    partition = virt_board.storage.layout["rootfs2"]
    with good_recording.base.open("r+b") as stream:
        # The first block group descriptor, right after the superblock (1 KiB
        # blocks): its checksum no longer matches.
        stream.seek(partition.start + 2048 + 8)
        stream.write(b"\xff\xff\xff\xff")

    problems = check(good_recording, virt_board, CrashState(2), tmp_path / "scratch")

    assert len(problems) == 1
    assert problems[0].startswith("slot b: journal replay failed (e2fsck exit code 4)")


# -- workers, reports and bundles -----------------------------------------------------


def settings_for(recording: Recording, board: Board, tmp_path: Path) -> WorkerSettings:
    images = DeviceImages(
        board=board,
        disk=recording.base,
        kernel=Path("/nonexistent"),
        initrd=Path("/nonexistent"),
        rootfs=Path("/nonexistent"),
        kernel_release="",
        factory_version="1.0.0",
    )
    return WorkerSettings(
        images, recording.directory, tmp_path / "scratch", tmp_path / "states"
    )


@needs_e2fsprogs
def test_workers_check_states_in_order(
    bad_recording: Recording, virt_board: Board, tmp_path: Path
) -> None:
    plan = plan_states(bad_recording.read_log(), PlanOptions(torn=0, boot_share=0.0))
    seen: list[int] = []

    results = check_states(
        settings_for(bad_recording, virt_board, tmp_path),
        plan,
        workers=2,
        progress=lambda done, total, result: seen.append(done),
    )

    assert [result.planned.name for result in results] == [p.name for p in plan]
    assert seen == list(range(1, len(plan) + 1))
    assert [result.bad for result in results] == [False, True]
    assert all(result.error is None for result in results)
    assert not (tmp_path / "scratch").exists() or not any(
        (tmp_path / "scratch").iterdir()
    )


def bad_result(recording: Recording, board: Board, tmp_path: Path) -> StateResult:
    planned = plan_states(recording.read_log(), PlanOptions(boot_share=0.0))[-1]
    view = StateView(
        board, recording, recording.read_log(), planned.state, tmp_path / "s"
    )
    return StateResult(planned, check_on_host(view))


@needs_e2fsprogs
def test_reports_are_well_formed(
    bad_recording: Recording, virt_board: Board, tmp_path: Path
) -> None:
    result = bad_result(bad_recording, virt_board, tmp_path)
    report = ReportInput(
        title="synthetic",
        recording=bad_recording,
        window=bad_recording.read_log(),
        results=[result],
        seconds=1.5,
        workers=1,
        seed=0,
        focus_intervals=frozenset({1}),
        bundles={result.planned.name: tmp_path / "bundles" / "f001"},
    )

    markdown = write_markdown(report, tmp_path / "report.md").read_text()
    svg = ElementTree.parse(write_svg(report, tmp_path / "outcome.svg")).getroot()
    junit = ElementTree.parse(write_junit(report, tmp_path / "junit.xml")).getroot()

    assert "**1 bad states**" in markdown
    assert "| f001 | 2 | 0 | — |" in markdown
    assert svg.tag.endswith("svg")
    assert any(
        rect.get("fill") == "#c62828"
        for rect in svg.iter("{http://www.w3.org/2000/svg}rect")
    )
    suite = junit.find("testsuite")
    assert suite is not None
    assert suite.get("failures") == "1"
    failure = junit.find("testsuite/testcase/failure")
    assert failure is not None
    assert "2.0.0-half" in (failure.text or "")


@needs_e2fsprogs
def test_bundle_replays_without_boot(
    bad_recording: Recording, virt_board: Board, tmp_path: Path
) -> None:
    result = bad_result(bad_recording, virt_board, tmp_path)

    bundle = write_bundle(bad_recording, result, tmp_path / "bundle", campaign_seed=3)
    replayed = replay(bundle, boot=False)

    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["state"] == {"point": 2, "kept": [], "torn": None}
    assert manifest["campaign_seed"] == 3
    assert (bundle / "start.raw").stat().st_ino == bad_recording.base.stat().st_ino
    assert replayed.problems == result.problems
    assert replayed.recorded_problems == result.problems


@needs_e2fsprogs
def test_bundle_rejects_changed_log(
    bad_recording: Recording, virt_board: Board, tmp_path: Path
) -> None:
    result = bad_result(bad_recording, virt_board, tmp_path)
    bundle = write_bundle(bad_recording, result, tmp_path / "bundle", campaign_seed=0)
    (bundle / "update.log").unlink()
    shutil.copy(bad_recording.log_path, bundle / "update.log")
    with (bundle / "update.log").open("r+b") as stream:
        stream.seek(2 * SECTOR)
        stream.write(b"changed")

    with pytest.raises(ConfigError, match="SHA-256"):
        replay(bundle, boot=False)


# -- command line ---------------------------------------------------------------------


def test_cli_replays_bad_bundle(
    bad_recording: Recording,
    virt_board: Board,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = bad_result(bad_recording, virt_board, tmp_path)
    bundle = write_bundle(bad_recording, result, tmp_path / "bundle", campaign_seed=0)

    status = campaign_main(["replay", str(bundle), "--no-boot"])

    output = capsys.readouterr().out
    assert status == 1
    assert "bad state reproduced" in output
    assert "problem: slot b: /etc/mbl-version is '2.0.0-half'" in output


def test_cli_rejects_boot_share_above_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        campaign_main(["campaign", "rootfs", "--boot-share", "1.5"])

    assert exit_info.value.code == 2
    assert "expected a number from 0 to 1, got 1.5" in capsys.readouterr().err


@pytest.fixture(scope="module")
def flag_board() -> Board:
    """A board whose boot state is flag files on the bootflags partition."""
    board = load_board("imx6ul-evk")
    assert board.storage.env is None
    return board


@needs_e2fsprogs
@pytest.mark.parametrize(
    ("flag_files", "slot"),
    [({}, "a"), ({"rootfs2": b""}, "b"), ({"rootfs2": b"", "trial": b"b 1\n"}, "b")],
    ids=["no-flags", "rootfs2", "rootfs2-on-trial"],
)
def test_host_check_reads_flag_files(
    tmp_path: Path, flag_board: Board, flag_files: dict[str, bytes], slot: str
) -> None:
    recording = make_recording(tmp_path / "rec", flag_board, b"2.0.0\n", flag_files)
    view = StateView(
        flag_board, recording, recording.read_log(), CrashState(1), tmp_path / "s"
    )

    result = check_on_host(view)

    assert result.problems == []
    assert result.active_slot == slot
    assert result.env.startswith(f"flag files: active_slot={slot}")
    if "trial" in flag_files:
        assert "trial=b bootcount=1" in result.env


@needs_e2fsprogs
def test_host_check_broken_bootflags_filesystem(
    tmp_path: Path, flag_board: Board
) -> None:
    recording = make_recording(tmp_path / "rec", flag_board, b"2.0.0\n", {})
    partition = flag_board.storage.layout[FLAGS_PARTITION]
    with recording.base.open("r+b") as stream:
        stream.seek(partition.start + 2048 + 8)
        stream.write(b"\xff\xff\xff\xff")

    problems = check(recording, flag_board, CrashState(0), tmp_path / "scratch")

    assert len(problems) == 1
    assert problems[0].startswith(f"{FLAGS_PARTITION}: journal replay failed")
