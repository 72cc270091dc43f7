"""The device recipe: from a board file to a bootable eMMC image, step by cached step.

Steps and what each one's cache key covers:

- ``kernel``: the kernel package and the board's module list → boot image and modules;
- ``initramfs``: the kernel step, busybox and ``images/initramfs`` → ``initrd.img``;
- ``rootfs``: the root filesystem packages, ``images/rootfs``, the ``updater``
  package and the board's device settings → the staged root filesystem directory;
- ``disk``: all of the above, the boot script and the board's storage layout
  → ``emmc.img``.
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
from mbl_sim.board import Board
from mbl_sim.commands import run
from mbl_sim.errors import BuildError, ConfigError
from mbl_sim.images import disk, kernel, rootfs
from mbl_sim.images.cache import BuildCache, StepKey, default_cache_dir
from mbl_sim.images.debian import AptArchive
from updater import bootenv

log = logging.getLogger(__name__)

FACTORY_VERSION = "1.0.0"
KERNEL_FILE = "Image"
INITRD_FILE = "initrd.img"
SCRIPT_FILE = "boot.scr"
SLOT_PARTITIONS = {"a": "rootfs1", "b": "rootfs2"}
DEFAULT_SLOT = "a"

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
    """Everything a device of one board boots from, and what it was built from."""

    board: Board
    disk: Path
    kernel: Path
    initrd: Path
    rootfs: Path
    kernel_release: str
    factory_version: str

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
        """
        report = self.cache.report
        report(f"resolving Debian packages for {self.board.kernel.arch}")
        kernel_step = self._kernel_step()
        initramfs_step = self._initramfs_step(kernel_step)
        rootfs_step = self._rootfs_step()
        disk_step = self._disk_step(kernel_step, initramfs_step, rootfs_step)
        if not self.cache.built:
            report("images up to date, nothing to build")
        return DeviceImages(
            board=self.board,
            disk=disk_step / "emmc.img",
            kernel=kernel_step / KERNEL_FILE,
            initrd=initramfs_step / INITRD_FILE,
            rootfs=rootfs_step / "rootfs",
            kernel_release=(kernel_step / "release").read_text().strip(),
            factory_version=FACTORY_VERSION,
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
        key = (
            StepKey("kernel")
            .add_text(deb.name)
            .add_text(repr(self.board.kernel.modules))
        )

        def build(output: Path) -> None:
            self.cache.report(f"kernel: unpacking {deb.name}")
            tree = kernel.unpack_kernel(deb, output / "package")
            order = kernel.module_load_order(tree, list(self.board.kernel.modules))
            kernel.copy_modules(tree, order, output / "modules")
            shutil.copy2(tree.image(), output / KERNEL_FILE)
            (output / "release").write_text(tree.release + "\n")
            (output / "modules.load").write_text("\n".join(order) + "\n")
            shutil.rmtree(output / "package")

        return self.cache.step(key, build)

    # -- initramfs ------------------------------------------------------------------

    def _initramfs_step(self, kernel_step: Path) -> Path:
        (busybox,) = self.target_apt.download(["busybox-static"])
        source = self.recipe / "initramfs"
        key = (
            StepKey("initramfs")
            .add_text(kernel_step.name)
            .add_text(busybox.path.name)
            .add_tree(source)
        )

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
            rootfs.write_cpio(root, output / INITRD_FILE)
            shutil.rmtree(root)
            shutil.rmtree(output / "busybox")

        return self.cache.step(key, build)

    # -- root filesystem ------------------------------------------------------------

    def device_config(self) -> dict[str, object]:
        """Return the content of the device's ``/etc/mbl/device.json``."""
        layout = self.board.storage.layout
        return {
            "board": self.board.name,
            "slots": {
                slot: layout[name].device for slot, name in SLOT_PARTITIONS.items()
            },
            "scratch_dir": "/scratch",
            "fw_env_config": "/etc/fw_env.config",
            "bootlimit": self.board.boot.bootlimit,
        }

    def fw_env_lines(self) -> list[str]:
        env = self.board.storage.env
        disk_name = self.board.storage.guest_disk
        return [f"{disk_name} {offset:#x} {env.size:#x}" for offset in env.offsets]

    def mount_entries(self) -> list[rootfs.MountEntry]:
        layout = self.board.storage.layout
        entries = []
        for name, (mount_point, fs_type) in MOUNT_POINTS.items():
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
            rootfs.write_version(root, FACTORY_VERSION)
            self.cache.report("rootfs: precompiling Python")
            rootfs.add_python(root)
            (output / "packages.txt").write_text(
                "".join(f"{p.name} {p.version}\n" for p in packages)
            )

        return self.cache.step(key, build)

    # -- disk -----------------------------------------------------------------------

    def boot_script_values(self) -> dict[str, str]:
        storage = self.board.storage
        layout = storage.layout
        sector = 512
        return {
            "DISK_INDEX": "0",
            "ENV_A_BLOCK": f"{storage.env.offsets[0] // sector:#x}",
            "ENV_B_BLOCK": f"{storage.env.offsets[1] // sector:#x}",
            "ENV_BLOCKS": f"{storage.env.size // sector:#x}",
            "IMPORT_SIZE": f"{storage.env.size - 1:#x}",
            "DEFAULT_SLOT": DEFAULT_SLOT,
            "SLOT_A_PART": str(layout[SLOT_PARTITIONS["a"]].number),
            "SLOT_B_PART": str(layout[SLOT_PARTITIONS["b"]].number),
            "DEFAULT_PART": str(layout[SLOT_PARTITIONS[DEFAULT_SLOT]].number),
            "ROOT_PREFIX": storage.guest_disk + storage.partition_prefix,
            "BOOT_PART": f"{layout['boot'].number:x}",
            "CONSOLE": f"{self.board.console.device},{self.board.console.baud}",
            "KERNEL_FILE": KERNEL_FILE,
            "INITRD_FILE": INITRD_FILE,
            "EXTRA_BOOTARGS": "",
            "BOOTLIMIT": str(self.board.boot.bootlimit),
        }

    def render_boot_script(self) -> str:
        """Return the boot script source with the board's values filled in.

        Raises:
            BuildError: the template names a value that the recipe does not provide.
        """
        text = (self.recipe / "boot.cmd.in").read_text()
        for name, value in self.boot_script_values().items():
            text = text.replace(f"@{name}@", value)
        if "@" in "".join(
            line for line in text.splitlines() if not line.startswith("#")
        ):
            raise BuildError(f"unfilled @VALUE@ left in {self.recipe / 'boot.cmd.in'}")
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
        script = self.render_boot_script()
        key = (
            StepKey("disk")
            .add_text(kernel_step.name)
            .add_text(initramfs_step.name)
            .add_text(rootfs_step.name)
            .add_text(script)
            .add_text(_board_text(self.board.storage))
            .add_text(json.dumps(self.initial_environment(), sort_keys=True))
        )

        def build(output: Path) -> None:
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
            images = self._partition_images(
                kernel_step, initramfs_step, rootfs_step / "rootfs", output
            )
            image = output / "emmc.img"
            self.cache.report("disk: writing partitions")
            disk.create_disk(image, self.board.storage.size, images)
            self._write_environment(image)

        return self.cache.step(key, build)

    def _partition_images(
        self, kernel_step: Path, initramfs_step: Path, root: Path, output: Path
    ) -> list[disk.PartitionImage]:
        boot_files = {
            KERNEL_FILE: kernel_step / KERNEL_FILE,
            INITRD_FILE: initramfs_step / INITRD_FILE,
            SCRIPT_FILE: output / SCRIPT_FILE,
        }
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
        env = self.board.storage.env
        variables = self.initial_environment()
        for offset, flag in zip(env.offsets, (1, 0), strict=True):
            disk.write_at(image, offset, bootenv.encode_copy(variables, flag, env.size))


def _host_architecture() -> str:
    return run(["dpkg", "--print-architecture"]).strip()
