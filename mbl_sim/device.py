"""The Device API that tests and scenarios use: one emulated MBL device.

A ``Device`` owns one QEMU machine booted from copy-on-write overlays of built images,
its console and its shell. It powers on, waits for U-Boot and the shell, runs commands,
reboots, powers off, cuts the power, and delivers payload files onto the running
device's storage.

Payload delivery: QEMU attaches a second raw disk (the transfer disk). ``deliver()``
writes a header and the file to it on the host while the guest runs, and the guest's
``/usr/lib/mbl-sim/receive`` copies it onto the device's own storage (``/scratch`` by
default), as a field device receives a download.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
import zlib
from pathlib import Path
from types import TracebackType
from typing import Any

from mbl_sim.console import UBOOT_BANNER, CommandResult, Console, Shell
from mbl_sim.errors import ConfigError, TargetError, UpdateFailedError
from mbl_sim.images.recipe import DeviceImages
from mbl_sim.log import step
from mbl_sim.machine import Machine, create_overlay

log = logging.getLogger(__name__)

UBOOT_AUTOBOOT = r"Hit any key to stop autoboot"
UBOOT_PROMPT = r"=> "
SYSTEM_READY = r"mbl: system ready, slot (?P<slot>[a-z]+), version (?P<version>\S+)"

TRANSFER_MAGIC = b"MBLSIMXF"
TRANSFER_HEADER = struct.Struct("<8sIQI")  # magic, format 2, length, CRC-32
TRANSFER_DATA_OFFSET = 4096
TRANSFER_DISK_SIZE = 1 << 30
RECEIVE_COMMAND = "/usr/lib/mbl-sim/receive"

BOOT_TIMEOUT = 90.0


class Device:
    """One emulated device. Use as a context manager, or call ``close()``."""

    def __init__(
        self, images: DeviceImages, workdir: Path, *, name: str = "device"
    ) -> None:
        """Prepare the device's overlays in ``workdir``; nothing runs yet.

        ``workdir`` keeps the overlays, the transfer disk, the console transcript
        (``console.log``) and QEMU's stderr, so a failed test can be examined.
        """
        self.images = images
        self.board = images.board
        self.name = name
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.disk = workdir / "emmc.qcow2"
        self.transfer_disk = workdir / "transfer.img"
        if not self.disk.exists():
            create_overlay(images.disk, self.disk)
        with self.transfer_disk.open("wb") as stream:
            stream.truncate(TRANSFER_DISK_SIZE)
        self.machine: Machine | None = None
        self.shell: Shell | None = None
        self.booted_slot: str | None = None
        self.booted_version: str | None = None
        self._log = log.getChild(name)

    # -- power ----------------------------------------------------------------------

    @property
    def console(self) -> Console:
        return self._running().console

    def _running(self) -> Machine:
        if self.machine is None:
            raise ConfigError(
                f"device {self.name!r} is powered off; call power_on() first"
            )
        return self.machine

    def power_on(self, *, wait: str = "shell", timeout: float = BOOT_TIMEOUT) -> None:
        """Start QEMU and, with ``wait`` "shell" (default), boot to the shell; with
        "uboot", stop at the U-Boot prompt; with "none", return at once.

        Raises:
            ConfigError: the device is already on, or ``wait`` is unknown.
            QemuLaunchError: QEMU did not start.
            ConsoleTimeoutError, ConsoleAbortError: the boot did not reach its goal.
        """
        if wait not in ("shell", "uboot", "none"):
            raise ConfigError(f"wait must be 'shell', 'uboot' or 'none', got {wait!r}")
        if self.machine is not None:
            raise ConfigError(f"device {self.name!r} is already powered on")
        machine = Machine(
            self.board,
            [self.disk, self.transfer_disk],
            name=self.name,
            workdir=self.workdir,
        )
        with step(self._log, "power on"):
            machine.start()
        self.machine = machine
        self.shell = None
        if wait == "uboot":
            self.wait_for_uboot(timeout)
        elif wait == "shell":
            self.wait_for_uboot(timeout)
            self.boot(timeout)

    def wait_for_uboot(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Wait for U-Boot's autoboot countdown, stop it and wait for its prompt."""
        console = self.console
        with step(self._log, "wait for U-Boot"), console.allowing(UBOOT_BANNER):
            console.expect(UBOOT_AUTOBOOT, timeout)
            console.send(" ")
            console.expect(UBOOT_PROMPT, timeout)

    def uboot(self, command: str, timeout: float = 30.0) -> str:
        """Run one command at the U-Boot prompt and return its output."""
        console = self.console
        console.sendline(command)
        console.expect(r"\r?\n", timeout)
        match = console.expect(UBOOT_PROMPT, timeout)
        return match.before

    def boot(self, timeout: float = BOOT_TIMEOUT) -> None:
        """From the U-Boot prompt, run the distro boot and wait for the shell."""
        self.console.sendline("boot")
        self.wait_for_shell(timeout)

    def wait_for_shell(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Wait until the system reports ready and set up the shell on the console.

        Raises:
            ConsoleTimeoutError, ConsoleAbortError: the system did not come up.
        """
        console = self.console
        with step(self._log, "wait for shell"):
            match = console.expect(SYSTEM_READY, timeout)
            self.booted_slot = match.match.group("slot")
            self.booted_version = match.match.group("version")
            console.sendline("")
            self.shell = Shell(console)
            self.shell.setup(timeout=30.0)
        self._log.info(
            "booted slot %s, version %s", self.booted_slot, self.booted_version
        )

    def reboot(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Reboot with the guest's ``reboot`` and wait for the shell again."""
        self._shell().console.sendline("reboot")
        self.shell = None
        self.expect_reboot(timeout)

    def expect_reboot(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Wait for a reboot that the guest started, through U-Boot to the shell."""
        self.wait_for_uboot(timeout)
        self.boot(timeout)

    def power_off(self) -> None:
        """Stop QEMU politely (QMP quit, then signals). Writes that reached the disk
        image stay; the device can be powered on again."""
        if self.machine is None:
            return
        with step(self._log, "power off"):
            try:
                self.machine.close()
            finally:
                self.machine = None
                self.shell = None

    def power_cut(self) -> None:
        """Kill QEMU at once with SIGKILL, as a power cut. Every write that reached the
        host file survives; the guest's unwritten page cache is lost."""
        machine = self._running()
        self._log.warning("power cut (SIGKILL to QEMU pid %d)", machine.pid)
        try:
            machine.kill()
        finally:
            machine.close()
            self.machine = None
            self.shell = None

    def close(self) -> None:
        self.power_off()

    def __enter__(self) -> Device:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- commands -------------------------------------------------------------------

    def _shell(self) -> Shell:
        self._running()
        if self.shell is None:
            raise ConfigError(f"device {self.name!r} has no shell yet; boot it first")
        return self.shell

    def run(
        self, command: str, timeout: float = 60.0, *, check: bool = False
    ) -> CommandResult:
        """Run a shell command on the device and return its exit status and output.

        Raises:
            CommandFailedError: ``check`` is set and the command failed.
            ConsoleTimeoutError, ConsoleAbortError: see ``Shell.run``.
        """
        return self._shell().run(command, timeout, check=check)

    def check_output(self, command: str, timeout: float = 60.0) -> str:
        """Run ``command``, require exit status 0 and return its output."""
        return self.run(command, timeout, check=True).output

    # -- payloads -------------------------------------------------------------------

    def deliver(
        self, path: Path, destination: str | None = None, timeout: float = 120.0
    ) -> str:
        """Put the host file ``path`` onto the running device's storage and return its
        path on the device (``/scratch/NAME`` unless ``destination`` is given).

        Raises:
            ConfigError: the file is missing or larger than the transfer disk.
            CommandFailedError: the device could not store it.
        """
        if not path.is_file():
            raise ConfigError(f"payload file {path} not found")
        size = path.stat().st_size
        if size > TRANSFER_DISK_SIZE - TRANSFER_DATA_OFFSET:
            raise ConfigError(
                f"{path} is {size} bytes; the transfer disk takes at most "
                f"{TRANSFER_DISK_SIZE - TRANSFER_DATA_OFFSET}"
            )
        target = destination or f"/scratch/{path.name}"
        started = time.monotonic()
        crc = 0
        with path.open("rb") as source, self.transfer_disk.open("r+b") as disk:
            disk.seek(TRANSFER_DATA_OFFSET)
            while chunk := source.read(1 << 20):
                crc = zlib.crc32(chunk, crc)
                disk.write(chunk)
            disk.seek(0)
            disk.write(TRANSFER_HEADER.pack(TRANSFER_MAGIC, 2, size, crc))
            disk.flush()
            os.fsync(disk.fileno())
        transfer_device = self._transfer_device()
        self.run(f"{RECEIVE_COMMAND} {transfer_device} {target}", timeout, check=True)
        elapsed = time.monotonic() - started
        self._log.info(
            "delivered %s to %s: %d bytes in %.2f s (%.1f MiB/s)",
            path.name,
            target,
            size,
            elapsed,
            size / (1 << 20) / max(elapsed, 1e-6),
        )
        return target

    def _transfer_device(self) -> str:
        # The transfer disk is the second disk QEMU attaches: /dev/vdb after /dev/vda.
        disk = self.board.storage.guest_disk
        if self.board.storage.interface == "virtio":
            return disk[:-1] + chr(ord(disk[-1]) + 1)
        raise ConfigError(
            f"board {self.board.name}: payload delivery is not supported for storage "
            f"interface {self.board.storage.interface!r}"
        )

    # -- the updater ----------------------------------------------------------------

    def install(
        self, payload: Path, *, expect_reboot: bool = True, timeout: float = 600.0
    ) -> CommandResult:
        """Deliver ``payload`` and run ``mbl-update install`` on it.

        With ``expect_reboot`` (root filesystem updates) a successful install is
        followed by the updater's reboot, and this returns when the shell is back.
        The result holds the updater's exit status and output.

        Raises:
            UpdateFailedError: a reboot was expected but the updater failed.
        """
        on_device = self.deliver(payload)
        if not expect_reboot:
            return self.run(f"mbl-update install {on_device}", timeout)
        shell = self._shell()
        result = shell.run(f"mbl-update install --no-reboot {on_device}", timeout)
        if result.exit_status != 0:
            raise UpdateFailedError(
                f"mbl-update install {on_device} exited with status "
                f"{result.exit_status}:\n{result.output}"
            )
        self.reboot()
        return result

    def status(self) -> dict[str, Any]:
        """Return ``mbl-update status --json`` as a dictionary."""
        output = self.check_output("mbl-update status --json")
        try:
            value = json.loads(output)
        except json.JSONDecodeError as error:
            raise TargetError(
                f"mbl-update status --json printed invalid JSON: {output!r}"
            ) from error
        if not isinstance(value, dict):
            raise TargetError(
                f"mbl-update status --json printed {value!r}, not an object"
            )
        return value

    def version(self) -> str:
        """Return the running root filesystem's /etc/mbl-version."""
        return self.check_output("cat /etc/mbl-version").strip()

    def running_slot(self) -> str:
        """Return the slot the kernel was booted from, as the boot script passed it."""
        output = self.check_output("cat /proc/cmdline")
        for argument in output.split():
            if argument.startswith("mbl.slot="):
                return argument.removeprefix("mbl.slot=")
        raise TargetError(
            f"no mbl.slot= on the kernel command line: {output.strip()!r}"
        )

    def env_digest(self) -> str:
        """Return the SHA-256 of both raw environment copies, read on the device."""
        env = self.board.storage.env
        disk = self.board.storage.guest_disk
        parts = []
        for offset in env.offsets:
            parts.append(
                f"dd if={disk} bs=512 skip={offset // 512} "
                f"count={env.size // 512} 2>/dev/null"
            )
        return self.check_output(f"({'; '.join(parts)}) | sha256sum").split()[0]
