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
import re
import struct
import time
import zlib
from pathlib import Path
from types import TracebackType
from typing import Any

from mbl_sim.console import (
    CommandResult,
    Console,
    Shell,
    stop_autoboot,
)
from mbl_sim.errors import ConfigError, QmpError, TargetError, UpdateFailedError
from mbl_sim.images.recipe import DeviceImages
from mbl_sim.log import step
from mbl_sim.machine import BlockdevDisk, BootFiles, Machine, create_overlay
from mbl_sim.storage import (
    DROP_UNFLUSHED,
    CutPolicy,
    CutTrigger,
    PowerCut,
    StorageModel,
)

log = logging.getLogger(__name__)

UBOOT_AUTOBOOT = r"Hit any key to stop autoboot"
SYSTEM_READY = (
    r"mbl: system ready, slot (?P<slot>[a-z]+), version (?P<version>\S+)\r?\n"
)

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
        self.storage: StorageModel | None = None
        self._armed: tuple[CutTrigger, CutPolicy, int] | None = None
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
        if wait == "uboot" and self.images.direct_boot:
            raise ConfigError(
                f"board {self.board.name} has no U-Boot; power on with wait='shell'"
            )
        machine = Machine(
            self.board,
            [self._emmc(), self.transfer_disk],
            name=self.name,
            workdir=self.workdir,
            boot=self.boot_files(),
        )
        with step(self._log, "power on"):
            machine.start()
        self.machine = machine
        self.shell = None
        if wait == "uboot":
            self.wait_for_uboot(timeout)
        elif wait == "shell":
            self.expect_reboot(timeout)

    def boot_files(self) -> BootFiles:
        """Return what QEMU loads besides the disks: the built U-Boot image, or on
        boards without U-Boot the kernel, initramfs, device tree and command line."""
        images = self.images
        if not images.direct_boot:
            return BootFiles(firmware=images.firmware)
        return BootFiles(
            kernel=images.kernel,
            initrd=images.initrd,
            dtb=images.dtb if self.board.device_tree.file is not None else None,
            append=images.bootargs,
        )

    def wait_for_uboot(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Wait for U-Boot's autoboot countdown, stop it and wait for its prompt."""
        with step(self._log, "wait for U-Boot"):
            stop_autoboot(self.console, timeout, self.board.firmware.prompt)

    def uboot(self, command: str, timeout: float = 30.0) -> str:
        """Run one command at the U-Boot prompt and return its output."""
        console = self.console
        console.sendline(command)
        console.expect(r"\r?\n", timeout)
        match = console.expect(re.escape(self.board.firmware.prompt), timeout)
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
        """Wait for a reboot that the guest started, through U-Boot to the shell.

        On boards without U-Boot, QEMU's reset loads the same kernel again and
        the initramfs applies the boot policy, so only the shell is awaited.
        """
        if self.images.direct_boot:
            self.wait_for_shell(timeout)
            return
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
                self._armed = None
            if self.storage is not None:
                self.storage.commit_session()

    def power_cut(self, policy: CutPolicy = DROP_UNFLUSHED) -> PowerCut | None:
        """Kill QEMU at once with SIGKILL, as a power cut; the guest's page cache is
        lost.

        Without the storage model every write that the guest completed survives
        and this returns None. With it (`attach_storage_model`), ``policy`` decides
        which writes that no flush covered survive (by default none), and the
        returned record holds what reproduces the cut.
        """
        machine = self._running()
        self._log.warning("power cut (SIGKILL to QEMU pid %d)", machine.pid)
        if self.storage is None:
            # QEMU keeps the qcow2 overlay's cluster mappings in memory until a
            # flush, and an SD card is never sent one: killed at once, QEMU would
            # lose every write since power-on. Pausing flushes them first.
            try:
                machine.stop()
            except QmpError as error:
                self._log.warning("pausing before the power cut failed: %s", error)
            self._kill()
            return None
        self._kill()
        return self.storage.cut(policy, trigger="power_cut() call")

    def _kill(self) -> None:
        machine = self._running()
        try:
            machine.kill()
        finally:
            machine.close()
            self.machine = None
            self.shell = None
            self._armed = None

    def close(self) -> None:
        self.power_off()

    # -- power cuts through the storage model -------------------------------------

    def attach_storage_model(self) -> StorageModel:
        """Attach the eMMC through the storage model from the next power-on on.

        Writes then go through QEMU's write log, and `power_cut` loses what the
        guest had not flushed. See `mbl_sim.storage.model`.

        Raises:
            ConfigError: the device is powered on.
        """
        if self.machine is not None:
            raise ConfigError(
                f"device {self.name!r} is powered on; attach the storage model while"
                " it is off"
            )
        if self.storage is None:
            self.storage = StorageModel(
                self.disk,
                self.board.storage.size,
                name=self.name,
                write_cache=self.board.storage.write_cache,
            )
        return self.storage

    def _emmc(self) -> Path | BlockdevDisk:
        if self.storage is None:
            return self.disk
        return self.storage.start_session()

    def _model(self) -> StorageModel:
        if self.storage is None:
            raise ConfigError(
                f"device {self.name!r} has no storage model; call"
                " attach_storage_model() before power_on()"
            )
        self._running()
        return self.storage

    def arm_power_cut(
        self, trigger: CutTrigger, policy: CutPolicy = DROP_UNFLUSHED
    ) -> None:
        """Arm a power cut that `wait_for_power_cut` fires. Write and flush counts
        start at the log entries completed now.

        Raises:
            ConfigError: no storage model, or the device is off.
        """
        armed_at = len(self._model().read_log())
        self._armed = (trigger, policy, armed_at)
        self._log.info(
            "power cut armed at log entry %d: %s, %s",
            armed_at,
            trigger.describe(),
            policy.describe(),
        )

    def wait_for_power_cut(self, timeout: float = 600.0) -> PowerCut:
        """Wait until the armed cut fires, cut the power and return the record.

        A write or flush trigger that matched earlier in the log fires at once at
        that log index; the guest's later writes are not part of the cut state.

        Raises:
            ConfigError: no cut is armed.
            TargetError: the trigger did not fire within ``timeout`` seconds.
        """
        model = self._model()
        if self._armed is None:
            raise ConfigError(f"device {self.name!r} has no armed power cut")
        trigger, policy, armed_at = self._armed
        console = self.console
        point = model.wait_for_trigger(
            trigger, armed_at, timeout, expect=console.expect, drain=console.drain
        )
        self._log.warning("armed power cut fired: %s", trigger.describe())
        self._kill()
        return model.cut(
            policy, trigger=trigger.describe(), point=point, armed_at=armed_at
        )

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
        if self.board.storage.transfer.interface == "partition":
            self._copy_to_transfer_partition(TRANSFER_DATA_OFFSET + size)
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

    def _copy_to_transfer_partition(self, length: int) -> None:
        """Copy the first ``length`` bytes of the transfer file into the transfer
        partition of the running device's disk.

        QEMU's monitor command ``qemu-io`` writes through the same block backend
        as the guest's disk controller, so the overlay stays consistent. Its
        ``-s`` takes the data from the file. The backend of ``-drive
        if=sd,index=N`` is named ``sdN``.
        """
        storage = self.board.storage
        partition = storage.layout[storage.transfer.partition]
        if length > partition.size:
            raise ConfigError(
                f"payload of {length} bytes with header does not fit the transfer "
                f"partition {partition.name} of {partition.size} bytes"
            )
        backend = f"sd{storage.sd_index}"
        command = (
            f'qemu-io {backend} "write -q -s {self.transfer_disk} '
            f'{partition.start} {length}"'
        )
        output = self._running().qmp(
            "human-monitor-command", **{"command-line": command}
        )
        if isinstance(output, str) and output.strip():
            raise TargetError(f"QEMU monitor: {command}: {output.strip()}")

    def _transfer_device(self) -> str:
        # The second disk QEMU attaches (/dev/vdb after /dev/vda), a card in
        # another SD slot, or a raw partition of the board's own disk.
        return self.board.storage.transfer.guest_disk

    # -- the updater ----------------------------------------------------------------

    def install(
        self,
        payload: Path,
        *,
        reboot: bool = True,
        check: bool = True,
        timeout: float = 600.0,
    ) -> CommandResult:
        """Deliver ``payload`` and run ``mbl-update install --no-reboot`` on it.

        With ``reboot`` (root filesystem updates) a successful install is followed by
        a reboot, and this returns when the shell is back. The updater's own reboot
        is left out so that the harness reads its exit status and output first.

        Raises:
            UpdateFailedError: ``check`` is set and the updater exited non-zero.
        """
        on_device = self.deliver(payload)
        command = f"mbl-update install --no-reboot {on_device}"
        result = self.run(command, timeout)
        if result.exit_status != 0:
            if check:
                raise UpdateFailedError(
                    f"{command} exited with status {result.exit_status}:\n"
                    f"{result.output}"
                )
            return result
        if reboot:
            self.reboot()
        return result

    def status(self) -> dict[str, Any]:
        """Return ``mbl-update status --json`` as a dictionary."""
        # Warnings go to stderr, which the console mixes into the output, so stderr
        # goes to a file and is logged.
        output = self.check_output("mbl-update status --json 2>/tmp/mbl-status.err")
        warnings = self.run("cat /tmp/mbl-status.err").output.strip()
        if warnings:
            self._log.info("mbl-update status: %s", warnings)
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
        """Return the slot the kernel was booted from, as the boot script passed it.

        Boards with flag files have no ``mbl.slot=``, because the initramfs picks
        the slot; there the slot is the partition mounted as ``/``.
        """
        output = self.check_output("cat /proc/cmdline")
        for argument in output.split():
            if argument.startswith("mbl.slot="):
                return argument.removeprefix("mbl.slot=")
        if self.board.boot.state == "flag-files":
            return self._mounted_slot()
        raise TargetError(
            f"no mbl.slot= on the kernel command line: {output.strip()!r}"
        )

    def _mounted_slot(self) -> str:
        # The initramfs mounts the slot by its device name, which /proc/mounts shows.
        mounts = self.check_output("cat /proc/mounts").splitlines()
        roots = [line.split()[0] for line in mounts if line.split()[1:2] == ["/"]]
        layout = self.board.storage.layout
        for slot, name in (("a", "rootfs1"), ("b", "rootfs2")):
            if layout[name].device in roots:
                return slot
        raise TargetError(f"the root filesystem ({roots}) is on neither slot's device")

    def env_digest(self) -> str:
        """Return the SHA-256 of both raw environment copies, read on the device."""
        env = self.board.storage.require_env()
        disk = self.board.storage.guest_disk
        parts = []
        for offset in env.offsets:
            parts.append(
                f"dd if={disk} bs=512 skip={offset // 512} "
                f"count={env.size // 512} 2>/dev/null"
            )
        return self.check_output(f"({'; '.join(parts)}) | sha256sum").split()[0]

    # -- applications ---------------------------------------------------------------

    def install_apps(self, payload: Path, timeout: float = 300.0) -> CommandResult:
        """Deliver an application payload and run ``mbl-update install`` on it.

        The updater does not reboot for applications. The result contains its exit
        status and output. A failed update is not raised, so tests can check it.
        """
        return self.install(payload, reboot=False, check=False, timeout=timeout)

    def apps(self) -> dict[str, dict[str, Any]]:
        """Return the installed applications of ``mbl-update status --json`` by
        name: version, architecture, state (``running``, ``stopped`` …), pid and
        release."""
        apps = self.status().get("apps")
        if not isinstance(apps, list):
            raise TargetError(f"mbl-update status --json has no apps list: {apps!r}")
        return {app["name"]: app for app in apps}

    def app_version(self, name: str) -> str | None:
        """Return the installed version of application ``name``, or None."""
        app = self.apps().get(name)
        return None if app is None else str(app["version"])

    def app_state(self, name: str) -> str:
        """Return the process state of application ``name``: ``running``,
        ``starting``, ``restarting``, ``stopped``, ``unsupervised``, or
        ``not installed``."""
        app = self.apps().get(name)
        return "not installed" if app is None else str(app["state"])
