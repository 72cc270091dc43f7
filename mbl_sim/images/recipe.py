"""The device recipe: from a board file to a bootable eMMC image, step by cached step.

Steps and what each one's cache key covers:

- ``kernel``: the kernel package, the board's module list, device tree file and
  kernel compression → boot image, modules and the board's ``.dtb``;
- ``firmware`` (boards whose U-Boot comes from the Debian archive of their
  architecture): the firmware package → ``u-boot.bin``;
- ``devicetree``: the kernel step (or QEMU's own tree for virt), the node paths
  and the direct-boot settings → the checked, patched ``board.dtb`` and a summary;
- ``initramfs``: the kernel step, busybox, ``images/initramfs`` and, on
  flag-file boards, the boot policy settings → ``initrd.img``;
- ``rootfs``: the root filesystem packages, ``images/rootfs``, the ``updater``
  package and the board's device settings → the staged root filesystem directory;
- ``disk``: all of the above, the boot script and the board's storage layout
  → ``emmc.img``.

U-Boot boards (``firmware.kind: u-boot``) boot ``boot.scr`` from the boot partition,
which keeps the boot state in the redundant environment. QEMU starts boards without a
runnable U-Boot (``firmware.kind: none``) with ``-kernel``, ``-dtb`` and ``-initrd``,
and their initramfs keeps the boot state in flag files on the ``bootflags``
partition.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

import updater
from mbl_sim import dtb as devicetree
from mbl_sim.board import FLAGS_PARTITION, Board
from mbl_sim.commands import run
from mbl_sim.errors import BuildError, ConfigError
from mbl_sim.images import disk, kernel, rootfs
from mbl_sim.images.cache import BuildCache, StepKey, default_cache_dir
from mbl_sim.images.debian import AptArchive
from updater import bootenv

log = logging.getLogger(__name__)

FACTORY_VERSION = "1.0.0"
INITRD_FILE = "initrd.img"
SCRIPT_FILE = "boot.scr"
DTB_FILE = "board.dtb"
FIRMWARE_FILE = "u-boot.bin"
SLOT_PARTITIONS = {"a": "rootfs1", "b": "rootfs2"}
DEFAULT_SLOT = "a"
FLAGS_MOUNT_POINT = "/mnt/flags"
"""Mount point of the bootflags partition on flag-file boards."""

# Bytes from the board's buffer_address: the two environment copies and a scratch
# area (1 MiB each), then room for a compressed kernel before U-Boot unzips it.
_BUFFER_STEP = 0x100000
_COMPRESSED_KERNEL_OFFSET = 0x400000

# Mount points of the partitions other than boot and the root filesystems.
MOUNT_POINTS = {
    "boot": ("/boot", "vfat"),
    "factory_config": ("/config/factory", "ext4"),
    "config": ("/config/user", "ext4"),
    "log": ("/var/log", "ext4"),
    "scratch": ("/scratch", "ext4"),
    "home": ("/home", "ext4"),
}


def recipe_dir() -> Path:
    """Return the ``images/`` directory of the source tree.

    Raises:
        ConfigError: mbl-sim runs from an installation without its source tree.
    """
    explicit = os.environ.get("MBL_SIM_IMAGES_DIR")
    path = (
        Path(explicit) if explicit else Path(__file__).resolve().parents[2] / "images"
    )
    if not (path / "boot.cmd.in").is_file():
        raise ConfigError(
            f"image recipe not found at {path}; install mbl-sim from its source tree "
            "with `pip install -e .`, or set MBL_SIM_IMAGES_DIR to its images/ "
            "directory"
        )
    return path


@dataclass(frozen=True)
class DeviceImages:
    """Everything a device of one board boots from, and what it was built from.

    ``firmware`` is the U-Boot image when the build unpacked it, else None and the
    board file's host path applies. ``dtb`` is the checked device tree, patched for
    direct boot on boards without U-Boot. ``bootargs`` is the kernel command line
    that QEMU passes with ``-append`` on those boards.
    """

    board: Board
    disk: Path
    kernel: Path
    initrd: Path
    rootfs: Path
    kernel_release: str
    factory_version: str
    dtb: Path | None = None
    dtb_summary: devicetree.TreeSummary | None = None
    firmware: Path | None = None
    bootargs: str = ""

    @property
    def direct_boot(self) -> bool:
        """Whether QEMU loads the kernel itself (no U-Boot on the board)."""
        return not self.board.firmware.is_u_boot

    def describe(self) -> str:
        return f"{self.board.name}: kernel {self.kernel_release}, disk {self.disk}"


def _board_text(value: object) -> str:
    # Board dataclasses are frozen and their repr lists every field in order.
    return repr(value)


class ImageBuilder:
    """Builds the images of one board into a :class:`BuildCache`."""

    def __init__(
        self,
        board: Board,
        cache_dir: Path | None = None,
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.board = board
        self.cache = BuildCache(cache_dir or default_cache_dir(), report)
        self.recipe = recipe_dir()
        packages = yaml.safe_load((self.recipe / "packages.yaml").read_text())
        self.rootfs_packages: list[str] = packages["rootfs"]
        self.excluded: list[str] = packages["exclude"]
        self.target_apt = AptArchive(self.cache.downloads, board.kernel.arch)
        self.host_apt = AptArchive(self.cache.downloads, _host_architecture())

    def build(self) -> DeviceImages:
        """Build (or reuse) every step and return the images.

        Raises:
            BuildError: a step failed; its message names the command and its stderr.
            DeviceTreeError: the device tree lacks a node the board file names.
        """
        report = self.cache.report
        report(f"resolving Debian packages for {self.board.kernel.arch}")
        kernel_step = self._kernel_step()
        firmware = self._firmware_step()
        initramfs_step = self._initramfs_step(kernel_step)
        tree_step = self._device_tree_step(kernel_step, initramfs_step)
        rootfs_step = self._rootfs_step()
        disk_step = self._disk_step(kernel_step, initramfs_step, rootfs_step)
        if not self.cache.built:
            report("images up to date, nothing to build")
        return DeviceImages(
            board=self.board,
            disk=disk_step / "emmc.img",
            kernel=kernel_step / self.board.kernel.file_name,
            initrd=initramfs_step / INITRD_FILE,
            rootfs=rootfs_step / "rootfs",
            kernel_release=(kernel_step / "release").read_text().strip(),
            factory_version=FACTORY_VERSION,
            dtb=tree_step / DTB_FILE,
            dtb_summary=devicetree.TreeSummary.load(tree_step / "summary.json"),
            firmware=None if firmware is None else firmware / FIRMWARE_FILE,
            bootargs=self.direct_bootargs(),
        )

    # -- kernel ---------------------------------------------------------------------

    def _kernel_package(self) -> Path:
        meta = self.board.kernel.package
        self.target_apt.update()
        dependencies = self.target_apt.depends(meta)
        images = [d for d in dependencies if d.startswith("linux-image-")]
        if not images:
            raise BuildError(
                f"{meta} depends on no linux-image-* package; set kernel.package in "
                f"{self.board.source} to a kernel metapackage such as linux-image-arm64"
            )
        (package,) = self.target_apt.download([images[0]])
        return package.path

    def _kernel_step(self) -> Path:
        deb = self._kernel_package()
        config = self.board.kernel
        dtb_file = self.board.device_tree.file
        key = StepKey("kernel").add_text(deb.name).add_text(repr(config.modules))
        # How soft dependencies resolve to modules (kernel._read_aliases).
        key.add_text("aliases: generic providers first")
        # Added only when set, so that boards without them keep their step keys.
        if dtb_file is not None:
            key.add_text(f"dtb={dtb_file}")
        if config.compression != "none":
            key.add_text(f"compression={config.compression}")

        def build(output: Path) -> None:
            self.cache.report(f"kernel: unpacking {deb.name}")
            tree = kernel.unpack_kernel(deb, output / "package")
            order = kernel.module_load_order(tree, list(config.modules))
            kernel.copy_modules(tree, order, output / "modules")
            kernel.write_boot_image(tree, output / config.file_name, config.compression)
            if dtb_file is not None:
                shutil.copy2(tree.device_tree(dtb_file), output / DTB_FILE)
            (output / "release").write_text(tree.release + "\n")
            (output / "modules.load").write_text("\n".join(order) + "\n")
            shutil.rmtree(output / "package")

        return self.cache.step(key, build)

    # -- firmware and device tree ---------------------------------------------------

    def _firmware_step(self) -> Path | None:
        """Unpack U-Boot from the Debian archive of the board's architecture, for
        boards whose firmware package does not exist for the host."""
        firmware = self.board.firmware
        if firmware.path is None or firmware.source != "archive":
            return None
        (package,) = self.target_apt.download([firmware.package])
        inside = firmware.path
        key = StepKey("firmware").add_text(package.path.name).add_text(str(inside))

        def build(output: Path) -> None:
            run(["dpkg-deb", "-x", package.path, output / "package"])
            source = output / "package" / inside.relative_to("/")
            if not source.is_file():
                raise BuildError(
                    f"{package.path.name} has no {inside}; check firmware.path in "
                    f"{self.board.source}"
                )
            shutil.copy2(source, output / FIRMWARE_FILE)
            shutil.rmtree(output / "package")

        return self.cache.step(key, build)

    def _device_tree_step(self, kernel_step: Path, initramfs_step: Path) -> Path:
        """Check the board's device tree and patch it for direct boot."""
        board = self.board
        source = kernel_step / DTB_FILE if board.device_tree.file is not None else None
        initrd_size = (initramfs_step / INITRD_FILE).stat().st_size
        patch = self.direct_boot_patch(initrd_size)
        key = (
            StepKey("devicetree")
            .add_text(repr(board.device_tree))
            .add_text(repr(patch))
            .add_text(f"{devicetree.PYFDT_FORMAT}")
        )
        if source is not None:
            key.add_file(source)
        else:
            # QEMU's own tree depends on the machine, CPU, memory and QEMU version.
            key.add_text(repr(board.qemu)).add_text(_qemu_version(board.qemu.binary))

        def build(output: Path) -> None:
            raw = output / "source.dtb"
            if source is None:
                devicetree.dump_qemu_tree(board, raw)
            else:
                shutil.copy2(source, raw)
            tree = devicetree.load_tree(raw, board_file=board.source)
            summary = devicetree.check_board_nodes(tree, board)
            if patch is not None:
                devicetree.patch_for_direct_boot(tree, patch, board.device_tree.memory)
            devicetree.save_tree(tree, output / DTB_FILE)
            summary.save(output / "summary.json")

        return self.cache.step(key, build)

    def direct_bootargs(self) -> str:
        """Return the kernel command line of a board without U-Boot, else ""."""
        board = self.board
        if board.firmware.is_u_boot:
            return ""
        # The initramfs finds the slots and the flag partition in its
        # /etc/mbl-boot.conf, so the command line names neither.
        arguments = f"console={board.console.device},{board.console.baud} rootwait"
        return f"{arguments} panic=5 {board.kernel.bootargs}".strip()

    def direct_boot_patch(self, initrd_size: int) -> devicetree.DirectBootPatch | None:
        """Return what the device tree needs for direct boot, or None with U-Boot."""
        if self.board.firmware.is_u_boot:
            return None
        return devicetree.DirectBootPatch(
            bootargs=self.direct_bootargs(),
            stdout_path=self.board.device_tree.console,
            baud=self.board.console.baud,
            memory_size=self.board.qemu.memory,
            initrd_size=initrd_size,
        )

    # -- initramfs ------------------------------------------------------------------

    def flag_boot_settings(self) -> dict[str, str]:
        """Return the initramfs's boot policy settings on flag-file boards, else {}.

        The initramfs reads them from ``/etc/mbl-boot.conf`` as shell variables.
        """
        if self.board.boot.state != "flag-files":
            return {}
        layout = self.board.storage.layout
        return {
            "MBL_FLAGS_DEVICE": layout[FLAGS_PARTITION].device,
            "MBL_SLOT_A": layout[SLOT_PARTITIONS["a"]].device,
            "MBL_SLOT_B": layout[SLOT_PARTITIONS["b"]].device,
            "MBL_BOOTLIMIT": str(self.board.boot.bootlimit),
        }

    def _initramfs_step(self, kernel_step: Path) -> Path:
        (busybox,) = self.target_apt.download(["busybox-static"])
        source = self.recipe / "initramfs"
        settings = self.flag_boot_settings()
        key = (
            StepKey("initramfs")
            .add_text(kernel_step.name)
            .add_text(busybox.path.name)
            .add_tree(source)
        )
        if settings:
            key.add_text(json.dumps(settings, sort_keys=True))

        def build(output: Path) -> None:
            root = output / "root"
            for directory in ("bin", "dev", "etc", "proc", "sys", "newroot"):
                (root / directory).mkdir(parents=True)
            rootfs.unpack_packages([busybox.path], output / "busybox")
            shutil.copy2(
                output / "busybox" / "bin" / "busybox", root / "bin" / "busybox"
            )
            shutil.copytree(kernel_step / "modules" / "lib", root / "lib")
            shutil.copy2(kernel_step / "modules.load", root / "etc" / "modules")
            shutil.copy2(source / "init", root / "init")
            if settings:
                lines = [f"{name}={value}" for name, value in settings.items()]
                (root / "etc" / "mbl-boot.conf").write_text("\n".join(lines) + "\n")
            rootfs.write_cpio(root, output / INITRD_FILE)
            shutil.rmtree(root)
            shutil.rmtree(output / "busybox")

        return self.cache.step(key, build)

    # -- root filesystem ------------------------------------------------------------

    def device_config(self) -> dict[str, object]:
        """Return the content of the device's ``/etc/mbl/device.json``.

        Flag-file boards add ``boot_state`` and ``flag_dir`` and have no
        ``fw_env_config``; U-Boot boards keep the original keys only.
        """
        layout = self.board.storage.layout
        config: dict[str, object] = {
            "board": self.board.name,
            "slots": {
                slot: layout[name].device for slot, name in SLOT_PARTITIONS.items()
            },
            "scratch_dir": "/scratch",
            "bootlimit": self.board.boot.bootlimit,
        }
        if self.board.boot.state == "flag-files":
            config["boot_state"] = "flag-files"
            config["flag_dir"] = FLAGS_MOUNT_POINT
        else:
            config["fw_env_config"] = "/etc/fw_env.config"
        return config

    def fw_env_lines(self) -> list[str]:
        """Return the lines of ``/etc/fw_env.config``, none on flag-file boards."""
        env = self.board.storage.env
        if env is None:
            return []
        disk_name = self.board.storage.guest_disk
        return [f"{disk_name} {offset:#x} {env.size:#x}" for offset in env.offsets]

    def mount_entries(self) -> list[rootfs.MountEntry]:
        layout = self.board.storage.layout
        mounts = dict(MOUNT_POINTS)
        if self.board.boot.state == "flag-files":
            mounts[FLAGS_PARTITION] = (FLAGS_MOUNT_POINT, "ext4")
        entries = []
        for name, (mount_point, fs_type) in mounts.items():
            options = "defaults,noatime" if fs_type == "ext4" else "defaults"
            entries.append(
                rootfs.MountEntry(layout[name].device, mount_point, fs_type, options)
            )
        return entries

    def _rootfs_step(self) -> Path:
        names = self.target_apt.closure(self.rootfs_packages, self.excluded)
        packages = self.target_apt.download(names)
        (host_busybox,) = self.host_apt.download(["busybox-static"])
        updater_source = Path(updater.__file__).parent
        overlay = self.recipe / "rootfs"
        settings = {
            "device": self.device_config(),
            "fw_env": self.fw_env_lines(),
            "fstab": [repr(e) for e in self.mount_entries()],
            "console": self.board.console.device,
            "version": FACTORY_VERSION,
        }
        key = StepKey("rootfs").add_text(json.dumps(settings, sort_keys=True))
        for package in packages:
            key.add_text(package.path.name)
        key.add_text(host_busybox.path.name).add_tree(overlay).add_tree(updater_source)

        def build(output: Path) -> None:
            root = output / "rootfs"
            root.mkdir()
            self.cache.report(f"rootfs: unpacking {len(packages)} packages")
            rootfs.unpack_packages([p.path for p in packages], root)
            rootfs.merge_usr(root)
            applets = rootfs.busybox_applets(host_busybox.path, output / "host-busybox")
            shutil.rmtree(output / "host-busybox")
            rootfs.link_applets(root, applets)
            rootfs.strip_docs(root)
            rootfs.add_overlay(root, overlay)
            rootfs.add_base_directories(root)
            rootfs.install_updater(root, updater_source)
            rootfs.write_inittab(root, self.board.console.device)
            rootfs.write_fstab(root, self.mount_entries())
            rootfs.write_device_config(root, self.device_config(), self.fw_env_lines())
            if self.board.boot.state == "flag-files":
                (root / FLAGS_MOUNT_POINT.lstrip("/")).mkdir(parents=True)
            rootfs.write_version(root, FACTORY_VERSION)
            self.cache.report("rootfs: precompiling Python")
            rootfs.add_python(root)
            (output / "packages.txt").write_text(
                "".join(f"{p.name} {p.version}\n" for p in packages)
            )

        return self.cache.step(key, build)

    # -- disk -----------------------------------------------------------------------

    def boot_script_values(self) -> dict[str, str]:
        """Return the values of the boot script's @NAME@ placeholders.

        Raises:
            ConfigError: the board has no U-Boot environment (flag-file boards).
        """
        board = self.board
        storage = board.storage
        env = storage.require_env()
        layout = storage.layout
        sector = 512
        buffer_a = board.firmware.buffer_address
        buffer_b = buffer_a + _BUFFER_STEP
        return {
            "DISK": storage.uboot_command,
            "DISK_INDEX": "0",
            "BUF_A": f"{buffer_a:#x}",
            "BUF_B": f"{buffer_b:#x}",
            "SCRATCH": f"{buffer_a + 2 * _BUFFER_STEP:#x}",
            "IMPORT_A": f"{buffer_a + 1:#x}",
            "IMPORT_B": f"{buffer_b + 1:#x}",
            "FLAG_ADDR_A": f"{buffer_a + 4:#x}",
            "FLAG_ADDR_B": f"{buffer_b + 4:#x}",
            "ENV_A_BLOCK": f"{env.offsets[0] // sector:#x}",
            "ENV_B_BLOCK": f"{env.offsets[1] // sector:#x}",
            "ENV_BLOCKS": f"{env.size // sector:#x}",
            "IMPORT_SIZE": f"{env.size - 1:#x}",
            "DEFAULT_SLOT": DEFAULT_SLOT,
            "SLOT_A_PART": str(layout[SLOT_PARTITIONS["a"]].number),
            "SLOT_B_PART": str(layout[SLOT_PARTITIONS["b"]].number),
            "DEFAULT_PART": str(layout[SLOT_PARTITIONS[DEFAULT_SLOT]].number),
            "ROOT_PREFIX": storage.guest_disk + storage.partition_prefix,
            "BOOT_PART": f"{layout['boot'].number:x}",
            "CONSOLE": f"{board.console.device},{board.console.baud}",
            "INITRD_FILE": INITRD_FILE,
            "EXTRA_BOOTARGS": board.kernel.bootargs,
            "BOOTLIMIT": str(board.boot.bootlimit),
            "BOOT_COMMAND": board.kernel.boot_command,
        }

    def boot_script_blocks(self) -> dict[str, list[str]]:
        """Return the lines of the boot script's block placeholders."""
        board = self.board
        boot_part = board.storage.layout["boot"].number
        load = f"load {board.storage.uboot_command} 0:{boot_part:x}"
        device_tree: list[str] = []
        if board.device_tree.file is not None:
            # The kernel package's tree replaces U-Boot's own, which describes
            # U-Boot's view of the board rather than Linux's.
            device_tree = [f"{load} ${{daddr}} {DTB_FILE}", "faddr=${daddr}"]
        kernel_file = board.kernel.file_name
        if board.kernel.compression == "gzip":
            packed = board.firmware.buffer_address + _COMPRESSED_KERNEL_OFFSET
            kernel_lines = [
                f"{load} {packed:#x} {kernel_file}",
                f"unzip {packed:#x} ${{kaddr}}",
            ]
        else:
            kernel_lines = [f"{load} ${{kaddr}} {kernel_file}"]
        return {"LOAD_DEVICE_TREE": device_tree, "LOAD_KERNEL": kernel_lines}

    def render_boot_script(self) -> str:
        """Return the boot script source with the board's values filled in.

        Raises:
            BuildError: the template names a value that the recipe does not provide.
            ConfigError: the board has no U-Boot environment (flag-file boards).
        """
        template = self.recipe / "boot.cmd.in"
        blocks = self.boot_script_blocks()
        lines = []
        for line in template.read_text().splitlines(keepends=True):
            name = line.strip().strip("@")
            if line.strip() == f"@{name}@" and name in blocks:
                lines += [block_line + "\n" for block_line in blocks[name]]
            else:
                lines.append(line)
        text = "".join(lines)
        for name, value in self.boot_script_values().items():
            text = text.replace(f"@{name}@", value)
        if "@" in "".join(
            line for line in text.splitlines() if not line.startswith("#")
        ):
            raise BuildError(f"unfilled @VALUE@ left in {template}")
        return text

    def initial_environment(self) -> dict[str, str]:
        """Return the boot environment of a factory-new device."""
        return {
            "active_slot": DEFAULT_SLOT,
            "previous_slot": DEFAULT_SLOT,
            "upgrade_available": "0",
            "bootcount": "0",
            "bootlimit": str(self.board.boot.bootlimit),
        }

    def _disk_step(
        self, kernel_step: Path, initramfs_step: Path, rootfs_step: Path
    ) -> Path:
        u_boot_env = self.board.boot.state == "u-boot-env"
        script = self.render_boot_script() if u_boot_env else ""
        key = (
            StepKey("disk")
            .add_text(kernel_step.name)
            .add_text(initramfs_step.name)
            .add_text(rootfs_step.name)
            .add_text(script)
            .add_text(_board_text(self.board.storage))
        )
        if u_boot_env:
            key.add_text(json.dumps(self.initial_environment(), sort_keys=True))

        def build(output: Path) -> None:
            if u_boot_env:
                self._make_boot_script(script, output)
            images = self._partition_images(
                kernel_step, initramfs_step, rootfs_step / "rootfs", output
            )
            image = output / "emmc.img"
            self.cache.report("disk: writing partitions")
            disk.create_disk(image, self.board.storage.size, images)
            if u_boot_env:
                self._write_environment(image)

        return self.cache.step(key, build)

    def _make_boot_script(self, script: str, output: Path) -> None:
        (output / "boot.cmd").write_text(script)
        mkimage_arch = "arm64" if self.board.kernel.arch == "arm64" else "arm"
        run(
            [
                "mkimage",
                "-A",
                mkimage_arch,
                "-O",
                "linux",
                "-T",
                "script",
                "-C",
                "none",
                "-n",
                "mbl-sim boot policy",
                "-d",
                output / "boot.cmd",
                output / SCRIPT_FILE,
            ]
        )

    def boot_partition_files(
        self, kernel_step: Path, initramfs_step: Path, output: Path
    ) -> dict[str, Path]:
        """Return the files of the boot partition: name → source file.

        The boot partition of a flag-file board carries the kernel and initramfs
        too, although QEMU loads them from the host, so that the partition shows
        what the device runs.
        """
        kernel_file = self.board.kernel.file_name
        files = {
            kernel_file: kernel_step / kernel_file,
            INITRD_FILE: initramfs_step / INITRD_FILE,
        }
        if self.board.boot.state == "u-boot-env":
            files[SCRIPT_FILE] = output / SCRIPT_FILE
            if self.board.device_tree.file is not None:
                files[DTB_FILE] = kernel_step / DTB_FILE
        return files

    def _partition_images(
        self, kernel_step: Path, initramfs_step: Path, root: Path, output: Path
    ) -> list[disk.PartitionImage]:
        boot_files = self.boot_partition_files(kernel_step, initramfs_step, output)
        images = []
        for partition in self.board.storage.layout:
            factory_slot = partition.name == SLOT_PARTITIONS[DEFAULT_SLOT]
            content = root if factory_slot else None
            nodes = rootfs.DEVICE_NODES if factory_slot else ()
            files = boot_files if partition.name == "boot" else {}
            images.append(
                disk.PartitionImage(
                    name=partition.name,
                    offset=partition.start,
                    size=partition.size,
                    fs_type=partition.fs,
                    content=content,
                    device_nodes=nodes,
                    files=files,
                )
            )
        return images

    def _write_environment(self, image: Path) -> None:
        """Write both environment copies: the first with flag 1, the second with flag 0,
        so that the first is current and the second is a valid older copy."""
        env = self.board.storage.require_env()
        variables = self.initial_environment()
        for offset, flag in zip(env.offsets, (1, 0), strict=True):
            disk.write_at(image, offset, bootenv.encode_copy(variables, flag, env.size))


def _qemu_version(binary: str) -> str:
    return run([binary, "--version"]).splitlines()[0]


def _host_architecture() -> str:
    return run(["dpkg", "--print-architecture"]).strip()
