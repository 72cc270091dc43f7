"""Machine against real QEMU: U-Boot without a disk, QMP, launch errors, cleanup."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mbl_sim.board import load_board
from mbl_sim.console import UBOOT_BANNER, UBOOT_PROMPT, stop_autoboot
from mbl_sim.errors import ConsoleAbortError, QemuLaunchError
from mbl_sim.machine import Machine, create_overlay

REPO = Path(__file__).parents[2]
BOARD = load_board("qemu-virt-a53")
# The mbl_sim pytest plugin skips `qemu` tests when the host lacks QEMU, the
# firmware or qemu-img, with the Debian packages to install.
pytestmark = pytest.mark.qemu

TIMEOUT = 30.0


def process_gone(pid: int) -> bool:
    """Return whether ``pid`` has exited; a zombie counts as exited."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    # The state follows the command name, which is in parentheses.
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not process_gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_machine_reaches_uboot_prompt(tmp_path: Path) -> None:
    with Machine(BOARD, name="uboot", workdir=tmp_path) as machine:
        console = machine.console
        stop_autoboot(console, TIMEOUT)
        console.sendline("version")
        with console.allowing(UBOOT_BANNER):
            version = console.expect(UBOOT_PROMPT, TIMEOUT)

        assert "U-Boot 2023.01" in version.before
        assert machine.is_running()
        pid = machine.pid

    assert process_gone(pid)
    transcript = (tmp_path / "console.log").read_text()
    assert "Hit any key to stop autoboot" in transcript
    assert "<<sent 'version\\n'>>" in transcript


def test_machine_qmp_stop_and_cont() -> None:
    with Machine(BOARD, name="qmp") as machine:
        assert machine.status() == "running"

        machine.stop()
        assert machine.status() == "paused"

        machine.cont()
        assert machine.status() == "running"
        pid = machine.pid

    assert process_gone(pid)


def test_machine_system_reset_restarts_uboot() -> None:
    with Machine(BOARD, name="reset") as machine:
        stop_autoboot(machine.console, TIMEOUT)

        machine.system_reset()

        stop_autoboot(machine.console, TIMEOUT)


def test_machine_reset_banner_aborts_wait() -> None:
    with Machine(BOARD, name="banner") as machine:
        stop_autoboot(machine.console, TIMEOUT)
        machine.console.sendline("reset")

        with pytest.raises(ConsoleAbortError) as caught:
            machine.console.expect(r"never printed", TIMEOUT)

    assert caught.value.reason == "unexpected U-Boot banner"
    assert "U-Boot 2023.01" in caught.value.matched


def test_machine_bad_argument_raises_launch_error(tmp_path: Path) -> None:
    machine = Machine(
        BOARD, name="bad", workdir=tmp_path, extra_args=["-no-such-option"]
    )

    with pytest.raises(QemuLaunchError) as caught:
        machine.start()

    error = caught.value
    assert error.exit_code == 1
    assert "-no-such-option" in error.command
    assert "-no-such-option: invalid option" in error.stderr
    assert "invalid option" in str(error)
    assert not machine.is_running()


def test_machine_kill_ends_process_at_once() -> None:
    with Machine(BOARD, name="kill") as machine:
        stop_autoboot(machine.console, TIMEOUT)
        pid = machine.pid

        machine.kill()

        assert not machine.is_running()
        assert process_gone(pid)
        with pytest.raises(ConsoleAbortError, match="console closed"):
            machine.console.expect(UBOOT_PROMPT, TIMEOUT)


def test_machine_quit_ends_process() -> None:
    with Machine(BOARD, name="quit") as machine:
        machine.quit()

        assert not machine.is_running()
        assert process_gone(machine.pid)


def test_machine_logs_unrequested_exit(caplog: pytest.LogCaptureFixture) -> None:
    machine = Machine(BOARD, name="crash")
    machine.start()
    try:
        os.kill(machine.pid, signal.SIGKILL)
        # The thread group leader turns zombie before QEMU's other threads have
        # exited, and only then can waitpid() reap it.
        deadline = time.monotonic() + 5
        while machine.is_running() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not machine.is_running()
    finally:
        machine.close()

    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert warnings[0].name == "mbl_sim.machine.crash"
    assert "exited by itself with status -9" in warnings[0].getMessage()


def test_machine_finalizer_kills_unclosed_qemu() -> None:
    machine = Machine(BOARD, name="unclosed")
    machine.start()
    pid = machine.pid
    workdir = machine.workdir

    del machine
    gc.collect()

    assert wait_gone(pid, 5)
    assert not workdir.exists()


def test_machine_writes_go_to_overlay(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    base.write_bytes(b"\0" * (1 << 20))
    overlay = tmp_path / "overlay.qcow2"
    create_overlay(base, overlay)

    with Machine(BOARD, [overlay], name="disk") as machine:
        console = machine.console
        stop_autoboot(console, TIMEOUT)
        # Fill one sector of RAM with 0xab and write it to sector 0 of the disk.
        console.sendline(
            "mw.b 0x50000000 0xab 0x200; virtio scan; virtio write 0x50000000 0 1"
        )
        found = console.expect(r"(written: OK|Error)[^\r\n]{0,40}", TIMEOUT)
        assert found.text.startswith("written: OK")
        console.expect(UBOOT_PROMPT, TIMEOUT)

    assert base.read_bytes() == b"\0" * (1 << 20)
    converted = tmp_path / "converted.img"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(overlay), str(converted)], check=True
    )
    assert converted.read_bytes()[:512] == b"\xab" * 512


CHILD_SCRIPT = """
import sys, time
from mbl_sim.board import load_board
from mbl_sim.machine import Machine
with Machine(load_board("qemu-virt-a53"), name="child") as machine:
    print(machine.pid, flush=True)
    time.sleep(60)
"""


@pytest.fixture
def child_tmpdir() -> Iterator[Path]:
    """A short TMPDIR for a child Python whose temporary files may outlive it."""
    directory = Path(tempfile.mkdtemp(prefix="mbl-sim-test-"))
    yield directory
    shutil.rmtree(directory)


def start_child_python(tmpdir: Path) -> tuple[subprocess.Popen[str], int]:
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD_SCRIPT)],
        cwd=REPO,
        env={**os.environ, "TMPDIR": str(tmpdir)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    qemu_pid = int(child.stdout.readline())
    child.stdout.close()
    return child, qemu_pid


def test_qemu_dies_with_killed_python(child_tmpdir: Path) -> None:
    # Two things end QEMU here: PR_SET_PDEATHSIG (tested on its own in
    # test_machine_command.py) and the SIGHUP that QEMU, as the session leader
    # of its pty, gets when the pty's master side closes.
    python, qemu_pid = start_child_python(child_tmpdir)
    assert not process_gone(qemu_pid)

    os.kill(python.pid, signal.SIGKILL)
    python.wait()

    assert wait_gone(qemu_pid, 5)


def test_qemu_dies_on_ctrl_c(child_tmpdir: Path) -> None:
    python, qemu_pid = start_child_python(child_tmpdir)

    python.send_signal(signal.SIGINT)
    python.wait(timeout=15)

    assert wait_gone(qemu_pid, 5)
    assert python.returncode != 0
    assert list(child_tmpdir.iterdir()) == []
