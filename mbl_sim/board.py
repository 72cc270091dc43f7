"""Board files: one YAML file per emulated board, loaded into frozen dataclasses.

A board file describes how QEMU runs the board, which firmware and kernel it
boots, its serial console and the layout of its eMMC image. The files shipped
with mbl-sim live in ``mbl_sim/boards/NAME.yaml``; ``load_board("NAME")`` finds
them, and ``load_board(path)`` loads any other file.

The file is validated completely on load. Every error is a ``BoardError`` that
names the file, the key path (``storage.partitions[2].size``), the value seen
and what the key accepts. Unknown keys are errors. Each key is documented at the
line that parses it.

Sizes and offsets are in bytes. They are written as an integer (decimal, or hex
with ``0x``) or as a whole number with a binary unit: ``48M`` is 48 MiB.
"""

from __future__ import annotations

import difflib
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import yaml

from mbl_sim.errors import BoardError, ConfigError

__all__ = [
    "MBL_PARTITIONS",
    "SECTOR_SIZE",
    "Board",
    "BootConfig",
    "ConsoleConfig",
    "DeviceTreeConfig",
    "EnvConfig",
    "FirmwareConfig",
    "HostRequirement",
    "KernelConfig",
    "Partition",
    "PartitionLayout",
    "QemuConfig",
    "StorageConfig",
    "TransferConfig",
    "board_names",
    "check_host",
    "host_requirements",
    "load_board",
    "parse_board",
]

DEFAULT_BOARD = "qemu-virt-a53"

SECTOR_SIZE = 512

# GPT on 512-byte sectors: the protective MBR, the header and 32 sectors holding
# 128 partition entries of 128 bytes each. The backup GPT at the end of the disk
# is the same without the MBR.
GPT_SECTORS = 34
BACKUP_GPT_SECTORS = 33

PARTITION_ALIGNMENT = 1 << 20
"""Every partition starts and ends on a 1 MiB boundary, as fdisk and sfdisk
align by default."""

FLAGS_PARTITION = "bootflags"
"""Partition of the flag files on boards whose boot state is ``flag-files``."""

MBL_PARTITIONS = (
    "boot",
    "rootfs1",
    "rootfs2",
    "factory_config",
    "config",
    "log",
    "scratch",
    "home",
)
"""Partition names of the Mbed Linux OS layout. Every board has each of them once."""

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_SIZE_PATTERN = re.compile(r"(?P<number>[0-9]+)(?P<unit>[KMG]?)")
_HEX_PATTERN = re.compile(r"0x[0-9a-fA-F]+")
_SIZE_ALLOWED = (
    "a size in bytes: an integer (decimal or 0x hex) or a whole number with "
    "the binary unit K, M or G, for example 48M"
)

_BOARD_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
# Debian package names: lower-case letters, digits, "+", "-" and ".", starting
# with a letter or digit, at least two characters.
_PACKAGE_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+")
_PROGRAM = re.compile(r"[A-Za-z0-9_./+-]+")
_TTY = re.compile(r"tty[A-Za-z]+[0-9]+")
_DISK = re.compile(r"/dev/[a-z][a-z0-9]*")
# Device tree node paths: "/" and node names (letters, digits, ",._+-", an optional
# "@unit-address"), as the devicetree specification allows them.
_NODE_PATH = re.compile(r"(/[A-Za-z0-9,._+-]+(@[0-9A-Fa-f,]+)?)+")
_DTB_FILE = re.compile(r"[A-Za-z0-9_.,+-]+(/[A-Za-z0-9_.,+-]+)*\.dtb")
_MODULE = re.compile(r"[A-Za-z0-9_-]+")
# Kernel arguments that U-Boot's setenv and QEMU's -append pass on unchanged.
_BOOTARGS = re.compile(r"[A-Za-z0-9_.,:=/+-]+( [A-Za-z0-9_.,:=/+-]+)*")
_PARTITION_NAME = re.compile(r"[a-z][a-z0-9_]{0,35}")  # GPT names: 36 UTF-16 units

_BAUD_RATES = (9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600, 1500000)

# Debian architecture → the kernel image format its kernel packages ship, which
# decides the U-Boot command that starts it (booti for Image, bootz for zImage).
_KERNEL_IMAGE_TYPES = {"arm64": "Image", "armhf": "zImage"}
_BOOT_COMMANDS = {"Image": "booti", "zImage": "bootz"}

# Storage interface → U-Boot's block device command (virtio read, mmc read …).
_UBOOT_STORAGE_COMMANDS = {"virtio": "virtio", "sd": "mmc", "sdhci-pci": "mmc"}

# Storage interfaces that attach an SD card, whose image size QEMU requires to be a
# power of two.
SD_INTERFACES = ("sd", "sdhci-pci")

BOOT_STATES = ("u-boot-env", "flag-files")


# --------------------------------------------------------------------------
# The typed board


@dataclass(frozen=True)
class QemuConfig:
    """QEMU settings of a board: program, machine type, CPU and memory."""

    binary: str
    package: str
    machine: str
    cpu: str | None
    """CPU model, or None for machines whose CPU is fixed (raspi3b, mcimx7d-sabre)."""
    memory: int
    """Guest RAM in bytes, a whole number of MiB."""
    smp: int | None
    """Number of CPUs, or None for the machine's own number."""
    extra_args: tuple[str, ...]


@dataclass(frozen=True)
class FirmwareConfig:
    """The boot firmware, or ``kind`` "none" when QEMU boots the kernel directly."""

    kind: str
    package: str
    """Debian package of the firmware; empty for kind "none"."""
    path: Path | None
    """The firmware file: on the host (source "host"), or inside the package
    (source "archive"); None for kind "none"."""
    source: str
    load: str
    """QEMU option that loads the firmware: "bios" (-bios) or "kernel" (-kernel)."""
    prompt: str
    buffer_address: int
    """RAM address of the boot script's buffers: two environment copies and a
    scratch area (3 MiB), then a gzip kernel from 4 MiB on."""
    own_env: str
    """Store of the firmware's own ``saveenv``: "unusable" or "fat-file"
    (``uboot.env`` on the first FAT partition)."""

    @property
    def is_u_boot(self) -> bool:
        """Whether U-Boot runs the boot script (else QEMU loads the kernel)."""
        return self.kind == "u-boot"


@dataclass(frozen=True)
class KernelConfig:
    """The Debian kernel the device boots."""

    package: str
    arch: str
    image_type: str
    modules: tuple[str, ...]
    compression: str
    """Compression of the kernel file on the boot partition: "none" or "gzip"."""
    bootargs: str
    """More kernel command line arguments, appended to those the port sets."""

    @property
    def boot_command(self) -> str:
        """U-Boot command that starts this kernel image (``booti``, ``bootz``)."""
        return _BOOT_COMMANDS[self.image_type]

    @property
    def file_name(self) -> str:
        """Name of the kernel file on the boot partition (``Image``, ``Image.gz``)."""
        suffix = ".gz" if self.compression == "gzip" else ""
        return self.image_type + suffix


@dataclass(frozen=True)
class DeviceTreeConfig:
    """The device tree the kernel boots with, and the nodes the port depends on."""

    file: str | None
    """Path under the kernel package's ``usr/lib/linux-image-RELEASE/``, or None for
    the tree that QEMU generates for its virt machine."""
    memory: str
    console: str
    storage: str


@dataclass(frozen=True)
class ConsoleConfig:
    """The guest's serial console."""

    device: str
    baud: int
    serial_port: int
    """Index of QEMU's serial port that carries the console; lower ports get null."""


@dataclass(frozen=True)
class EnvConfig:
    """The two redundant copies of the U-Boot environment, in raw disk bytes."""

    offsets: tuple[int, int]
    size: int


@dataclass(frozen=True)
class Partition:
    """One GPT partition of the disk image, with its place in bytes."""

    number: int
    """GPT entry number, from 1; also the suffix of the guest device name."""
    name: str
    fs: str
    start: int
    size: int
    device: str
    """Device name in the guest, for example ``/dev/vda2``."""

    @property
    def end(self) -> int:
        """Offset of the first byte after the partition."""
        return self.start + self.size

    @property
    def start_sector(self) -> int:
        """First sector of the partition."""
        return self.start // SECTOR_SIZE

    @property
    def size_sectors(self) -> int:
        """Length of the partition in sectors."""
        return self.size // SECTOR_SIZE

    @property
    def last_sector(self) -> int:
        """Last sector of the partition (inclusive, as GPT stores it)."""
        return self.start_sector + self.size_sectors - 1


@dataclass(frozen=True)
class PartitionLayout:
    """Partitions of the disk image in GPT order, packed from the first offset."""

    disk_size: int
    partitions: tuple[Partition, ...]

    def __iter__(self) -> Iterator[Partition]:
        return iter(self.partitions)

    def __len__(self) -> int:
        return len(self.partitions)

    def __getitem__(self, name: str) -> Partition:
        """Return the partition called ``name``.

        Raises:
            KeyError: no partition has that name.
        """
        for partition in self.partitions:
            if partition.name == name:
                return partition
        names = ", ".join(p.name for p in self.partitions)
        raise KeyError(f"no partition named {name!r}; partitions: {names}")

    @property
    def disk_sectors(self) -> int:
        """Length of the disk in sectors."""
        return self.disk_size // SECTOR_SIZE

    @property
    def last_usable_byte(self) -> int:
        """Offset of the last byte a partition may use, before the backup GPT."""
        return self.disk_size - BACKUP_GPT_SECTORS * SECTOR_SIZE - 1


@dataclass(frozen=True)
class TransferConfig:
    """The transfer disk that payloads reach the running device on."""

    interface: str
    """Attachment: virtio (a second disk), sd (another SD card slot) or partition
    (a partition of the board's own disk, written through QEMU)."""
    index: int
    """The SD slot (``-drive if=sd,index=N``); unused otherwise."""
    guest_disk: str
    """The guest's block device: a disk, or with ``partition`` the partition."""
    partition: str = ""
    """Name of the partition with interface ``partition``, else ""."""


@dataclass(frozen=True)
class StorageConfig:
    """The emulated eMMC: how QEMU attaches it and how it is partitioned."""

    interface: str
    sd_index: int
    """The SD slot of the card (``-drive if=sd,index=N``); unused for other
    interfaces."""
    guest_disk: str
    partition_prefix: str
    size: int
    first_partition_offset: int
    env: EnvConfig | None
    """The redundant environment, or None on boards whose boot state is flag files."""
    layout: PartitionLayout
    transfer: TransferConfig

    def device(self, number: int) -> str:
        """Return the guest device name of partition ``number``."""
        return f"{self.guest_disk}{self.partition_prefix}{number}"

    @property
    def write_cache(self) -> bool:
        """Whether the disk has a volatile write cache that the guest must flush.

        QEMU's virtio disk offers one. An SD card has none: Linux sends it no
        flushes, and a write is on the medium once the card completed it.
        """
        return self.interface not in SD_INTERFACES

    @property
    def uboot_command(self) -> str:
        """U-Boot's command for this disk: ``virtio`` or ``mmc``."""
        return _UBOOT_STORAGE_COMMANDS[self.interface]

    def require_env(self) -> EnvConfig:
        """Return the environment settings.

        Raises:
            ConfigError: the board keeps its boot state in flag files.
        """
        if self.env is None:
            raise ConfigError(
                "this board has no U-Boot environment (storage.env); its boot state "
                "is in flag files"
            )
        return self.env


@dataclass(frozen=True)
class BootConfig:
    """The boot policy's settings."""

    bootlimit: int
    state: str
    """Store of the boot state: "u-boot-env" (the redundant environment that the
    boot script reads) or "flag-files" (files on the bootflags partition that the
    initramfs reads)."""


@dataclass(frozen=True)
class Board:
    """One emulated board, as its board file describes it."""

    name: str
    description: str
    source: str
    """The file the board was loaded from."""
    qemu: QemuConfig
    firmware: FirmwareConfig
    kernel: KernelConfig
    device_tree: DeviceTreeConfig
    console: ConsoleConfig
    storage: StorageConfig
    boot: BootConfig


# --------------------------------------------------------------------------
# Reading YAML values with their key paths


class _InvalidKeyError(yaml.constructor.ConstructorError):
    """A mapping key that PyYAML accepts but a board file must not have."""

    def __init__(self, problem: str, allowed: str, mark: yaml.Mark) -> None:
        super().__init__(None, None, problem, mark)
        self.allowed = allowed
        """What the key should be instead."""


class _DuplicateKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping.

    PyYAML keeps the last of two equal keys without a word, which would hide a
    typo in a board file. Keys that are lists or mappings are rejected before the
    duplicate check, which needs them hashable.
    """

    def construct_mapping(
        self, node: yaml.MappingNode, deep: bool = False
    ) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            # Deep, so that a list key has its items when the error shows it.
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                raise _InvalidKeyError(
                    f"key {key!r} is a {type(key).__name__}",
                    "a plain key such as a name, not a list or a mapping",
                    key_node.start_mark,
                ) from None
            if duplicate:
                raise _InvalidKeyError(
                    f"duplicate key {key!r}",
                    "each key once in a mapping",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


@dataclass(frozen=True)
class _Node:
    """A value from the board file with the key path that reached it."""

    file: str
    path: str
    value: object

    def fail(self, allowed: str, problem: str | None = None) -> NoReturn:
        raise BoardError(self.file, self.path, self.value, allowed, problem=problem)

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key


class _Mapping:
    """A YAML mapping whose keys are checked against the ones allowed."""

    def __init__(self, node: _Node, keys: Sequence[str]) -> None:
        self._node = node
        self._keys = keys
        allowed = "a mapping with the keys " + ", ".join(keys)
        if not isinstance(node.value, dict):
            node.fail(allowed)
        self._values: dict[object, object] = node.value
        for key in self._values:
            if key not in keys:
                self._reject_unknown(key)

    def _reject_unknown(self, key: object) -> NoReturn:
        hint = ""
        if isinstance(key, str):
            close = difflib.get_close_matches(key, self._keys, n=1)
            if close:
                hint = f" (did you mean {close[0]!r}?)"
        problem = f"unknown key {key!r}{hint}"
        unknown = _Node(self._node.file, self._node.at(str(key)), key)
        unknown.fail("one of the keys " + ", ".join(self._keys), problem)

    def get(self, key: str) -> _Node:
        """Return the value of a required key."""
        assert key in self._keys, key
        path = self._node.at(key)
        if key not in self._values:
            _Node(self._node.file, path, None).fail(
                "this key, which is required", problem="missing key"
            )
        return _Node(self._node.file, path, self._values[key])

    def optional(self, key: str) -> _Node | None:
        """Return the value of an optional key, or None when it is absent."""
        assert key in self._keys, key
        if key not in self._values:
            return None
        return _Node(self._node.file, self._node.at(key), self._values[key])

    def reject_unused(self, key: str, reason: str) -> None:
        """Raise BoardError if the optional ``key`` is present. ``reason`` is why the
        board has no use for it."""
        node = self.optional(key)
        if node is not None:
            node.fail(f"no {key} key (remove it)", problem=reason)


def _string(
    node: _Node, pattern: re.Pattern[str] | None = None, expected: str = ""
) -> str:
    allowed = expected or "a string"
    if not isinstance(node.value, str) or not node.value:
        node.fail(allowed)
    if pattern is not None and not pattern.fullmatch(node.value):
        node.fail(allowed)
    return node.value


def _choice(node: _Node, choices: Sequence[object]) -> Any:
    if isinstance(node.value, bool) or node.value not in choices:
        node.fail("one of " + ", ".join(repr(c) for c in choices))
    return node.value


def _integer(node: _Node, minimum: int, maximum: int | None = None) -> int:
    if maximum is None:
        allowed = f"an integer of at least {minimum}"
    else:
        allowed = f"an integer from {minimum} to {maximum}"
    value = node.value
    # YAML reads yes/no/true/false as booleans, and bool is a subclass of int.
    if isinstance(value, bool) or not isinstance(value, int):
        node.fail(allowed)
    if value < minimum or (maximum is not None and value > maximum):
        node.fail(allowed)
    return value


def _size(node: _Node, minimum: int = 1, multiple: int = 1, expected: str = "") -> int:
    """Parse a size or offset in bytes; see the module docstring for the forms."""
    allowed = _SIZE_ALLOWED
    if expected:
        allowed += ", " + expected
    value = node.value
    if isinstance(value, bool):
        node.fail(allowed)
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and _HEX_PATTERN.fullmatch(value):
        size = int(value, 16)
    elif isinstance(value, str) and (match := _SIZE_PATTERN.fullmatch(value)):
        size = int(match["number"]) * _UNITS[match["unit"]]
    else:
        node.fail(allowed)
    if size < minimum or size % multiple:
        node.fail(allowed)
    return size


def _list(node: _Node, items: str) -> list[_Node]:
    if not isinstance(node.value, list):
        node.fail(f"a list of {items}")
    return [
        _Node(node.file, f"{node.path}[{index}]", item)
        for index, item in enumerate(node.value)
    ]


def _format_size(size: int) -> str:
    for unit in ("G", "M", "K"):
        if size and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return str(size)


# --------------------------------------------------------------------------
# The sections of a board file


def _optional_string(
    section: _Mapping, key: str, pattern: re.Pattern[str] | None, expected: str
) -> str | None:
    node = section.optional(key)
    return None if node is None else _string(node, pattern, expected)


def _parse_qemu(node: _Node) -> QemuConfig:
    section = _Mapping(
        node, ("binary", "package", "machine", "cpu", "memory", "smp", "extra_args")
    )
    # More QEMU arguments, appended verbatim to the command line. Optional.
    extra_args_node = section.optional("extra_args")
    extra_args: tuple[str, ...] = ()
    if extra_args_node is not None:
        extra_args = tuple(_string(item) for item in _list(extra_args_node, "strings"))
    # Number of virtual CPUs, passed to -smp. Optional: without it QEMU gives the
    # machine its own number (raspi3b accepts only its 4 cores).
    smp_node = section.optional("smp")
    return QemuConfig(
        # QEMU program, a name looked up on PATH or an absolute path.
        binary=_string(section.get("binary"), _PROGRAM, "a program name or path"),
        # Debian package that provides the binary, named when it is missing.
        package=_string(section.get("package"), _PACKAGE_NAME, "a Debian package name"),
        # Machine type and its options, passed to -M (virt, virt,highmem=off).
        machine=_string(section.get("machine")),
        # CPU model, passed to -cpu. Optional: machines modelled on one SoC fix it.
        cpu=_optional_string(section, "cpu", None, "a CPU model"),
        # Guest RAM, passed to -m, in whole MiB.
        memory=_size(
            section.get("memory"),
            minimum=16 << 20,
            multiple=1 << 20,
            expected="a whole number of MiB, at least 16M",
        ),
        smp=None if smp_node is None else _integer(smp_node, 1),
        extra_args=extra_args,
    )


_FIRMWARE_KEYS = (
    "kind",
    "package",
    "path",
    "source",
    "load",
    "prompt",
    "buffer_address",
    "own_env",
)


def _parse_firmware(node: _Node) -> FirmwareConfig:
    section = _Mapping(node, _FIRMWARE_KEYS)
    # The firmware: u-boot, which runs the MBL boot script, or none, when QEMU
    # loads the kernel, device tree and initramfs itself (-kernel, -dtb, -initrd)
    # and the initramfs applies the boot policy with flag files.
    kind = _choice(section.get("kind"), ("u-boot", "none"))
    if kind == "none":
        for key in _FIRMWARE_KEYS[1:]:
            section.reject_unused(key, "firmware kind 'none' takes no other keys")
        return FirmwareConfig(
            kind="none",
            package="",
            path=None,
            source="host",
            load="kernel",
            prompt="",
            buffer_address=0,
            own_env="unusable",
        )

    # Debian package that provides the firmware file.
    package = _string(section.get("package"), _PACKAGE_NAME, "a Debian package name")
    # Firmware file. With source "host" a file on the host, checked by
    # check_host(), not here, so that boards load on hosts that only build images.
    # With source "archive" the file's path inside the package.
    path = section.get("path")
    path_text = _string(path, expected="an absolute path")
    if not path_text.startswith("/"):
        path.fail("an absolute path")

    # Where the package comes from. Optional, default host: installed on the host
    # with apt. archive: downloaded for the board's architecture at build time
    # (u-boot-rpi exists only for arm64 and armhf).
    source = _optional_choice(section, "source", ("host", "archive"), "host")
    # QEMU option that starts it. Optional, default bios (-bios, for virt); kernel
    # (-kernel) for machines that start any image at the kernel's address (raspi3b).
    load = _optional_choice(section, "load", ("bios", "kernel"), "bios")
    # U-Boot's prompt. Optional, default "=> "; rpi builds print "U-Boot> ".
    prompt = _optional_string(section, "prompt", None, "a prompt string") or "=> "

    # RAM the boot script uses: 3 MiB from this address for the environment
    # copies, and from 4 MiB on the compressed kernel when kernel.compression is
    # gzip. It must be clear of U-Boot, the kernel, the initramfs and the device
    # tree. Optional, default 0x50000000, inside the RAM of QEMU's virt machine.
    buffer_node = section.optional("buffer_address")
    buffer_address = 0x50000000
    if buffer_node is not None:
        buffer_address = _size(
            buffer_node, minimum=0, multiple=1 << 20, expected="a whole MiB"
        )
    # Where this U-Boot build's own saveenv stores its environment, which the MBL
    # boot policy does not use: unusable (no writable store, as in u-boot-qemu) or
    # fat-file (uboot.env on the first FAT partition, rewritten by saveenv).
    own_env = _optional_choice(section, "own_env", ("unusable", "fat-file"), "unusable")
    return FirmwareConfig(
        kind=kind,
        package=package,
        path=Path(path_text),
        source=source,
        load=load,
        prompt=prompt,
        buffer_address=buffer_address,
        own_env=own_env,
    )


def _optional_choice(
    section: _Mapping, key: str, choices: Sequence[str], default: str
) -> str:
    node = section.optional(key)
    if node is None:
        return default
    value: str = _choice(node, choices)
    return value


def _parse_kernel(node: _Node) -> KernelConfig:
    section = _Mapping(
        node, ("package", "arch", "image_type", "modules", "compression", "bootargs")
    )
    # Debian metapackage of the kernel (linux-image-arm64). The image build
    # resolves it to the versioned package that is current at build time.
    package = _string(section.get("package"), _PACKAGE_NAME, "a Debian package name")
    # Debian architecture of the kernel and the userland.
    arch = _choice(section.get("arch"), tuple(_KERNEL_IMAGE_TYPES))
    # Format of the kernel image: Image (arm64, started with booti) or zImage
    # (armhf, started with bootz). It must be the one the architecture ships.
    image_type_node = section.get("image_type")
    image_type = _choice(image_type_node, tuple(_BOOT_COMMANDS))
    if image_type != _KERNEL_IMAGE_TYPES[arch]:
        image_type_node.fail(
            f"{_KERNEL_IMAGE_TYPES[arch]!r}, the image of {arch} kernels"
        )

    # Kernel modules the initramfs loads before mounting the root filesystem, in
    # this order (storage, filesystems, charsets).
    modules = tuple(
        _string(item, _MODULE, "a kernel module name")
        for item in _list(section.get("modules"), "kernel module names")
    )

    # Compression of the kernel file on the boot partition. Optional, default
    # none. gzip makes U-Boot read a third of the bytes, which matters where it
    # reads an SD card slowly, and then unzip the Image in RAM. Only for Image:
    # a zImage decompresses itself.
    compression_node = section.optional("compression")
    compression = "none"
    if compression_node is not None:
        compression = _choice(compression_node, ("none", "gzip"))
        if compression == "gzip" and image_type != "Image":
            compression_node.fail("'none' for a zImage, which is compressed already")
    # More kernel command line arguments, appended to console=, root= and the
    # slot. Optional. mbl.loglevel=N makes the initramfs keep kernel messages less
    # severe than N off the console once the system runs, where late driver
    # messages would interleave with the shell's output.
    bootargs_node = section.optional("bootargs")
    bootargs = ""
    if bootargs_node is not None:
        bootargs = _string(bootargs_node, _BOOTARGS, "kernel arguments without quotes")
    return KernelConfig(
        package=package,
        arch=arch,
        image_type=image_type,
        modules=modules,
        compression=compression,
        bootargs=bootargs,
    )


def _parse_device_tree(node: _Node) -> DeviceTreeConfig:
    section = _Mapping(node, ("file", "memory", "console", "storage"))
    node_path = "an absolute device tree node path such as /soc/serial@30860000"
    return DeviceTreeConfig(
        # The .dtb in the kernel package, relative to usr/lib/linux-image-RELEASE
        # (imx7s-warp.dtb, broadcom/bcm2837-rpi-3-b.dtb). Optional: without it the
        # kernel boots with the tree QEMU generates (virt), dumped with dumpdtb.
        file=_optional_string(
            section, "file", _DTB_FILE, "a .dtb path such as a/b.dtb"
        ),
        # Node paths that mbl_sim.dtb checks in the tree before anything boots:
        # the RAM, the console's UART and the controller of the storage device.
        memory=_string(section.get("memory"), _NODE_PATH, node_path),
        console=_string(section.get("console"), _NODE_PATH, node_path),
        storage=_string(section.get("storage"), _NODE_PATH, node_path),
    )


def _parse_console(node: _Node) -> ConsoleConfig:
    section = _Mapping(node, ("device", "baud", "serial_port"))
    # Index of QEMU's serial port (-serial) that the console is on. Optional,
    # default 0. raspi3b: 1, because Linux gives the first UART to Bluetooth.
    port_node = section.optional("serial_port")
    return ConsoleConfig(
        # The guest's name of the serial console (console= on the command line).
        device=_string(section.get("device"), _TTY, "a tty name such as ttyAMA0"),
        # Its baud rate, for console= on the kernel command line. QEMU ignores it.
        baud=_choice(section.get("baud"), _BAUD_RATES),
        serial_port=0 if port_node is None else _integer(port_node, 0, 3),
    )


def _parse_boot(node: _Node) -> BootConfig:
    section = _Mapping(node, ("bootlimit", "state"))
    # Boots allowed on trial after an update before the boot script rolls back. At most
    # 9, because U-Boot's setexpr and itest count in hexadecimal and the environment
    # stores bootcount as the decimal digit the updater reads.
    bootlimit = _integer(section.get("bootlimit"), 1, 9)
    # Where the boot state lives. Optional, default u-boot-env: the redundant
    # environment of storage.env, read by the boot script. flag-files: files on the
    # bootflags partition, read by the initramfs, for boards without a usable
    # U-Boot (firmware kind none).
    state = _optional_choice(section, "state", BOOT_STATES, "u-boot-env")
    return BootConfig(bootlimit=bootlimit, state=state)


@dataclass(frozen=True)
class _PartitionEntry:
    name: str
    size: int
    fs: str
    size_node: _Node


def _parse_partition(node: _Node) -> _PartitionEntry:
    entry = _Mapping(node, ("name", "size", "fs"))
    size_node = entry.get("size")
    return _PartitionEntry(
        name=_string(entry.get("name"), _PARTITION_NAME, "a GPT partition name"),
        size=_size(
            size_node,
            multiple=PARTITION_ALIGNMENT,
            expected="a whole number of MiB, at least 1M",
        ),
        # vfat, ext4, or none for a raw partition (the transfer partition).
        fs=_choice(entry.get("fs"), ("vfat", "ext4", "none")),
        size_node=size_node,
    )


def _check_partition_names(node: _Node, entries: list[_PartitionEntry]) -> None:
    names = [entry.name for entry in entries]
    for index, name in enumerate(names):
        if name in names[:index]:
            _Node(node.file, f"{node.path}[{index}].name", name).fail(
                "each partition name once", problem=f"duplicate partition {name!r}"
            )
    missing = [name for name in MBL_PARTITIONS if name not in names]
    if missing:
        node.fail(
            "partitions named " + ", ".join(MBL_PARTITIONS),
            problem="missing partition " + ", ".join(repr(m) for m in missing),
        )


def _pack_partitions(
    entries: list[_PartitionEntry], first_offset: int, disk_size: int, device: str
) -> PartitionLayout:
    """Place the partitions one after the other from ``first_offset``.

    ``device`` is the guest's name of the disk followed by the partition prefix.
    """
    last_usable = disk_size - BACKUP_GPT_SECTORS * SECTOR_SIZE - 1
    partitions: list[Partition] = []
    start = first_offset
    for number, entry in enumerate(entries, 1):
        if start + entry.size - 1 > last_usable:
            entry.size_node.fail(
                f"at most {last_usable + 1 - start} bytes, so that the partition ends "
                f"before the backup GPT (last {BACKUP_GPT_SECTORS} sectors) of the "
                f"{_format_size(disk_size)} disk",
                problem=f"partition {entry.name!r} of {entry.size} bytes "
                f"({entry.size_node.value!r}) does not fit at offset {start}",
            )
        partition = Partition(
            number, entry.name, entry.fs, start, entry.size, f"{device}{number}"
        )
        partitions.append(partition)
        start += entry.size
    return PartitionLayout(disk_size, tuple(partitions))


def _parse_env(node: _Node, first_partition_offset: int) -> EnvConfig:
    section = _Mapping(node, ("offsets", "size"))
    # Size of each copy: a CRC32 (4 bytes), a flag byte, then the variables.
    # Whole sectors, because the boot script reads it with `virtio read`.
    size_node = section.get("size")
    size = _size(
        size_node,
        minimum=SECTOR_SIZE,
        multiple=SECTOR_SIZE,
        expected=f"a positive multiple of {SECTOR_SIZE}",
    )
    gpt_end = GPT_SECTORS * SECTOR_SIZE
    room = first_partition_offset - gpt_end
    max_size = room // 2 // SECTOR_SIZE * SECTOR_SIZE
    if size > max_size:
        size_node.fail(
            f"at most {max_size} bytes, so that both copies fit between the primary "
            f"GPT and the first partition",
            problem=f"two copies of {size_node.value!r} ({size} bytes) do not fit "
            f"in the {room} bytes from {gpt_end} (after the primary GPT) to the "
            f"first partition at {first_partition_offset}",
        )

    # Byte offsets of the two copies on the disk. Both lie between the primary
    # GPT (the first 34 sectors) and the first partition, on sector boundaries,
    # and do not overlap each other.
    offsets_node = section.get("offsets")
    items = _list(offsets_node, "two offsets")
    if len(items) != 2:
        offsets_node.fail("a list of exactly two offsets, one per copy")

    offsets = [
        _size(
            item,
            minimum=0,
            multiple=SECTOR_SIZE,
            expected=f"a multiple of {SECTOR_SIZE}",
        )
        for item in items
    ]

    for item, offset in zip(items, offsets, strict=True):
        if offset < gpt_end or offset + size > first_partition_offset:
            item.fail(
                f"an offset from {gpt_end} (after the primary GPT) to "
                f"{first_partition_offset - size} (so that the {size}-byte copy "
                f"ends before the first partition at {first_partition_offset})"
            )

    low, high = sorted(offsets)
    if high < low + size:
        items[1].fail(
            f"an offset at least {size} bytes away from the other copy at "
            f"{offsets[0]}, so that the copies do not overlap",
        )
    return EnvConfig(offsets=(offsets[0], offsets[1]), size=size)


_STORAGE_KEYS = (
    "interface",
    "sd_index",
    "guest_disk",
    "partition_prefix",
    "size",
    "env",
    "partitions",
    "first_partition_offset",
    "transfer",
)


def _parse_storage(node: _Node) -> StorageConfig:
    section = _Mapping(node, _STORAGE_KEYS)

    # How QEMU attaches the disk image: virtio (virtio-blk-pci), sd (an SD card in
    # the SoC's own slot, -drive if=sd) or sdhci-pci (an SD card on a PCI SDHCI
    # controller, for virt).
    # u-boot-qemu 2023.01 has no MMC driver, so _check_disk_attachment rejects
    # sdhci-pci on U-Boot boards. No shipped board uses sdhci-pci, and the
    # integration tests boot a variant of qemu-virt-a15 with it.
    interface = _choice(section.get("interface"), ("virtio", *SD_INTERFACES))
    # The SoC's card slot for interface sd (-drive if=sd,index=N). Optional,
    # default 0; the WaRP7's eMMC is slot 2. Other interfaces have no slot.
    sd_index = 0
    if interface == "sd":
        sd_index_node = section.optional("sd_index")
        if sd_index_node is not None:
            sd_index = _integer(sd_index_node, 0, 3)
    else:
        section.reject_unused(
            "sd_index", f"storage interface {interface!r} has no card slot"
        )
    # The guest's name of the whole disk.
    guest_disk = _string(section.get("guest_disk"), _DISK, "a device such as /dev/vda")
    # Text between the disk name and the partition number: "" for /dev/vda2,
    # "p" for /dev/mmcblk0p2.
    prefix = _choice(section.get("partition_prefix"), ("", "p"))

    # Size of the whole disk image, in whole sectors. QEMU's SD card model takes
    # only images whose size is a power of two.
    size_node = section.get("size")
    size = _size(
        size_node,
        minimum=PARTITION_ALIGNMENT,
        multiple=SECTOR_SIZE,
        expected=f"a multiple of {SECTOR_SIZE}, at least 1M",
    )
    if interface in SD_INTERFACES and size & (size - 1):
        size_node.fail(
            f"a power of two, because QEMU's SD card model requires it for {interface}"
        )

    # Partitions in GPT order (partition 1 first), each {name, size, fs}, packed
    # one after the other from first_partition_offset (a whole number of MiB).
    # Sizes are whole MiB, so every partition is 1 MiB aligned. The names of
    # MBL_PARTITIONS must each appear once, and more partitions are allowed.
    # fs is vfat or ext4.
    first_offset = _size(
        section.get("first_partition_offset"),
        minimum=PARTITION_ALIGNMENT,
        multiple=PARTITION_ALIGNMENT,
        expected="a whole number of MiB, at least 1M",
    )
    partitions_node = section.get("partitions")
    entries = [_parse_partition(item) for item in _list(partitions_node, "partitions")]
    _check_partition_names(partitions_node, entries)
    layout = _pack_partitions(entries, first_offset, size, guest_disk + prefix)

    # The redundant U-Boot environment, see _parse_env. Required when boot.state
    # is u-boot-env, absent when it is flag-files (checked in _parse_root).
    env_node = section.optional("env")
    env = None if env_node is None else _parse_env(env_node, first_offset)

    return StorageConfig(
        interface=interface,
        sd_index=sd_index,
        guest_disk=guest_disk,
        partition_prefix=prefix,
        size=size,
        first_partition_offset=first_offset,
        env=env,
        layout=layout,
        transfer=_parse_transfer(node, section, interface, guest_disk, layout),
    )


_TRANSFER_KEYS = ("interface", "index", "guest_disk", "partition")


def _parse_transfer(
    storage: _Node,
    storage_section: _Mapping,
    interface: str,
    guest_disk: str,
    layout: PartitionLayout,
) -> TransferConfig:
    """Parse the transfer disk: where payloads reach the running device.

    Optional for virtio storage, where it is the next virtio disk (/dev/vdb after
    /dev/vda); required otherwise.
    """
    node = storage_section.optional("transfer")
    if node is None:
        return _default_transfer(storage, interface, guest_disk)
    section = _Mapping(node, _TRANSFER_KEYS)
    # How payloads reach the device: virtio (a second disk), sd (a card in another
    # slot) or partition (a raw partition of the board's own disk that the host
    # writes through QEMU, for machines with one card slot and no PCI).
    transfer_interface = _choice(
        section.get("interface"), ("virtio", "sd", "partition")
    )
    if transfer_interface != "sd":
        section.reject_unused(
            "index", f"transfer interface {transfer_interface!r} has no card slot"
        )
    if transfer_interface == "partition":
        return _parse_transfer_partition(section, layout)
    section.reject_unused(
        "partition", f"transfer interface {transfer_interface!r} is a whole disk"
    )
    # The card slot for sd (-drive if=sd,index=N). _check_disk_attachment checks
    # that it differs from the slot of the storage's card.
    index_node = section.optional("index")
    index = 0 if index_node is None else _integer(index_node, 0, 3)
    return TransferConfig(
        interface=transfer_interface,
        index=index,
        # The guest's name of the transfer disk.
        guest_disk=_string(
            section.get("guest_disk"), _DISK, "a device such as /dev/mmcblk0"
        ),
    )


def _default_transfer(
    storage: _Node, interface: str, guest_disk: str
) -> TransferConfig:
    """Return the transfer disk of a board without the transfer key: the virtio
    disk after ``guest_disk`` (/dev/vdb after /dev/vda)."""
    last = guest_disk[-1]
    if interface != "virtio":
        problem = f"missing key, required for storage interface {interface!r}"
    elif not "a" <= last < "z":
        problem = (
            f"missing key, required because no disk name follows storage.guest_disk "
            f"{guest_disk} (the default is the next letter, /dev/vdb after /dev/vda)"
        )
    else:
        following = guest_disk[:-1] + chr(ord(last) + 1)
        return TransferConfig(interface="virtio", index=0, guest_disk=following)
    _Node(storage.file, storage.at("transfer"), None).fail(
        "a mapping with the keys " + ", ".join(_TRANSFER_KEYS), problem=problem
    )


def _parse_transfer_partition(
    section: _Mapping, layout: PartitionLayout
) -> TransferConfig:
    # The partition's name; it must have fs: none. Its device is the transfer disk.
    section.reject_unused(
        "guest_disk", "the transfer partition's device is the guest disk"
    )
    partition_node = section.get("partition")
    name = _string(partition_node, _PARTITION_NAME, "a partition name")
    found = [p for p in layout if p.name == name and p.fs == "none"]
    if not found:
        partition_node.fail("the name of a partition with fs: none")
    return TransferConfig(
        interface="partition",
        index=0,
        guest_disk=found[0].device,
        partition=name,
    )


def _check_boot_state(root: _Mapping, board: Board) -> None:
    """Check that the firmware, the boot state and the storage fit together."""
    storage_node = root.get("storage")
    env_node = _Node(storage_node.file, storage_node.at("env"), None)
    if board.boot.state == "u-boot-env":
        if not board.firmware.is_u_boot:
            root.get("boot").fail(
                "a mapping with state: flag-files, because firmware kind 'none' "
                "runs no boot script that could read a U-Boot environment",
                problem="boot state 'u-boot-env' needs U-Boot",
            )
        if board.storage.env is None:
            env_node.fail(
                "the key env, which boot.state u-boot-env requires",
                problem="missing key",
            )
        return
    if board.firmware.is_u_boot:
        root.get("boot").fail(
            "state u-boot-env, because the boot script of U-Boot boards reads the "
            "environment",
            problem="boot state 'flag-files' is for boards without U-Boot",
        )
    _Mapping(storage_node, _STORAGE_KEYS).reject_unused(
        "env", "a flag-files board keeps no U-Boot environment"
    )
    partitions = {p.name: p for p in board.storage.layout}
    flags = partitions.get(FLAGS_PARTITION)
    if flags is None or flags.fs != "ext4":
        _Node(storage_node.file, storage_node.at("partitions"), None).fail(
            f"an ext4 partition named {FLAGS_PARTITION!r} for the flag files",
            problem=f"missing ext4 partition {FLAGS_PARTITION!r}",
        )


# Storage and transfer interfaces whose controller sits on PCI. They are allowed
# only on QEMU's virt machine (also versioned, as virt-8.2), which has a PCI bus;
# the SoC machines of the shipped boards (raspi3b, mcimx6ul-evk, mcimx7d-sabre)
# have none.
_PCI_INTERFACES = ("virtio", "sdhci-pci")
_PCI_MACHINE = re.compile(r"virt(-[0-9]+\.[0-9]+)?")


def _check_disk_attachment(root: _Mapping, board: Board) -> None:
    """Check that the machine and the firmware can attach and read the disks."""
    storage_section = _Mapping(root.get("storage"), _STORAGE_KEYS)
    storage = board.storage
    interface_node = storage_section.get("interface")
    # The machine type without its options: virt for "virt,highmem=off".
    machine = board.qemu.machine.split(",")[0]
    has_pci = _PCI_MACHINE.fullmatch(machine) is not None

    if not has_pci and storage.interface in _PCI_INTERFACES:
        interface_node.fail(
            f"'sd' (the SoC's card slot) on machine {machine!r}",
            problem=f"storage interface {storage.interface!r} needs PCI, which "
            "mbl-sim supports only on QEMU's virt machine",
        )
    if storage.interface == "sdhci-pci" and board.firmware.is_u_boot:
        interface_node.fail(
            "'virtio' on a U-Boot board, or firmware kind 'none' with boot.state "
            "flag-files for an SD card on sdhci-pci",
            problem="U-Boot for QEMU's virt machine (u-boot-qemu 2023.01) has no MMC "
            "driver, so it cannot read an SD card on sdhci-pci",
        )

    transfer_node = storage_section.optional("transfer")
    if transfer_node is not None:
        _check_transfer_attachment(transfer_node, storage, machine, has_pci)


def _check_transfer_attachment(
    node: _Node, storage: StorageConfig, machine: str, has_pci: bool
) -> None:
    """Check that the machine can attach the transfer disk of the key ``node``."""
    section = _Mapping(node, _TRANSFER_KEYS)
    transfer = storage.transfer
    if not has_pci and transfer.interface == "virtio":
        section.get("interface").fail(
            "'sd' (another card slot) or 'partition' (a raw partition of the "
            f"board's disk) on machine {machine!r}",
            problem="transfer interface 'virtio' needs PCI, which mbl-sim supports "
            "only on QEMU's virt machine",
        )

    both_sd = storage.interface == "sd" and transfer.interface == "sd"
    if not both_sd or transfer.index != storage.sd_index:
        return
    index_node = section.optional("index")
    problem = f"card slot {transfer.index} is also storage.sd_index"
    if index_node is None:
        index_node = _Node(node.file, node.at("index"), None)
        problem = "missing key: the default slot 0 is also storage.sd_index"
    index_node.fail(
        f"a card slot from 0 to 3 other than storage.sd_index {storage.sd_index}, "
        "because each slot holds one card",
        problem=problem,
    )


def _parse_root(node: _Node, stem: str) -> Board:
    root = _Mapping(
        node,
        (
            "name",
            "description",
            "qemu",
            "firmware",
            "kernel",
            "device_tree",
            "console",
            "storage",
            "boot",
        ),
    )
    # The board's name, which is also the file's name without .yaml.
    name_node = root.get("name")
    name = _string(name_node, _BOARD_NAME, "lower-case letters, digits and '-'")
    if name != stem:
        name_node.fail(f"{stem!r}, the file's name without .yaml")
    description = root.optional("description")
    board = Board(
        name=name,
        # One line for humans. Optional.
        description="" if description is None else _string(description),
        source=node.file,
        qemu=_parse_qemu(root.get("qemu")),
        firmware=_parse_firmware(root.get("firmware")),
        kernel=_parse_kernel(root.get("kernel")),
        # The device tree, see _parse_device_tree.
        device_tree=_parse_device_tree(root.get("device_tree")),
        console=_parse_console(root.get("console")),
        storage=_parse_storage(root.get("storage")),
        boot=_parse_boot(root.get("boot")),
    )
    _check_disk_attachment(root, board)
    _check_boot_state(root, board)
    return board


# --------------------------------------------------------------------------
# Loading


def parse_board(text: str, source: str) -> Board:
    """Parse and validate the YAML text of a board file.

    ``source`` is the file's path: errors name it, and the board's ``name`` must
    equal its name without ``.yaml``.

    Raises:
        BoardError: the text is not valid YAML or not a valid board.
    """
    try:
        data = yaml.load(text, Loader=_DuplicateKeyLoader)
    except yaml.YAMLError as error:
        allowed = "valid YAML"
        if isinstance(error, _InvalidKeyError):
            allowed = error.allowed
        problem = _describe_yaml_error(error)
        raise BoardError(source, "", None, allowed, problem=problem) from error
    stem = Path(source).name.removesuffix(".yaml").removesuffix(".yml")
    return _parse_root(_Node(source, "", data), stem)


def _describe_yaml_error(error: yaml.YAMLError) -> str:
    """Return the problem of a PyYAML error with its line and column, without the
    "<unicode string>" that PyYAML names text parsed from a string."""
    if isinstance(error, yaml.reader.ReaderError):
        return (
            f"invalid YAML at character {error.position + 1}: {error.reason}, "
            f"found #x{error.character:04x}"
        )
    if not isinstance(error, yaml.MarkedYAMLError) or error.problem_mark is None:
        return f"invalid YAML: {error}"
    mark = error.problem_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    if isinstance(error, _InvalidKeyError):
        return f"{where}: {error.problem}"
    text = f"invalid YAML at {where}: {error.problem}"
    if error.context and error.context_mark is not None:
        context = error.context_mark
        text += (
            f" ({error.context} at line {context.line + 1}, "
            f"column {context.column + 1})"
        )
    return text


def _boards_dir() -> Path:
    return Path(str(resources.files("mbl_sim").joinpath("boards")))


def board_names() -> list[str]:
    """Return the names of the boards shipped in ``mbl_sim/boards``, sorted."""
    return sorted(path.stem for path in _boards_dir().glob("*.yaml"))


def load_board(name_or_path: str | Path = DEFAULT_BOARD) -> Board:
    """Load a board by name (``qemu-virt-a53``) or from a file path.

    A ``Path``, or a string with a ``/`` or ending in ``.yaml``, is a path; any
    other string names a board in ``mbl_sim/boards``.

    Raises:
        ConfigError: the name or file is not found.
        BoardError: the file is not a valid board.
    """
    text_form = str(name_or_path)
    is_path = isinstance(name_or_path, Path) or "/" in text_form
    if is_path or text_form.endswith((".yaml", ".yml")):
        path = Path(name_or_path)
    else:
        path = _boards_dir() / f"{text_form}.yaml"
        if not path.is_file():
            available = ", ".join(board_names()) or "none"
            raise ConfigError(
                f"unknown board {text_form!r}; available boards: {available}"
            )
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read board file {path}: {error}") from error
    except UnicodeDecodeError as error:
        byte = error.object[error.start]
        raise ConfigError(
            f"cannot read board file {path}: not UTF-8 text (byte 0x{byte:02x} at "
            f"offset {error.start}); save it with UTF-8 encoding"
        ) from error
    return parse_board(text, str(path))


# --------------------------------------------------------------------------
# Host checks


@dataclass(frozen=True)
class HostRequirement:
    """A program or file that running the board needs on the host."""

    purpose: str
    path: str
    """An absolute file path, or a program name looked up on PATH."""
    package: str
    """The Debian package that provides it."""

    def is_present(self) -> bool:
        """Return whether the program is on PATH or the file exists."""
        if self.path.startswith("/"):
            return Path(self.path).is_file()
        return shutil.which(self.path) is not None


def host_requirements(board: Board) -> tuple[HostRequirement, ...]:
    """Return the host programs and files that booting ``board`` needs.

    Firmware from the Debian archive of the board's architecture is part of the
    built images, not of the host.
    """
    requirements = [HostRequirement("QEMU", board.qemu.binary, board.qemu.package)]
    firmware = board.firmware
    if firmware.path is not None and firmware.source == "host":
        requirements.append(
            HostRequirement("firmware", str(firmware.path), firmware.package)
        )
    # Each machine runs its disks on qcow2 overlays made with qemu-img.
    requirements.append(HostRequirement("disk overlays", "qemu-img", "qemu-utils"))
    return tuple(requirements)


def check_host(board: Board) -> None:
    """Check that the host has every program and file that booting ``board`` needs.

    Raises:
        ConfigError: something is missing; the message lists each missing item
            with its Debian package and the ``apt-get install`` line for all.
    """
    missing = [req for req in host_requirements(board) if not req.is_present()]
    if not missing:
        return
    lines = [f"  {req.purpose}: {req.path} (package {req.package})" for req in missing]
    packages = " ".join(sorted({req.package for req in missing}))
    raise ConfigError(
        f"board {board.name!r} needs programs or files that are missing on this host:\n"
        + "\n".join(lines)
        + f"\ninstall them with: apt-get install --no-install-recommends {packages}"
    )
