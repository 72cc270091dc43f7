"""The conformance checks of a board port, in the order they run.

Each check verifies one thing that an MBL device must do on the board. All run on one
device that boots once (``CertifyContext.running_device``), and the update checks
reboot it. Where the console shows the cause of a failure (a console that stays
silent, a disk that never appears), the failure names it in board-file terms.
"""

from __future__ import annotations

import re
import shlex
import time

from mbl_sim import scenarios
from mbl_sim.board import FLAGS_PARTITION
from mbl_sim.campaign.fat_env import saveenv_campaign
from mbl_sim.certify.registry import (
    CertifyContext,
    CheckFailed,
    CheckSkipped,
    plugin_check,
    register,
)
from mbl_sim.console import KERNEL_PANIC, UBOOT_BANNER
from mbl_sim.device import Device
from mbl_sim.errors import ConsoleAbortError, ConsoleTimeoutError
from mbl_sim.images.cache import default_cache_dir
from mbl_sim.images.recipe import FLAGS_MOUNT_POINT, SLOT_PARTITIONS
from mbl_sim.payloads import RootfsChange, cached_rootfs_payload

FAILING_INIT = b"#!/bin/sh\necho 'certify: broken init, exiting'\nexit 1\n"
TRIAL_BOOT_TIMEOUT = 120.0
INSTALL_TIMEOUT = 600.0


# --------------------------------------------------------------------------
# The boot loader's own environment


@register(
    "firmware-environment",
    "where the boot loader's own saveenv writes, and whether that survives power loss",
)
def check_firmware_environment(context: CertifyContext) -> str | None:
    firmware = context.board.firmware
    if not firmware.is_u_boot:
        context.facts["firmware"] = "none: QEMU loads kernel, device tree and initramfs"
        return "no boot loader runs, so nothing but the initramfs writes boot state"
    context.facts["firmware"] = f"{firmware.package}: {firmware.path}"
    if firmware.own_env != "fat-file":
        return (
            "U-Boot's own environment store is unusable; the boot script keeps its own"
        )
    result = saveenv_campaign(
        context.images, context.workdir / "firmware-env", timeout=context.boot_timeout
    )
    if "FAT" not in result.saved:
        raise CheckFailed(
            f"firmware.own_env is fat-file, but saveenv printed {result.saved!r}"
        )
    lost = result.count("lost")
    context.add_finding(
        "firmware-environment",
        "U-Boot's own environment is a FAT file (uboot.env), not power-safe",
        "This U-Boot build stores its environment with saveenv as uboot.env on "
        "the first FAT partition, in one copy that fatwrite rewrites in place. "
        f"{result.describe()} The MBL boot policy does not use this file: the boot "
        "script keeps its variables in the two redundant copies in the raw area, "
        "written one copy at a time. Do not run saveenv on deployed devices.",
    )
    return (
        f"saveenv writes uboot.env on FAT: {lost} of {len(result.states)} crash"
        " states lose the environment (a finding)"
    )


# --------------------------------------------------------------------------
# Boot and console


def _diagnose_boot(context: CertifyContext, error: Exception) -> str:
    """Return the cause of a failed boot that the console transcript shows, in
    board-file terms."""
    board = context.board
    transcript = context.workdir / "device" / "console.log"
    try:
        text = transcript.read_text(errors="replace")
    except OSError:
        text = ""
    initramfs_error = re.findall(r"mbl-initramfs: error: [^\r\n]{0,200}", text)
    if initramfs_error:
        return (
            f"the initramfs stopped: {initramfs_error[-1]!r}; check storage "
            f"(guest_disk {board.storage.guest_disk}, interface "
            f"{board.storage.interface}) and kernel.modules in {board.source}"
        )
    linux_started = re.search(r"Booting Linux|Linux version", text) is not None
    if not linux_started:
        handed_over = re.search(r"Starting kernel|mbl-boot: environment copy", text)
        where = "after U-Boot started it" if handed_over else "at all"
        return (
            f"Linux printed nothing on the console {where}; the kernel writes to "
            f"console={board.console.device} (console.device) and QEMU connects "
            f"serial port {board.console.serial_port} (console.serial_port): check "
            f"both in {board.source}"
        )
    if "mbl: system ready" not in text:
        return (
            "Linux started but the system never reported ready on the console; "
            f"busybox init runs the shell on {board.console.device} "
            "(console.device), which must be the UART QEMU connects"
        )
    return f"the boot failed: {type(error).__name__}"


def _first_match(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    return match.group(0).strip() if match else ""


@register("boot", "boots to a shell on the serial console the board file names")
def check_boot(context: CertifyContext) -> str | None:
    board = context.board
    try:
        device = context.running_device()
    except (ConsoleTimeoutError, ConsoleAbortError) as error:
        raise CheckFailed(f"{_diagnose_boot(context, error)}\n{error}") from error

    tty = device.check_output("tty").strip()
    if tty != f"/dev/{board.console.device}":
        raise CheckFailed(
            f"the shell runs on {tty}, not on /dev/{board.console.device} "
            "(console.device)"
        )

    model = device.check_output("cat /proc/device-tree/model; echo").strip("\x00\n")
    release = device.check_output("uname -r").strip()
    context.facts["kernel release (running)"] = release
    context.facts["device tree model (running)"] = model.replace("\x00", "")
    transcript = device.workdir / "console.log"
    uboot = _first_match(
        r"U-Boot 20[0-9]{2}\.[0-9]{2}[^\r\n(]{0,40}",
        transcript.read_text(errors="replace"),
    )
    if uboot:
        context.facts["U-Boot"] = uboot
    if release != context.images.kernel_release:
        raise CheckFailed(
            f"the running kernel is {release}, the image build installed "
            f"{context.images.kernel_release}"
        )

    seconds = context.boot_seconds or 0.0
    context.facts["boot to shell"] = f"{seconds:.1f} s"
    return (
        f"shell on /dev/{board.console.device} after {seconds:.1f} s, kernel {release}"
    )


# --------------------------------------------------------------------------
# Storage


def _block_size(device: Device, path: str) -> int:
    output = device.check_output(f"blockdev --getsize64 {path}")
    return int(output.split()[0])


def _partition_name(device: Device, path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    output = device.run(f"grep '^PARTNAME=' /sys/class/block/{name}/uevent").output
    return output.strip().removeprefix("PARTNAME=")


@register(
    "storage",
    "the disk and every partition appear under the device names the board file names",
    requires=("boot",),
)
def check_storage(context: CertifyContext) -> str | None:
    device = context.running_device()
    storage = context.board.storage
    problems = []
    if device.run(f"test -b {storage.guest_disk}").exit_status != 0:
        raise CheckFailed(
            f"{storage.guest_disk} (storage.guest_disk) is not a block device on the "
            "running device; /proc/partitions lists:\n"
            + device.check_output("cat /proc/partitions")
        )

    disk_size = _block_size(device, storage.guest_disk)
    if disk_size != storage.size:
        problems.append(
            f"{storage.guest_disk} has {disk_size} bytes, "
            f"storage.size is {storage.size}"
        )

    for partition in storage.layout:
        path = partition.device
        if device.run(f"test -b {path}").exit_status != 0:
            problems.append(f"partition {partition.name}: {path} does not exist")
            continue
        size = _block_size(device, path)
        name = _partition_name(device, path)
        if size != partition.size:
            problems.append(
                f"{path} has {size} bytes, the layout says {partition.size}"
            )
        if name != partition.name:
            problems.append(
                f"{path} is named {name!r} in the GPT, expected {partition.name!r}"
            )

    mounts = device.check_output("cat /proc/mounts")
    root_device = storage.layout[SLOT_PARTITIONS["a"]].device
    if f"{root_device} / " not in mounts and device.running_slot() != "a":
        problems.append(f"/ is not {root_device} (slot a) on a factory-new device")
    transfer = storage.transfer.guest_disk
    if device.run(f"test -b {transfer}").exit_status != 0:
        problems.append(f"transfer disk {transfer} (storage.transfer) does not exist")

    if problems:
        raise CheckFailed("; ".join(problems))
    context.facts["storage"] = f"{storage.guest_disk} ({storage.interface})"
    context.facts["partitions"] = ", ".join(
        f"{p.name}={p.device}" for p in storage.layout
    )
    context.facts["transfer disk"] = transfer
    return f"{len(storage.layout)} partitions on {storage.guest_disk} as laid out"


# --------------------------------------------------------------------------
# Boot state: both ways between the boot loader's tools and the updater


_UPDATER_WRITE = (
    "python3 -c 'from updater.config import load_config; "
    "from updater.slots import boot_store; from updater.bootenv import update_env; "
    "update_env(boot_store(load_config()), "
    '{"mbl_certify_fw": None, "mbl_certify_updater": "2"})\''
)


def _check_env_interop(context: CertifyContext, device: Device) -> str:
    device.check_output("fw_setenv mbl_certify_fw 1")
    environment = device.status().get("environment")
    if not isinstance(environment, dict) or environment.get("mbl_certify_fw") != "1":
        raise CheckFailed(
            "fw_setenv wrote mbl_certify_fw=1, but mbl-update status does not show "
            f"it: {environment!r}"
        )
    device.check_output(_UPDATER_WRITE)
    # fw_printenv -n exits 0 also for a variable that is not set (libubootenv
    # 0.3.2), so the whole listing is read.
    listing = device.check_output("fw_printenv").splitlines()
    device.check_output("fw_setenv mbl_certify_updater")
    written = "mbl_certify_updater=2" in listing
    still_there = any(line.startswith("mbl_certify_fw=") for line in listing)
    if not written or still_there:
        raise CheckFailed(
            "the updater set mbl_certify_updater=2 and deleted mbl_certify_fw, but "
            f"fw_printenv lists: {', '.join(listing)}"
        )
    return "fw_setenv → updater and updater → fw_printenv agree"


def _check_flag_interop(context: CertifyContext, device: Device) -> str:
    trial = f"{FLAGS_MOUNT_POINT}/trial"
    slot = device.running_slot()
    device.check_output(
        f"printf '{slot} 2\\n' > {trial}.tmp && sync && mv {trial}.tmp {trial} && sync"
    )
    status = device.status()
    if status.get("upgrade_available") != "1" or status.get("bootcount") != "2":
        raise CheckFailed(
            f"the shell wrote {trial} as '{slot} 2', but mbl-update status reads "
            f"upgrade_available={status.get('upgrade_available')!r}, "
            f"bootcount={status.get('bootcount')!r}"
        )
    device.check_output("mbl-update mark-good")
    if device.run(f"test -e {trial}").exit_status == 0:
        raise CheckFailed(f"mbl-update mark-good left {trial} in place")
    return f"shell-written {trial} read by the updater; mark-good removed it"


@register(
    "boot-state",
    "the boot state is read and written both ways: boot tools and the updater agree",
    requires=("boot",),
)
def check_boot_state(context: CertifyContext) -> str | None:
    device = context.running_device()
    board = context.board
    if board.boot.state == "flag-files":
        context.facts["boot state"] = (
            f"flag files on {board.storage.layout[FLAGS_PARTITION].device}, "
            f"mounted at {FLAGS_MOUNT_POINT}"
        )
        return _check_flag_interop(context, device)
    env = board.storage.require_env()
    context.facts["boot state"] = (
        f"redundant U-Boot environment on {board.storage.guest_disk} at "
        f"{env.offsets[0]:#x} and {env.offsets[1]:#x}, {env.size:#x} bytes each"
    )
    return _check_env_interop(context, device)


# --------------------------------------------------------------------------
# Root filesystem update and rollback


def _update_to(context: CertifyContext, version: str, slot: str) -> float:
    device = context.running_device()
    marker = f"certify payload {version}\n".encode()
    payload = cached_rootfs_payload(
        context.images.rootfs,
        default_cache_dir(),
        RootfsChange(version=version, files={"etc/mbl-sim-payload": marker}),
    )
    started = time.monotonic()
    device.install(payload, timeout=INSTALL_TIMEOUT)
    seconds = time.monotonic() - started
    problems = []
    if device.running_slot() != slot:
        problems.append(f"running slot {device.running_slot()}, expected {slot}")
    if device.version() != version:
        problems.append(f"/etc/mbl-version {device.version()!r}, expected {version!r}")
    if device.check_output("cat /etc/mbl-sim-payload").encode() != marker:
        problems.append("/etc/mbl-sim-payload does not hold the payload's marker")
    status = device.status()
    if status.get("active_slot") != slot or status.get("upgrade_available") != "0":
        problems.append(
            f"boot state active_slot={status.get('active_slot')!r} "
            f"upgrade_available={status.get('upgrade_available')!r} after the boot, "
            f"expected {slot!r} and '0' (marked good)"
        )
    if problems:
        raise CheckFailed(f"update to {version} in slot {slot}: " + "; ".join(problems))
    return seconds


@register(
    "rootfs-update",
    "a root filesystem update goes from slot a to b and a second one back to a",
    requires=("boot", "storage"),
)
def check_rootfs_update(context: CertifyContext) -> str | None:
    device = context.running_device()
    if device.running_slot() != "a":
        raise CheckFailed(f"a factory-new device runs slot {device.running_slot()}")
    to_b = _update_to(context, "2.0.0", "b")
    to_a = _update_to(context, "3.0.0", "a")
    return f"a→b in {to_b:.1f} s, b→a in {to_a:.1f} s (install, reboot, checks)"


def _expect_trial_boots(
    context: CertifyContext, device: Device, bootlimit: int
) -> None:
    console = device.console
    with console.allowing(KERNEL_PANIC, UBOOT_BANNER):
        for boot in range(1, bootlimit + 1):
            console.expect(
                rf"slot b on trial, boot {boot} of {bootlimit}", TRIAL_BOOT_TIMEOUT
            )
            console.expect(
                r"Kernel panic - not syncing: Attempted to kill init",
                TRIAL_BOOT_TIMEOUT,
            )
        console.expect(
            rf"slot b did not confirm within {bootlimit} boots, rolling back to slot a",
            TRIAL_BOOT_TIMEOUT,
        )
    device.wait_for_shell(TRIAL_BOOT_TIMEOUT)


@register(
    "rollback",
    "an update whose init fails is abandoned after bootlimit boots: back to slot a",
    requires=("boot", "storage"),
)
def check_rollback(context: CertifyContext) -> str | None:
    device = context.running_device()
    if device.running_slot() != "a":
        raise CheckFailed(
            f"rollback needs slot a running, found {device.running_slot()}"
        )
    payload = cached_rootfs_payload(
        context.images.rootfs,
        default_cache_dir(),
        RootfsChange(
            version="broken-init",
            files={"usr/sbin/init": FAILING_INIT},
            modes={"usr/sbin/init": 0o755},
        ),
    )

    on_device = device.deliver(payload)
    command = f"mbl-update install --no-reboot {shlex.quote(on_device)}"
    device.run(command, INSTALL_TIMEOUT, check=True)

    bootlimit = context.board.boot.bootlimit
    started = time.monotonic()
    device.console.sendline("reboot")
    device.shell = None
    try:
        _expect_trial_boots(context, device, bootlimit)
    except (ConsoleTimeoutError, ConsoleAbortError) as error:
        raise CheckFailed(
            f"no rollback within {bootlimit} failed boots:\n{error}"
        ) from error

    seconds = time.monotonic() - started
    status = device.status()
    problems = []
    if device.running_slot() != "a":
        problems.append(f"running slot {device.running_slot()} after the rollback")
    if status.get("rolled_back_from") != "b":
        problems.append(f"rolled_back_from is {status.get('rolled_back_from')!r}")
    if status.get("upgrade_available") != "0":
        problems.append(f"upgrade_available is {status.get('upgrade_available')!r}")
    if problems:
        raise CheckFailed("; ".join(problems))
    return f"{bootlimit} failed boots on slot b, then slot a again, in {seconds:.1f} s"


# --------------------------------------------------------------------------
# Checks that other parts of mbl-sim provide


def _run_scenario(context: CertifyContext, name: str) -> str:
    """Run the scenario ``name`` of `mbl_sim.scenarios` on the shared device."""
    function = scenarios.SCENARIOS.get(name)
    if function is None:
        raise CheckSkipped(
            f"not available: mbl_sim.scenarios has no scenario {name!r}; known: "
            f"{', '.join(scenarios.scenario_names())}"
        )
    result = scenarios.ScenarioResult(name=name, passed=False, seconds=0.0)
    device = context.running_device()
    report = context.report
    function(scenarios.ScenarioContext(device, context.images, report, result))
    steps = len(result.steps)
    return f"scenario {name}: {steps} steps passed"


@register(
    "app-update",
    "applications install, and an upgrade whose application fails rolls back",
    requires=("boot",),
    core=False,
)
def check_app_update(context: CertifyContext) -> str | None:
    return _run_scenario(context, "apps-rollback")


plugin_check(
    "power-cut",
    "a reduced power-cut campaign: every crash state of an update boots a valid slot",
    "mbl_sim.campaign:certify_power_cut",
    requires=("boot",),
    purpose="the reduced campaign comes with mbl-sim's power-cut campaigns",
)
