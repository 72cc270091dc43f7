"""Machine pieces that need no guest: command line, overlays, child setup."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from mbl_sim.board import load_board
from mbl_sim.errors import ConfigError
from mbl_sim.machine import (
    _prepare_child,
    create_overlay,
    disk_format,
    qemu_command,
)

BOARD = load_board("qemu-virt-a53")

needs_qemu_img = pytest.mark.skipif(
    shutil.which("qemu-img") is None,
    reason="qemu-img is missing (Debian package qemu-utils)",
)


def option_values(command: list[str], option: str) -> list[str]:
    return [command[i + 1] for i, arg in enumerate(command) if arg == option]


def test_command_from_board_data(tmp_path: Path) -> None:
    command = qemu_command(BOARD, [], tmp_path / "qmp.sock")

    assert command[0] == "qemu-system-aarch64"
    assert option_values(command, "-M") == ["virt"]
    assert option_values(command, "-cpu") == ["cortex-a53"]
    assert option_values(command, "-m") == ["512M"]
    assert option_values(command, "-smp") == ["1"]
    assert option_values(command, "-bios") == ["/usr/lib/u-boot/qemu_arm64/u-boot.bin"]
    assert option_values(command, "-qmp") == [
        f"unix:{tmp_path}/qmp.sock,server=on,wait=off"
    ]
    assert option_values(command, "-nic") == ["none"]
    assert option_values(command, "-monitor") == ["none"]
    assert option_values(command, "-display") == ["none"]
    assert option_values(command, "-chardev") == ["stdio,id=console,signal=off"]
    assert option_values(command, "-serial") == ["chardev:console"]
    assert "-drive" not in command


def test_command_attaches_disks_in_order(tmp_path: Path) -> None:
    raw = tmp_path / "a.img"
    raw.write_bytes(b"\0" * 512)
    qcow2 = tmp_path / "b.qcow2"
    qcow2.write_bytes(b"QFI\xfb" + b"\0" * 508)

    command = qemu_command(BOARD, [raw, qcow2], tmp_path / "qmp.sock")

    assert option_values(command, "-drive") == [
        f"if=none,id=disk0,file={raw},format=raw",
        f"if=none,id=disk1,file={qcow2},format=qcow2",
    ]
    assert option_values(command, "-device") == [
        "virtio-blk-pci,drive=disk0",
        "virtio-blk-pci,drive=disk1",
    ]


def test_command_extra_args_last(tmp_path: Path) -> None:
    command = qemu_command(BOARD, [], tmp_path / "qmp.sock", ["-S", "-d", "int"])

    assert command[-3:] == ["-S", "-d", "int"]


def test_disk_format_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read disk image"):
        disk_format(tmp_path / "absent.img")


@needs_qemu_img
@pytest.mark.parametrize("base_format", ["raw", "qcow2"])
def test_create_overlay_over_base(tmp_path: Path, base_format: str) -> None:
    base = tmp_path / f"base.{base_format}"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", base_format, str(base), "1M"], check=True
    )
    overlay = tmp_path / "overlay.qcow2"

    create_overlay(base, overlay)

    info = subprocess.run(
        ["qemu-img", "info", "--output=json", str(overlay)],
        check=True,
        capture_output=True,
        text=True,
    )
    details = json.loads(info.stdout)
    assert details["format"] == "qcow2"
    assert details["backing-filename"] == str(base)
    assert details["backing-filename-format"] == base_format
    assert disk_format(overlay) == "qcow2"


# Prints the child's parent-death signal, its stdin's ONLCR flag, and writes to
# stderr, which _prepare_child redirects to a file.
PROBE = """
import ctypes, sys, termios
signal = ctypes.c_int()
ctypes.CDLL(None).prctl(2, ctypes.byref(signal))  # PR_GET_PDEATHSIG
onlcr = bool(termios.tcgetattr(0)[1] & termios.ONLCR)
print(f"pdeathsig={signal.value} onlcr={onlcr}", flush=True)
print("to stderr", file=sys.stderr, flush=True)
"""


def test_prepare_child_sets_deathsig_stderr_and_tty(tmp_path: Path) -> None:
    stderr_path = tmp_path / "stderr.log"
    setup = functools.partial(_prepare_child, str(stderr_path), os.getpid())

    child = pexpect.spawn(
        sys.executable, ["-c", PROBE], encoding="utf-8", preexec_fn=setup
    )
    child.expect(pexpect.EOF, timeout=10)
    child.close()

    assert "pdeathsig=9 onlcr=False" in child.before
    assert "to stderr" not in child.before
    assert stderr_path.read_text() == "to stderr\n"
