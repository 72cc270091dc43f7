"""Replay of bundles that are incomplete, damaged or pointed at an unusable work
directory, and the replay command's option checks. The bundles here contain a small
blank disk, so a replay of them stops at the state digest, after it prepared its
work directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from mbl_sim.board import load_board
from mbl_sim.campaign import cli as campaign_cli
from mbl_sim.campaign.bundle import MANIFEST_FILE, REPLAY_MARKER, replay
from mbl_sim.campaign.record import (
    BASE_FILE,
    LOG_FILE,
    RECORDING_FILE,
    Recording,
    SlotExpectation,
    file_digest,
)
from mbl_sim.cli import main
from mbl_sim.errors import ConfigError
from mbl_sim.storage import CrashState, LogWriter, image_digest

SECTOR = 512
WRONG_DIGEST = "0" * 64
EXIT_USAGE = 2


def write_manifest(bundle: Path, manifest: object) -> None:
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))


def make_bundle(bundle: Path) -> dict[str, Any]:
    """Write a bundle of a 1 MiB blank disk and a one-write log, whose manifest
    has a wrong state digest, and return the manifest."""
    bundle.mkdir()
    base = bundle / BASE_FILE
    with base.open("wb") as stream:
        stream.truncate(1 << 20)
    with LogWriter(bundle / LOG_FILE) as writer:
        writer.write(0, b"\x01" * SECTOR)
        writer.flush()
    Recording(
        directory=bundle,
        update="synthetic",
        faulty=False,
        board_source=load_board("qemu-virt-a53").source,
        old=SlotExpectation("a", "rootfs1", "1.0.0"),
        new=SlotExpectation("b", "rootfs2", "2.0.0"),
        base_digest=image_digest(base),
        log_digest=file_digest(bundle / LOG_FILE),
        seconds=1.0,
        output="",
    ).save()
    manifest = {
        "format": 1,
        "name": "f001",
        "state": CrashState(1).to_json(),
        "state_digest": WRONG_DIGEST,
        "base_digest": image_digest(base),
        "log_sha256": file_digest(bundle / LOG_FILE),
        "problems": ["slot b: /etc/mbl-version is '2.0.0-half'"],
    }
    write_manifest(bundle, manifest)
    return manifest


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    path = tmp_path / "bundle"
    make_bundle(path)
    return path


def replay_error(bundle: Path, workdir: Path | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        replay(bundle, workdir=workdir, boot=False)
    return str(caught.value)


# -- bundle files and manifest --------------------------------------------------------


@pytest.mark.parametrize("name", [MANIFEST_FILE, RECORDING_FILE, BASE_FILE, LOG_FILE])
def test_bundle_file_missing(bundle: Path, name: str) -> None:
    (bundle / name).unlink()

    assert replay_error(bundle) == f"bundle {bundle} is incomplete: {name} missing"


def test_bundle_directory_missing(tmp_path: Path) -> None:
    missing = tmp_path / "absent"

    assert replay_error(missing) == f"bundle {missing} not found"


def test_manifest_not_object(bundle: Path) -> None:
    write_manifest(bundle, [1, 2])

    message = replay_error(bundle)

    assert message.startswith(f"invalid bundle manifest {bundle / MANIFEST_FILE}: ")
    assert "the manifest is an array, expected an object" in message


@pytest.mark.parametrize(
    "key", ["name", "state", "state_digest", "base_digest", "log_sha256", "problems"]
)
def test_manifest_key_missing(tmp_path: Path, key: str) -> None:
    bundle = tmp_path / "bundle"
    manifest = make_bundle(bundle)
    del manifest[key]
    write_manifest(bundle, manifest)

    message = replay_error(bundle, tmp_path / "work")

    assert message.startswith(f"invalid bundle manifest {bundle / MANIFEST_FILE}: ")
    assert f"missing key {key!r}" in message
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("problems", "none", "key 'problems' is \"none\", expected an array"),
        ("problems", [1], "key 'problems' is an array, expected an array of strings"),
        ("base_digest", None, "key 'base_digest' is null, expected a string"),
        ("state", [1], "key 'state' is an array, expected an object"),
    ],
    ids=["problems-string", "problems-numbers", "digest-null", "state-array"],
)
def test_manifest_key_wrong_type(
    tmp_path: Path, key: str, value: object, shown: str
) -> None:
    bundle = tmp_path / "bundle"
    manifest = make_bundle(bundle)
    manifest[key] = value
    write_manifest(bundle, manifest)

    assert shown in replay_error(bundle)


@pytest.mark.parametrize(
    ("state", "shown"),
    [
        ({"point": 1, "kept": []}, "missing key 'state.torn'"),
        ({"point": "x", "kept": [], "torn": None}, "key 'state.point' is \"x\""),
        ({"point": 1, "kept": [-1], "torn": None}, "key 'state.kept' is an array"),
        ({"point": 1, "kept": [], "torn": {"index": 0}}, "'state.torn.kept_bytes'"),
        ({"point": True, "kept": [], "torn": None}, "key 'state.point' is true"),
    ],
    ids=["torn-missing", "point-string", "kept-negative", "torn-half", "point-bool"],
)
def test_manifest_state_invalid(
    tmp_path: Path, state: dict[str, Any], shown: str
) -> None:
    bundle = tmp_path / "bundle"
    manifest = make_bundle(bundle)
    manifest["state"] = state
    write_manifest(bundle, manifest)

    message = replay_error(bundle)

    assert shown in message
    assert "Error(" not in message


# -- work directory -------------------------------------------------------------------


def test_workdir_with_user_files_kept(bundle: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "mine"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("keep me")

    message = replay_error(bundle, workdir)

    assert f"work directory {workdir} is not empty and no replay made it" in message
    assert (workdir / "notes.txt").read_text() == "keep me"


def test_workdir_is_file(bundle: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "file"
    workdir.write_text("")

    message = replay_error(bundle, workdir)

    assert f"work directory {workdir} is not a directory" in message


def test_workdir_new_gets_marker(bundle: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "new" / "work"

    message = replay_error(bundle, workdir)

    assert f"the manifest expects {WRONG_DIGEST}" in message
    assert (workdir / REPLAY_MARKER).is_file()
    assert (workdir / "disk.raw").is_file()


def test_workdir_of_earlier_replay_emptied(bundle: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    replay_error(bundle, workdir)
    (workdir / "stale").write_text("")

    replay_error(bundle, workdir)

    assert not (workdir / "stale").exists()
    assert (workdir / REPLAY_MARKER).is_file()


def test_default_workdir_emptied(bundle: Path) -> None:
    stale = bundle / "replay" / "stale"
    stale.parent.mkdir()
    stale.write_text("")

    replay_error(bundle)

    assert not stale.exists()
    assert (bundle / "replay" / REPLAY_MARKER).is_file()


def test_workdir_containing_bundle_kept(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / REPLAY_MARKER).write_text("")
    bundle = workdir / "bundle"
    make_bundle(bundle)

    message = replay_error(bundle, workdir)

    assert f"work directory {workdir} contains the bundle {bundle}" in message
    assert (bundle / MANIFEST_FILE).is_file()


# -- command line ---------------------------------------------------------------------


def test_cli_workdir_error_is_usage(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workdir = tmp_path / "file"
    workdir.write_text("")

    status = main(["replay", str(bundle), "--workdir", str(workdir), "--no-boot"])

    assert status == EXIT_USAGE
    assert "is not a directory" in capsys.readouterr().err


def command_parser() -> argparse.ArgumentParser:
    """Return a parser of the campaign and replay commands that only parses, so a
    test whose option check fails starts no campaign."""
    parser = argparse.ArgumentParser(prog="mbl-sim")
    campaign_cli.add_parsers(parser.add_subparsers(dest="command"))
    return parser


@pytest.mark.parametrize("command", ["campaign rootfs", "replay BUNDLE"])
@pytest.mark.parametrize("value", ["-5", "0", "nan", "inf"])
def test_cli_rejects_boot_timeout(
    command: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        command_parser().parse_args([*command.split(), f"--boot-timeout={value}"])

    assert exit_info.value.code == EXIT_USAGE
    error = capsys.readouterr().err
    assert "argument --boot-timeout: expected a positive number of seconds" in error
    assert f"got {value}" in error


@pytest.mark.parametrize("command", ["campaign rootfs", "replay BUNDLE"])
def test_cli_accepts_boot_timeout(command: str) -> None:
    args = command_parser().parse_args([*command.split(), "--boot-timeout=2.5"])

    assert args.boot_timeout == 2.5
