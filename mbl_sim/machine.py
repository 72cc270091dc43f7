"""One QEMU process for one board: launch, QMP control and a guaranteed end.

``Machine`` starts QEMU from a board and a list of disk images in three steps:
prepare (directories and paths), launch (command line, process, console) and
connect (QMP). Its serial port is the pexpect terminal, so the ``Console`` reads
what the guest prints; QEMU's own messages go to a separate stderr file.

QEMU always ends with its machine:

- ``close()`` (also the context manager's exit) sends QMP ``quit``, then
  SIGTERM, then SIGKILL, and waits a few seconds after each;
- a ``weakref.finalize`` backstop kills QEMU when the Machine is garbage
  collected or the interpreter exits without ``close()``;
- the kernel sends QEMU SIGKILL when the Python thread that started it dies, even
  by SIGKILL (``prctl(PR_SET_PDEATHSIG)``).

NOTE: PR_SET_PDEATHSIG fires when the *thread* that forked QEMU exits, so start
machines from a thread that lives as long as they do (the main thread in tests).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import json
import logging
import os
import shlex
import shutil
import signal
import tempfile
import termios
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, TypeVar

import pexpect
from qemu.qmp import EventListener, QMPClient, QMPError

from mbl_sim.board import Board, FirmwareConfig, QemuConfig, check_host
from mbl_sim.commands import run as run_command
from mbl_sim.console import DEFAULT_ABORTS, AbortPattern, Console
from mbl_sim.errors import ConfigError, QemuLaunchError, QmpError
from mbl_sim.log import step

__all__ = [
    "BlockdevDisk",
    "BootFiles",
    "Machine",
    "create_overlay",
    "disk_format",
    "qemu_command",
]

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

QMP_TIMEOUT = 10.0
"""Seconds a QMP command may take. QEMU 7.2 completes stop and cont in about 1 ms."""

_QUIT_WAIT = 3.0
_TERMINATE_WAIT = 3.0
_KILL_WAIT = 5.0
_POLL_SECONDS = 0.02

_QCOW2_MAGIC = b"QFI\xfb"

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# Loaded here, in the parent, so the forked child only calls it.
_libc = ctypes.CDLL(None, use_errno=True)


# --------------------------------------------------------------------------
# Disks


def disk_format(path: Path) -> str:
    """Return ``qcow2`` or ``raw``: the format of the disk image at ``path``.

    Raises:
        ConfigError: the file cannot be read.
    """
    try:
        with path.open("rb") as image:
            magic = image.read(len(_QCOW2_MAGIC))
    except OSError as error:
        raise ConfigError(f"cannot read disk image {path}: {error}") from error
    return "qcow2" if magic == _QCOW2_MAGIC else "raw"


def create_overlay(base: Path, overlay: Path) -> None:
    """Create ``overlay``, a qcow2 image that writes to itself and reads ``base``.

    ``base`` (raw or qcow2) is never written through the overlay. The overlay
    stores ``base``'s absolute path, so ``base`` must stay where it is.

    Raises:
        ConfigError: ``base`` cannot be read.
        BuildError: qemu-img failed; the error carries its stderr.
    """
    base = base.resolve()
    backing_format = disk_format(base)
    run_command(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            str(base),
            "-F",
            backing_format,
            str(overlay),
        ]
    )


# --------------------------------------------------------------------------
# The QEMU command line


def _machine_args(qemu: QemuConfig) -> list[str]:
    memory_mib = qemu.memory >> 20
    args = ["-M", qemu.machine]
    # Machines modelled on one SoC fix their CPU and CPU count (raspi3b rejects
    # -smp 1), so the board file may leave either out.
    if qemu.cpu is not None:
        args += ["-cpu", qemu.cpu]
    args += ["-m", f"{memory_mib}M"]
    if qemu.smp is not None:
        args += ["-smp", str(qemu.smp)]
    return args


@dataclass(frozen=True)
class BootFiles:
    """Files that QEMU loads into the machine besides its disks.

    Attributes:
        firmware: the boot loader image; None means the board file's host path.
        kernel: a kernel for direct boot (``-kernel``), on boards without U-Boot.
        initrd: its initramfs (``-initrd``).
        dtb: its device tree (``-dtb``).
        append: its command line (``-append``).
    """

    firmware: Path | None = None
    kernel: Path | None = None
    initrd: Path | None = None
    dtb: Path | None = None
    append: str = ""


# Firmware load key → the QEMU option that loads the image.
_FIRMWARE_OPTIONS = {"bios": "-bios", "kernel": "-kernel"}


def _firmware_args(firmware: FirmwareConfig, boot: BootFiles) -> list[str]:
    if not firmware.is_u_boot:
        return _direct_boot_args(boot)
    path = boot.firmware or firmware.path
    if path is None:
        raise ConfigError(f"no firmware image for {firmware.package}")
    return [_FIRMWARE_OPTIONS[firmware.load], str(path)]


def _direct_boot_args(boot: BootFiles) -> list[str]:
    """Return -kernel, -initrd, -dtb and -append for a board without a boot loader."""
    if boot.kernel is None:
        raise ConfigError("a board without firmware needs a kernel to boot directly")
    args = ["-kernel", str(boot.kernel)]
    if boot.initrd is not None:
        args += ["-initrd", str(boot.initrd)]
    if boot.dtb is not None:
        args += ["-dtb", str(boot.dtb)]
    if boot.append:
        args += ["-append", boot.append]
    return args


def _console_args(serial_port: int = 0) -> list[str]:
    # The serial port on stdio, with signal=off so that a Ctrl-C sent to the
    # console reaches the guest instead of ending QEMU. Ports before the
    # console's get null (raspi3b's first UART belongs to Bluetooth in Linux).
    args = ["-serial", "null"] * serial_port
    return [
        "-chardev",
        "stdio,id=console,signal=off",
        *args,
        "-serial",
        "chardev:console",
    ]


def _isolation_args() -> list[str]:
    # No window, no human monitor, and no network: the default NIC also needs
    # the iPXE ROM, which a --no-install-recommends host lacks.
    return ["-display", "none", "-monitor", "none", "-nic", "none"]


def _qmp_args(socket_path: Path) -> list[str]:
    return ["-qmp", f"unix:{socket_path},server=on,wait=off"]


# Storage interface → QEMU device model of the disk controller.
_DISK_DEVICES = {"virtio": "virtio-blk-pci"}


@dataclass(frozen=True)
class BlockdevDisk:
    """A disk attached as a graph of QEMU ``-blockdev`` nodes instead of one file.

    Attributes:
        nodes: the ``-blockdev`` option strings, children before their parents.
        top: the node name that the disk controller attaches.
        device_properties: extra ``-device`` properties, such as ``write-zeroes=off``.
        drive: the same graph as the options of one ``-drive``, with the children's
            options under dotted prefixes (``file.driver=qcow2``), for a card slot
            that only ``-drive if=sd`` fills; None if the graph has no such form.
    """

    nodes: tuple[str, ...]
    top: str
    device_properties: tuple[str, ...] = ()
    drive: str | None = None


def _disk_args(interface: str, disks: Sequence[Path | BlockdevDisk]) -> list[str]:
    device = _DISK_DEVICES[interface]
    args: list[str] = []
    for index, disk in enumerate(disks):
        if isinstance(disk, BlockdevDisk):
            args += _blockdev_args(device, disk)
            continue
        drive = f"disk{index}"
        args += [
            "-drive",
            f"if=none,id={drive},file={disk},format={disk_format(disk)}",
            "-device",
            f"{device},drive={drive}",
        ]
    return args


def _blockdev_args(device: str, disk: BlockdevDisk) -> list[str]:
    args: list[str] = []
    for node in disk.nodes:
        args += ["-blockdev", node]
    properties = "".join(f",{item}" for item in disk.device_properties)
    return [*args, "-device", f"{device},drive={disk.top}{properties}"]


def _sd_drive_args(index: int, disk: Path | BlockdevDisk) -> list[str]:
    """Return the options of an SD card in the SoC's card slot ``index``."""
    if isinstance(disk, BlockdevDisk):
        if disk.drive is None:
            raise ConfigError(
                f"the disk graph with top node {disk.top} has no -drive form, and an"
                " SD card slot (-drive if=sd) takes only -drive options"
            )
        # The SD card model has no properties such as write-zeroes: it writes one
        # block per request and never discards or flushes.
        return ["-drive", f"if=sd,index={index},{disk.drive}"]
    return ["-drive", f"if=sd,index={index},file={disk},format={disk_format(disk)}"]


def _sdhci_pci_args(disk: Path | BlockdevDisk) -> list[str]:
    """Return the options of an SD card on a PCI SDHCI controller (virt)."""
    if isinstance(disk, BlockdevDisk):
        return [
            *[arg for node in disk.nodes for arg in ("-blockdev", node)],
            "-device",
            "sdhci-pci",
            "-device",
            f"sd-card,drive={disk.top}",
        ]
    return [
        "-drive",
        f"if=none,id=sdcard,file={disk},format={disk_format(disk)}",
        "-device",
        "sdhci-pci",
        "-device",
        "sd-card,drive=sdcard",
    ]


def _storage_args(board: Board, disks: Sequence[Path | BlockdevDisk]) -> list[str]:
    """Return the options of the board's disk (first) and its transfer disk."""
    storage = board.storage
    if storage.interface == "virtio" and storage.transfer.interface == "virtio":
        return _disk_args("virtio", disks)
    args: list[str] = []
    if disks:
        if storage.interface == "sd":
            args += _sd_drive_args(storage.sd_index, disks[0])
        elif storage.interface == "sdhci-pci":
            args += _sdhci_pci_args(disks[0])
        else:
            args += _disk_args(storage.interface, disks[:1])
    for disk in disks[1:2]:
        if storage.transfer.interface == "partition":
            # Payloads go into a partition of the first disk instead.
            continue
        if storage.transfer.interface == "sd":
            args += _sd_drive_args(storage.transfer.index, disk)
        else:
            args += _disk_args("virtio", [disk])
    if len(disks) > 2:
        raise ConfigError(
            f"board {board.name} takes two disks (storage and transfer), "
            f"got {len(disks)}"
        )
    return args


def qemu_command(
    board: Board,
    disks: Sequence[Path | BlockdevDisk],
    qmp_socket: Path,
    extra_args: Sequence[str] = (),
    *,
    boot: BootFiles | None = None,
) -> list[str]:
    """Return the QEMU command line for ``board`` with ``disks`` attached.

    ``boot`` gives the firmware image when it is not the board file's host path,
    and the kernel, initramfs, device tree and command line of boards without
    U-Boot. The board's ``qemu.extra_args`` and then ``extra_args`` come last.

    Raises:
        ConfigError: a disk image cannot be read, or a board without U-Boot has no
            kernel in ``boot``.
    """
    return [
        board.qemu.binary,
        *_machine_args(board.qemu),
        *_firmware_args(board.firmware, boot or BootFiles()),
        *_console_args(board.console.serial_port),
        *_isolation_args(),
        *_qmp_args(qmp_socket),
        *_storage_args(board, disks),
        *board.qemu.extra_args,
        *extra_args,
    ]


# --------------------------------------------------------------------------
# The QEMU process


def _prepare_child(stderr_path: str, parent_pid: int) -> None:
    """Run in the forked child before exec: die with the parent, own stderr.

    Also turn off the pty's newline translation (ONLCR), which would turn the
    guest's CR LF into CR CR LF. QEMU keeps that flag when it puts its terminal
    into raw mode.
    """
    if _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl(PR_SET_PDEATHSIG): {os.strerror(error)}")
    # The parent may have died before prctl() took effect.
    if os.getppid() != parent_pid:
        os._exit(1)
    stderr = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(stderr, 2)
    os.close(stderr)
    attributes = termios.tcgetattr(0)
    attributes[1] &= ~termios.ONLCR  # oflag
    termios.tcsetattr(0, termios.TCSANOW, attributes)


def _kill_child(
    child: Any, console: Console, logger: logging.Logger, directories: list[Path]
) -> None:
    """Kill QEMU if it is still running, close its console and remove the
    temporary directories: the finalizer of a Machine that was not closed."""
    if child.isalive():
        logger.warning("killing QEMU (pid %d): its Machine was not closed", child.pid)
        child.kill(signal.SIGKILL)
        child.wait()
    child.close()
    console.close()
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)


def _exit_code(child: Any) -> int | None:
    """Return the exit status, minus the signal number if a signal ended it."""
    if child.signalstatus is not None:
        return -int(child.signalstatus)
    return None if child.exitstatus is None else int(child.exitstatus)


# --------------------------------------------------------------------------
# QMP


class _QmpConnection:
    """A QMPClient on a private event loop in a daemon thread, called synchronously.

    The loop runs in its own thread so that callers may block on commands from
    any code, including code that runs inside another event loop, and so that
    events are read (and logged) while the caller waits on the console.
    """

    def __init__(self, name: str, logger: logging.Logger) -> None:
        self._log = logger
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"qmp-{name}", daemon=True
        )
        self._thread.start()
        self._client = self._call(self._create_client(name), QMP_TIMEOUT)
        self._event_task: asyncio.Task[None] | None = None

    @staticmethod
    async def _create_client(name: str) -> QMPClient:
        return QMPClient(name)

    def _call(self, coroutine: Coroutine[Any, Any, _T], timeout: float) -> _T:
        # Since Python 3.11, asyncio's and concurrent.futures' TimeoutError are
        # the built-in TimeoutError.
        future = asyncio.run_coroutine_threadsafe(
            asyncio.wait_for(coroutine, timeout), self._loop
        )
        return future.result()

    def connect(self, socket_path: Path) -> None:
        """Connect and negotiate capabilities.

        Raises:
            QMPError, OSError: the connection failed.
        """
        self._call(self._client.connect(str(socket_path)), QMP_TIMEOUT)
        self._event_task = asyncio.run_coroutine_threadsafe(
            self._start_event_log(), self._loop
        ).result()

    async def _start_event_log(self) -> asyncio.Task[None]:
        return asyncio.create_task(self._log_events())

    async def _log_events(self) -> None:
        listener = EventListener()
        with self._client.listen(listener):
            async for event in listener:
                data = json.dumps(event.get("data", {}))
                self._log.debug("← event %s %s", event["event"], data)

    def execute(self, command: str, arguments: dict[str, object]) -> object:
        """Run a QMP command and return its result.

        Raises:
            QmpError: QEMU returned an error, sent no response within QMP_TIMEOUT
                seconds, or the connection is closed.
        """
        self._log.debug("→ %s %s", command, json.dumps(arguments, default=repr))
        try:
            result = self._call(self._client.execute(command, arguments), QMP_TIMEOUT)
        except (QMPError, OSError, EOFError) as error:
            self._log.debug("← %s failed: %s", command, error)
            raise QmpError(command, arguments, str(error) or repr(error)) from error
        except TimeoutError as error:
            message = f"no response within {QMP_TIMEOUT:g} s"
            raise QmpError(command, arguments, message) from error
        self._log.debug("← %s", json.dumps(result))
        return result

    def close(self) -> None:
        """Disconnect and stop the event loop's thread."""
        try:
            self._call(self._stop_session(), QMP_TIMEOUT)
        except (QMPError, OSError, EOFError, TimeoutError) as error:
            # disconnect() re-raises what ended the session; when QEMU has
            # exited that is an EOFError, which is expected here.
            self._log.debug("QMP disconnect: %r", error)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _stop_session(self) -> None:
        if self._event_task is not None:
            self._event_task.cancel()
        await self._client.disconnect()


# --------------------------------------------------------------------------
# Machine


class Machine:
    """One QEMU process running ``board`` with ``disks`` attached in order.

    Use as a context manager, or call ``start()`` and then ``close()`` in a
    ``finally`` block.
    """

    def __init__(
        self,
        board: Board,
        disks: Sequence[Path | BlockdevDisk] = (),
        *,
        name: str = "guest",
        workdir: Path | None = None,
        extra_args: Sequence[str] = (),
        aborts: Sequence[AbortPattern] = DEFAULT_ABORTS,
        launch_timeout: float = 10.0,
        boot: BootFiles | None = None,
    ) -> None:
        """Describe the machine. Nothing starts before ``start()``.

        ``boot`` gives the files QEMU loads besides the disks (see ``BootFiles``).

        ``workdir`` receives ``console.log``, the serial transcript, which each
        start appends to, and ``qemu-stderr.log``, which each start overwrites.
        The directory is kept. Without ``workdir`` both files go to a temporary
        directory that ``close()`` removes. ``extra_args`` are appended to the
        QEMU command line. ``launch_timeout`` bounds the wait for QMP.
        """
        self.board = board
        self.disks = [
            disk if isinstance(disk, BlockdevDisk) else Path(disk) for disk in disks
        ]
        self.name = name
        self.extra_args = list(extra_args)
        self.launch_timeout = launch_timeout
        self.boot = boot
        self.command: list[str] = []
        self._aborts = tuple(aborts)
        self._given_workdir = workdir
        self._workdir: Path | None = None
        self._runtime_dir: Path | None = None
        self._child: Any = None
        self._console: Console | None = None
        self._qmp: _QmpConnection | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._exit_requested = False
        self._log = _log.getChild(name)

    # ---- paths and state

    @property
    def workdir(self) -> Path:
        """Directory of the transcript and stderr file."""
        return self._require(self._workdir)

    @property
    def transcript_path(self) -> Path:
        """The serial console transcript."""
        return self.workdir / "console.log"

    @property
    def stderr_path(self) -> Path:
        """What QEMU wrote to its standard error."""
        return self.workdir / "qemu-stderr.log"

    @property
    def console(self) -> Console:
        """The guest's serial console."""
        return self._require(self._console)

    @property
    def pid(self) -> int:
        """Process id of QEMU."""
        return int(self._require(self._child).pid)

    def _require(self, value: _T | None) -> _T:
        if value is None:
            raise ConfigError(f"machine {self.name!r} is not started")
        return value

    # ---- start

    def start(self) -> Console:
        """Start QEMU and return the console; the guest starts running at once.

        Raises:
            ConfigError: a host program, firmware file or disk image is missing.
            QemuLaunchError: QEMU exited or did not open its QMP socket in time.
        """
        if self._child is not None:
            raise ConfigError(f"machine {self.name!r} is already started")
        check_host(self.board)
        try:
            with step(self._log, "prepare"):
                self._prepare()
            with step(self._log, "launch"):
                self._launch()
            with step(self._log, "connect QMP"):
                self._connect()
        except BaseException:
            self.close()
            raise
        return self.console

    def _prepare(self) -> None:
        if self._given_workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"mbl-sim-{self.name}-"))
        else:
            self._workdir = self._given_workdir
            self._workdir.mkdir(parents=True, exist_ok=True)
        # Unix socket paths are limited to 107 bytes, so the socket gets its own
        # short directory rather than one under a deep test directory.
        self._runtime_dir = Path(tempfile.mkdtemp(prefix="mbl-sim-qmp-"))
        self.command = qemu_command(
            self.board,
            self.disks,
            self._runtime_dir / "qmp.sock",
            self.extra_args,
            boot=self.boot,
        )

    def _launch(self) -> None:
        self._log.debug("QEMU command: %s", shlex.join(self.command))
        prepare_child = functools.partial(
            _prepare_child, str(self.stderr_path), os.getpid()
        )
        self._child = pexpect.spawn(
            self.command[0],
            self.command[1:],
            encoding="utf-8",
            codec_errors="replace",
            maxread=65536,
            preexec_fn=prepare_child,
        )
        # close() runs after QEMU has exited, so pexpect need not wait in it.
        self._child.ptyproc.delayafterclose = 0
        self._console = Console(
            self._child,
            name=self.name,
            transcript=self.transcript_path,
            aborts=self._aborts,
        )
        self._finalizer = weakref.finalize(
            self,
            _kill_child,
            self._child,
            self._console,
            self._log,
            self._temporary_dirs(),
        )
        self._log.debug("QEMU pid %d", self._child.pid)

    def _connect(self) -> None:
        socket_path = self._require(self._runtime_dir) / "qmp.sock"
        deadline = time.monotonic() + self.launch_timeout
        self._qmp = _QmpConnection(self.name, self._log)
        while True:
            if not self._child.isalive():
                self._raise_launch_error("QEMU exited during startup")
            if socket_path.exists() and self._try_connect(socket_path):
                return
            if time.monotonic() > deadline:
                self._raise_launch_error(
                    f"no QMP socket after {self.launch_timeout:g} s"
                )
            time.sleep(_POLL_SECONDS)

    def _try_connect(self, socket_path: Path) -> bool:
        assert self._qmp is not None
        try:
            self._qmp.connect(socket_path)
        except (QMPError, OSError) as error:
            self._log.debug("QMP connect: %s", error)
            return False
        return True

    def _raise_launch_error(self, reason: str) -> NoReturn:
        # The error reports the exit, so close() need not log it again.
        self._exit_requested = True
        raise QemuLaunchError(
            reason,
            exit_code=_exit_code(self._child),
            command=self.command,
            stderr=self._read_stderr(),
        )

    def _read_stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    # ---- QMP

    def qmp(self, command: str, **arguments: object) -> object:
        """Run a QMP command and return its result (``return`` member).

        Raises:
            QmpError: the command failed or QMP is not connected.
        """
        if self._qmp is None:
            raise QmpError(command, arguments, "QMP is not connected")
        return self._qmp.execute(command, arguments)

    def status(self) -> str:
        """Return the VM's run state from ``query-status``: running, paused, …

        Raises:
            QmpError: the command failed or returned no status.
        """
        result = self.qmp("query-status")
        if not isinstance(result, dict) or "status" not in result:
            raise QmpError("query-status", {}, f"unexpected result {result!r}")
        return str(result["status"])

    def stop(self) -> None:
        """Pause the guest's CPUs."""
        self.qmp("stop")

    def cont(self) -> None:
        """Resume the guest's CPUs."""
        self.qmp("cont")

    def system_reset(self) -> None:
        """Reset the board as its reset button would; the firmware starts again."""
        self.qmp("system_reset")

    # ---- the process

    def is_running(self) -> bool:
        """Return whether the QEMU process has not exited (the guest may be paused)."""
        return self._child is not None and bool(self._child.isalive())

    def quit(self, timeout: float = _QUIT_WAIT) -> None:
        """Ask QEMU to exit over QMP and wait for it.

        Raises:
            QmpError: QEMU did not exit within ``timeout`` seconds.
        """
        self._exit_requested = True
        try:
            self.qmp("quit")
        except QmpError as error:
            # QEMU may close the socket before its response arrives.
            self._log.debug("quit: %s", error)
        if not self._wait_exit(timeout):
            raise QmpError("quit", {}, f"QEMU still running after {timeout:g} s")

    def kill(self) -> None:
        """Kill QEMU with SIGKILL at once, as a power cut ends a real board.

        Writes that reached QEMU's disk files stay; nothing else is flushed.
        """
        child = self._require(self._child)
        self._exit_requested = True
        if child.isalive():
            self._log.debug("SIGKILL to QEMU pid %d", child.pid)
            child.kill(signal.SIGKILL)
        child.wait()

    def _wait_exit(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for QEMU to exit, reading its console.

        Reading keeps QEMU from blocking on a full pty while it shuts down.
        """
        deadline = time.monotonic() + timeout
        while self._child.isalive():
            if time.monotonic() > deadline:
                return False
            try:
                self._child.read_nonblocking(65536, timeout=_POLL_SECONDS)
            except pexpect.TIMEOUT:
                pass
            except pexpect.EOF:
                time.sleep(_POLL_SECONDS)
        return True

    # ---- stop

    def close(self) -> None:
        """End QEMU (quit, then SIGTERM, then SIGKILL) and release everything.

        Safe to call more than once and on a machine that never started.
        """
        try:
            with step(self._log, "shut down"):
                self._shut_down()
        finally:
            self._release()

    def _shut_down(self) -> None:
        if self._child is None:
            return
        if not self._child.isalive():
            self._report_exit()
            return
        self._exit_requested = True
        for name, attempt, wait in self._shutdown_attempts():
            self._log.debug("shut down: %s", name)
            attempt()
            if self._wait_exit(wait):
                return
        self._log.warning("QEMU pid %d did not exit after SIGKILL", self._child.pid)

    def _shutdown_attempts(self) -> list[tuple[str, Callable[[], None], float]]:
        return [
            ("QMP quit", self._quit_quietly, _QUIT_WAIT),
            ("SIGTERM", self._terminate, _TERMINATE_WAIT),
            ("SIGKILL", self._sigkill, _KILL_WAIT),
        ]

    def _quit_quietly(self) -> None:
        if self._qmp is None:
            return
        try:
            self.qmp("quit")
        except QmpError as error:
            self._log.debug("quit: %s", error)

    def _terminate(self) -> None:
        self._child.kill(signal.SIGTERM)

    def _sigkill(self) -> None:
        self._child.kill(signal.SIGKILL)

    def _report_exit(self) -> None:
        """Log QEMU's exit status when it exited without a request to."""
        if self._exit_requested:
            return
        code = _exit_code(self._child)
        if code == 0:
            self._log.debug("QEMU exited by itself with status 0")
            return
        self._log.warning(
            "QEMU pid %d exited by itself with status %s; stderr:\n%s",
            self._child.pid,
            code,
            self._read_stderr()[-2000:],
        )

    def _temporary_dirs(self) -> list[Path]:
        """Return the directories that the machine created and removes."""
        directories = [self._require(self._runtime_dir)]
        if self._given_workdir is None:
            directories.append(self.workdir)
        return directories

    def _release(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if self._console is not None:
            self._console.close()
        if self._child is not None:
            self._child.close()
        if self._finalizer is not None:
            self._finalizer.detach()
        if self._runtime_dir is not None:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)
            self._runtime_dir = None
        if self._given_workdir is None and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> Machine:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
