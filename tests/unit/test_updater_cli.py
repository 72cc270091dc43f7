"""Tests for the mbl-update command line, with a fake command runner and image files."""

from __future__ import annotations

import io
import json
import lzma
import os
import shutil
import subprocess
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from updater.bootenv import EnvLocation, encode_copy, read_env
from updater.cli import main
from updater.errors import CommandError

SIZE = 0x2000
OFFSETS = (0x4000, 0x6000)
INITIAL_ENV = {
    "active_slot": "a",
    "bootcount": "0",
    "bootlimit": "3",
    "upgrade_available": "0",
}


class FakeRunner:
    """Records commands and the active slot at each; mount/umount only empty dirs."""

    def __init__(self, locations: list[EnvLocation], fail: str | None = None) -> None:
        self.locations = locations
        self.fail = fail
        self.commands: list[list[str]] = []
        self.active_slot_at: dict[str, str] = {}

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.commands.append(list(argv))
        active = read_env(self.locations).variables["active_slot"]
        self.active_slot_at[argv[0]] = active
        if argv[0] == self.fail:
            raise CommandError(f"{argv[0]} failed with exit code 1", argv, 1)
        if argv[0] == "umount":
            for path in Path(argv[-1]).iterdir():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        return subprocess.CompletedProcess(list(argv), 0, "", "")

    @property
    def programs(self) -> list[str]:
        return [argv[0] for argv in self.commands]


@dataclass
class Device:
    """Files that stand in for the device: config, environment image, cmdline."""

    directory: Path
    config: str
    image: Path
    cmdline: Path
    locations: list[EnvLocation]

    def env_bytes(self) -> bytes:
        return self.image.read_bytes()

    def variables(self) -> dict[str, str]:
        return read_env(self.locations).variables

    def run(self, *args: str, runner: FakeRunner | None = None) -> int:
        return main(
            ["--config", self.config, *args],
            cmdline_path=str(self.cmdline),
            runner=runner or FakeRunner(self.locations),
        )


@pytest.fixture
def device(tmp_path: Path) -> Device:
    image = tmp_path / "disk.img"
    data = bytearray(0x10000)
    data[OFFSETS[0] : OFFSETS[0] + SIZE] = encode_copy(INITIAL_ENV, 1, SIZE)
    image.write_bytes(bytes(data))
    fw_env = tmp_path / "fw_env.config"
    fw_env.write_text("".join(f"{image} {offset:#x} {SIZE:#x}\n" for offset in OFFSETS))
    config = tmp_path / "device.json"
    config.write_text(
        json.dumps(
            {
                "board": "qemu-virt-a53",
                "slots": {"a": "/dev/vdz2", "b": "/dev/vdz3"},
                "scratch_dir": str(tmp_path),
                "fw_env_config": str(fw_env),
                "bootlimit": 3,
            }
        )
    )
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyAMA0 root=/dev/vdz2 mbl.slot=a\n")
    locations = [EnvLocation(str(image), offset, SIZE) for offset in OFFSETS]
    return Device(tmp_path, str(config), image, cmdline, locations)


def rootfs_xz(*extra: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name in ("etc/hostname", *extra):
            info = tarfile.TarInfo(name)
            info.size = 7
            info.uid, info.gid = os.getuid(), os.getgid()
            archive.addfile(info, io.BytesIO(b"device\n"))
    return lzma.compress(buffer.getvalue(), preset=0)


def payload(directory: Path, members: dict[str, bytes]) -> str:
    path = directory / "payload.tar"
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return str(path)


def test_install_rootfs_flips_after_write(
    device: Device, capsys: pytest.CaptureFixture[str]
) -> None:
    path = payload(device.directory, {"rootfs.tar.xz": rootfs_xz()})
    runner = FakeRunner(device.locations)
    assert device.run("install", path, runner=runner) == 0
    assert capsys.readouterr().out.splitlines() == [
        "mbl-update: root filesystem written to slot b (/dev/vdz3)",
        "mbl-update: active slot is now b",
    ]
    assert runner.programs == ["mke2fs", "mount", "umount", "e2fsck", "reboot"]
    assert runner.commands[0][-2:] == ["rootfs2", "/dev/vdz3"]
    assert runner.active_slot_at["e2fsck"] == "a"
    assert runner.active_slot_at["reboot"] == "b"
    assert device.variables() == {
        **INITIAL_ENV,
        "active_slot": "b",
        "previous_slot": "a",
        "upgrade_available": "1",
        "bootcount": "0",
    }


def test_install_no_reboot(device: Device) -> None:
    path = payload(device.directory, {"rootfs.tar.xz": rootfs_xz()})
    runner = FakeRunner(device.locations)
    assert device.run("install", path, "--no-reboot", runner=runner) == 0
    assert "reboot" not in runner.programs
    assert device.variables()["active_slot"] == "b"


def test_install_from_slot_b_targets_a(device: Device) -> None:
    device.cmdline.write_text("mbl.slot=b\n")
    path = payload(device.directory, {"rootfs.tar.xz": rootfs_xz()})
    runner = FakeRunner(device.locations)
    assert device.run("install", path, "--no-reboot", runner=runner) == 0
    assert runner.commands[0][-1] == "/dev/vdz2"
    assert device.variables()["active_slot"] == "a"
    assert device.variables()["previous_slot"] == "b"


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({}, "has no members"),
        ({"rootfs.tar.xz": b"x", "extra.txt": b"x"}, "'extra.txt' is not expected"),
        ({"rootfs.tar.xz": b"x", "app.ipk": b"x"}, "contains both"),
        ({"app.ipk": b"x"}, "app.ipk is not a valid .ipk"),
    ],
)
def test_install_rejected_before_changes(
    device: Device,
    capsys: pytest.CaptureFixture[str],
    members: dict[str, bytes],
    message: str,
) -> None:
    path = payload(device.directory, members)
    before = device.env_bytes()
    runner = FakeRunner(device.locations)
    assert device.run("install", path, runner=runner) == 1
    stderr = capsys.readouterr().err
    assert stderr.startswith("mbl-update: error: ")
    assert message in stderr
    assert runner.commands == []
    assert device.env_bytes() == before


def test_install_both_env_copies_corrupt(
    device: Device, capsys: pytest.CaptureFixture[str]
) -> None:
    device.image.write_bytes(b"\xff" * 0x10000)
    path = payload(device.directory, {"rootfs.tar.xz": rootfs_xz()})
    runner = FakeRunner(device.locations)
    assert device.run("install", path, runner=runner) == 1
    assert "both U-Boot environment copies are invalid" in capsys.readouterr().err
    assert runner.commands == []
    assert device.env_bytes() == b"\xff" * 0x10000


@pytest.mark.parametrize(
    ("rootfs", "message"),
    [
        (rootfs_xz("../escape"), "'..' component"),
        (rootfs_xz()[:-40], "truncated or corrupt"),
    ],
)
def test_install_failure_keeps_active_slot(
    device: Device, capsys: pytest.CaptureFixture[str], rootfs: bytes, message: str
) -> None:
    path = payload(device.directory, {"rootfs.tar.xz": rootfs})
    before = device.env_bytes()
    runner = FakeRunner(device.locations)
    assert device.run("install", path, runner=runner) == 1
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == ""
    assert runner.programs == ["mke2fs", "mount", "umount"]
    assert device.env_bytes() == before


def test_install_e2fsck_failure_keeps_active_slot(device: Device) -> None:
    path = payload(device.directory, {"rootfs.tar.xz": rootfs_xz()})
    before = device.env_bytes()
    runner = FakeRunner(device.locations, fail="e2fsck")
    assert device.run("install", path, runner=runner) == 1
    assert device.env_bytes() == before


def test_install_reboot_failure(
    device: Device, capsys: pytest.CaptureFixture[str]
) -> None:
    path = payload(device.directory, {"rootfs.tar.xz": rootfs_xz()})
    runner = FakeRunner(device.locations, fail="reboot")
    assert device.run("install", path, runner=runner) == 1
    assert "becomes active at the next boot" in capsys.readouterr().err
    assert device.variables()["active_slot"] == "b"


def test_status_text(device: Device, capsys: pytest.CaptureFixture[str]) -> None:
    assert device.run("status") == 0
    lines = capsys.readouterr().out.splitlines()
    assert "running slot: a" in lines
    assert "active slot: a" in lines
    assert "previous slot: (not set)" in lines
    assert "upgrade_available: 0" in lines
    assert "bootcount: 0" in lines
    assert f"environment copy: 1 on {device.image} at offset 0x4000, flag 1" in lines
    assert lines[lines.index("environment:") + 1 :] == [
        f"  {name}={value}" for name, value in sorted(INITIAL_ENV.items())
    ]


def test_status_json(device: Device, capsys: pytest.CaptureFixture[str]) -> None:
    assert device.run("status", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["running_slot"] == "a"
    assert status["active_slot"] == "a"
    assert status["upgrade_available"] == "0"
    assert status["bootcount"] == "0"
    assert status["env_copy"] == 1
    assert status["env_flag"] == 1
    assert status["env_location"]["offset"] == 0x4000
    assert status["environment"] == INITIAL_ENV
    assert status["slots"] == {"a": "/dev/vdz2", "b": "/dev/vdz3"}


def test_mark_good_after_boot(
    device: Device, capsys: pytest.CaptureFixture[str]
) -> None:
    path = payload(device.directory, {"rootfs.tar.xz": rootfs_xz()})
    assert device.run("install", path) == 0
    device.cmdline.write_text("mbl.slot=b\n")
    assert device.run("mark-good") == 0
    assert capsys.readouterr().out.splitlines()[-1] == "mbl-update: slot b marked good"
    assert device.variables()["upgrade_available"] == "0"
    assert device.variables()["active_slot"] == "b"


def test_mark_good_before_reboot_rejected(device: Device) -> None:
    path = payload(device.directory, {"rootfs.tar.xz": rootfs_xz()})
    assert device.run("install", path, "--no-reboot") == 0
    before = device.env_bytes()
    assert device.run("mark-good") == 1
    assert device.env_bytes() == before


def test_config_option_after_command(device: Device) -> None:
    code = main(
        ["status", "--config", device.config],
        cmdline_path=str(device.cmdline),
        runner=FakeRunner(device.locations),
    )
    assert code == 0


def test_missing_config(device: Device, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--config", str(device.directory / "none.json"), "status"])
    assert code == 1
    assert "cannot read device configuration" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv", [[], ["install"], ["frobnicate"], ["status", "--bogus"]]
)
def test_usage_errors_exit_2(argv: list[str]) -> None:
    assert main(argv) == 2


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "install" in capsys.readouterr().out
