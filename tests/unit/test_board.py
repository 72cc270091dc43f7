"""Board files: loading, validation messages and partition layout maths."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from mbl_sim.board import (
    MBL_PARTITIONS,
    SECTOR_SIZE,
    HostRequirement,
    board_names,
    check_host,
    host_requirements,
    load_board,
    parse_board,
)
from mbl_sim.errors import BoardError, ConfigError

MiB = 1 << 20
BOARDS_DIR = Path(__file__).parents[2] / "mbl_sim" / "boards"
DEFAULT = yaml.safe_load((BOARDS_DIR / "qemu-virt-a53.yaml").read_text())


def write_board(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load_changed(tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> Any:
    data = copy.deepcopy(DEFAULT)
    change(data)
    return load_board(write_board(tmp_path, data))


def error_for(tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> BoardError:
    with pytest.raises(BoardError) as caught:
        load_changed(tmp_path, change)
    return caught.value


def set_key(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    """Return a change that sets a dotted key path (``storage.env.size``)."""

    def change(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return change


def delete_key(path: str) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node[part]
        del node[last]

    return change


# --------------------------------------------------------------------------
# The default board


def test_default_board_loads_by_name() -> None:
    board = load_board("qemu-virt-a53")

    assert board.name == "qemu-virt-a53"
    assert board.source.endswith("mbl_sim/boards/qemu-virt-a53.yaml")
    assert board.qemu.binary == "qemu-system-aarch64"
    assert board.qemu.package == "qemu-system-arm"
    assert board.qemu.machine == "virt"
    assert board.qemu.cpu == "cortex-a53"
    assert board.qemu.memory == 512 * MiB
    assert board.qemu.smp == 1
    assert board.qemu.extra_args == ()
    assert board.firmware.kind == "u-boot"
    assert board.firmware.path == Path("/usr/lib/u-boot/qemu_arm64/u-boot.bin")
    assert board.kernel.arch == "arm64"
    assert board.kernel.boot_command == "booti"
    assert "virtio_blk" in board.kernel.modules
    assert board.console.device == "ttyAMA0"
    assert board.console.baud == 115200
    assert board.storage.interface == "virtio"
    assert board.storage.size == 1024 * MiB
    assert board.storage.env.offsets == (0x100000, 0x120000)
    assert board.storage.env.size == 0x4000
    assert board.storage.first_partition_offset == 4 * MiB
    assert board.boot.bootlimit == 3


def test_load_board_defaults_to_virt_a53() -> None:
    assert load_board() == load_board("qemu-virt-a53")


def test_default_board_by_path_equals_by_name(tmp_path: Path) -> None:
    path = write_board(tmp_path, DEFAULT)

    board = load_board(path)

    assert board.source == str(path)
    assert board.storage == load_board("qemu-virt-a53").storage


def test_board_names_lists_shipped_boards() -> None:
    assert "qemu-virt-a53" in board_names()


def test_unknown_board_name_lists_available() -> None:
    with pytest.raises(ConfigError) as caught:
        load_board("qemu-virt-a35")

    message = str(caught.value)
    assert "'qemu-virt-a35'" in message
    assert "qemu-virt-a53" in message


def test_missing_board_file_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read board file"):
        load_board(tmp_path / "absent.yaml")


# --------------------------------------------------------------------------
# Partition layout


def test_layout_packs_partitions_from_first_offset() -> None:
    layout = load_board().storage.layout

    assert [p.name for p in layout] == list(MBL_PARTITIONS)
    assert [p.number for p in layout] == list(range(1, 9))
    assert layout["boot"].start == 4 * MiB
    assert layout["boot"].size == 48 * MiB
    assert layout["rootfs1"].start == 52 * MiB
    assert layout["rootfs2"].start == (52 + 256) * MiB
    assert layout["home"].end == (4 + 48 + 256 * 3 + 8 + 16 + 32 + 64) * MiB
    for previous, partition in zip(layout, list(layout)[1:], strict=False):
        assert partition.start == previous.end


def test_layout_sectors_match_bytes() -> None:
    rootfs1 = load_board().storage.layout["rootfs1"]

    assert rootfs1.start_sector == 52 * MiB // SECTOR_SIZE
    assert rootfs1.size_sectors == 256 * MiB // SECTOR_SIZE
    assert rootfs1.last_sector == (52 + 256) * MiB // SECTOR_SIZE - 1


def test_layout_device_names_virtio() -> None:
    board = load_board()

    assert board.storage.layout["boot"].device == "/dev/vda1"
    assert board.storage.layout["rootfs2"].device == "/dev/vda3"
    assert board.storage.device(3) == "/dev/vda3"


def test_layout_device_names_with_prefix(tmp_path: Path) -> None:
    def mmc(data: dict[str, Any]) -> None:
        data["storage"]["guest_disk"] = "/dev/mmcblk0"
        data["storage"]["partition_prefix"] = "p"
        data["storage"]["transfer"] = {
            "interface": "virtio",
            "guest_disk": "/dev/vda",
        }

    board = load_changed(tmp_path, mmc)

    assert board.storage.layout["rootfs1"].device == "/dev/mmcblk0p2"
    assert board.storage.device(8) == "/dev/mmcblk0p8"


def test_layout_unknown_partition_is_key_error() -> None:
    with pytest.raises(KeyError, match="rootfs3"):
        load_board().storage.layout["rootfs3"]


def test_layout_disk_geometry() -> None:
    layout = load_board().storage.layout

    assert layout.disk_size == 1024 * MiB
    assert layout.disk_sectors == 2 * 1024 * 1024
    assert layout.last_usable_byte == 1024 * MiB - 33 * SECTOR_SIZE - 1


def test_layout_extra_partition_allowed(tmp_path: Path) -> None:
    def add(data: dict[str, Any]) -> None:
        data["storage"]["partitions"].append(
            {"name": "extra", "size": "1M", "fs": "ext4"}
        )

    board = load_changed(tmp_path, add)

    assert board.storage.layout["extra"].number == 9


def test_layout_last_partition_may_fill_disk(tmp_path: Path) -> None:
    # The partitions then end at 1023 MiB: the last aligned end before the
    # backup GPT in the last 33 sectors of the 1 GiB disk.
    board = load_changed(tmp_path, set_key("storage.partitions.7.size", "147M"))

    assert board.storage.layout["home"].end == 1023 * MiB


def test_sizes_accept_integers_hex_and_units(tmp_path: Path) -> None:
    def sizes(data: dict[str, Any]) -> None:
        data["storage"]["env"]["size"] = "0x4000"
        data["storage"]["size"] = 1 << 30
        data["storage"]["partitions"][0]["size"] = "49152K"

    board = load_changed(tmp_path, sizes)

    assert board.storage.env.size == 0x4000
    assert board.storage.size == 1 << 30
    assert board.storage.layout["boot"].size == 48 * MiB


# --------------------------------------------------------------------------
# Validation messages: file, key path, value seen and what is allowed

ERROR_CASES = [
    pytest.param(
        set_key("qemu.smp", 0), "qemu.smp", 0, "an integer of at least 1", id="smp-zero"
    ),
    pytest.param(
        set_key("qemu.smp", True), "qemu.smp", True, "an integer", id="smp-boolean"
    ),
    pytest.param(
        set_key("qemu.memory", "512X"),
        "qemu.memory",
        "512X",
        "binary unit K, M or G",
        id="memory-bad-unit",
    ),
    pytest.param(
        set_key("qemu.memory", "1500K"),
        "qemu.memory",
        "1500K",
        "a whole number of MiB",
        id="memory-not-mib",
    ),
    pytest.param(
        set_key("qemu", "virt"),
        "qemu",
        "virt",
        "a mapping with the keys binary, package",
        id="section-not-mapping",
    ),
    pytest.param(
        set_key("qemu.extra_args", "-s"),
        "qemu.extra_args",
        "-s",
        "a list of strings",
        id="extra-args-not-list",
    ),
    pytest.param(
        set_key("firmware.kind", "grub"),
        "firmware.kind",
        "grub",
        "one of 'u-boot'",
        id="firmware-kind",
    ),
    pytest.param(
        set_key("firmware.path", "u-boot.bin"),
        "firmware.path",
        "u-boot.bin",
        "an absolute path",
        id="firmware-relative-path",
    ),
    pytest.param(
        set_key("kernel.arch", "amd64"),
        "kernel.arch",
        "amd64",
        "one of 'arm64', 'armhf'",
        id="kernel-arch",
    ),
    pytest.param(
        set_key("kernel.image_type", "zImage"),
        "kernel.image_type",
        "zImage",
        "'Image', the image of arm64 kernels",
        id="kernel-image-type-mismatch",
    ),
    pytest.param(
        set_key("kernel.modules", ["virtio blk"]),
        "kernel.modules[0]",
        "virtio blk",
        "a kernel module name",
        id="kernel-module-name",
    ),
    pytest.param(
        set_key("console.baud", 12345),
        "console.baud",
        12345,
        "one of 9600,",
        id="console-baud",
    ),
    pytest.param(
        set_key("console.device", "/dev/ttyAMA0"),
        "console.device",
        "/dev/ttyAMA0",
        "a tty name such as ttyAMA0",
        id="console-device",
    ),
    pytest.param(
        set_key("storage.interface", "usb"),
        "storage.interface",
        "usb",
        "one of 'virtio', 'sd', 'sdhci-pci'",
        id="storage-interface",
    ),
    pytest.param(
        set_key("storage.partition_prefix", "-"),
        "storage.partition_prefix",
        "-",
        "one of '', 'p'",
        id="partition-prefix",
    ),
    pytest.param(
        set_key("storage.partitions.2.size", "48Q"),
        "storage.partitions[2].size",
        "48Q",
        "binary unit K, M or G",
        id="partition-size-unit",
    ),
    pytest.param(
        set_key("storage.partitions.2.size", "1536K"),
        "storage.partitions[2].size",
        "1536K",
        "a whole number of MiB",
        id="partition-not-aligned",
    ),
    pytest.param(
        set_key("storage.partitions.4.fs", "btrfs"),
        "storage.partitions[4].fs",
        "btrfs",
        "one of 'vfat', 'ext4'",
        id="partition-fs",
    ),
    pytest.param(
        set_key("storage.partitions.7.size", "148M"),
        "storage.partitions[7].size",
        "148M",
        "at most 155172352 bytes",
        id="partition-past-backup-gpt",
    ),
    pytest.param(
        set_key("storage.first_partition_offset", "4100K"),
        "storage.first_partition_offset",
        "4100K",
        "a whole number of MiB",
        id="first-offset-not-aligned",
    ),
    pytest.param(
        set_key("storage.env.size", 4),
        "storage.env.size",
        4,
        "a positive multiple of 512",
        id="env-size-too-small",
    ),
    pytest.param(
        set_key("storage.env.size", 0x4001),
        "storage.env.size",
        0x4001,
        "a positive multiple of 512",
        id="env-size-not-sectors",
    ),
    pytest.param(
        set_key("storage.env.size", "8M"),
        "storage.env.size",
        "8M",
        "at most 2088448 bytes, so that both copies fit",
        id="env-size-above-space",
    ),
    pytest.param(
        set_key("storage.env.offsets", [0x100000]),
        "storage.env.offsets",
        [0x100000],
        "exactly two offsets",
        id="env-one-copy",
    ),
    pytest.param(
        set_key("storage.env.offsets", [0x2000, 0x120000]),
        "storage.env.offsets[0]",
        0x2000,
        "an offset from 17408 (after the primary GPT)",
        id="env-overlaps-gpt",
    ),
    pytest.param(
        set_key("storage.env.offsets", [0x100000, 0x3FE000]),
        "storage.env.offsets[1]",
        0x3FE000,
        "ends before the first partition at 4194304",
        id="env-overlaps-first-partition",
    ),
    pytest.param(
        set_key("storage.env.offsets", [0x100000, 0x102000]),
        "storage.env.offsets[1]",
        0x102000,
        "so that the copies do not overlap",
        id="env-copies-overlap",
    ),
    pytest.param(
        set_key("storage.env.offsets", [0x100000, 0x100100]),
        "storage.env.offsets[1]",
        0x100100,
        "a multiple of 512",
        id="env-offset-not-sector",
    ),
    pytest.param(
        set_key("boot.bootlimit", 0),
        "boot.bootlimit",
        0,
        "an integer from 1 to 9",
        id="bootlimit-zero",
    ),
    pytest.param(
        set_key("boot.bootlimit", 10),
        "boot.bootlimit",
        10,
        "an integer from 1 to 9",
        id="bootlimit-two-digits",
    ),
    pytest.param(
        set_key("name", "Qemu_Virt"),
        "name",
        "Qemu_Virt",
        "lower-case letters, digits and '-'",
        id="name-characters",
    ),
]


@pytest.mark.parametrize(("change", "key", "value", "allowed"), ERROR_CASES)
def test_invalid_value_message(
    tmp_path: Path,
    change: Callable[[dict[str, Any]], None],
    key: str,
    value: object,
    allowed: str,
) -> None:
    error = error_for(tmp_path, change)

    assert error.key == key
    assert error.value == value
    assert allowed in error.allowed
    message = str(error)
    assert message.startswith(f"{tmp_path}/")
    assert f": {key}: " in message
    assert repr(value) in message
    assert allowed in message


def test_unknown_key_suggests_close_match(tmp_path: Path) -> None:
    def typo(data: dict[str, Any]) -> None:
        data["qemu"]["memroy"] = data["qemu"].pop("memory")

    error = error_for(tmp_path, typo)

    assert error.key == "qemu.memroy"
    message = str(error)
    assert "unknown key 'memroy' (did you mean 'memory'?)" in message
    assert "one of the keys binary, package, machine, cpu, memory" in message


def test_unknown_key_in_partition_entry(tmp_path: Path) -> None:
    error = error_for(tmp_path, set_key("storage.partitions.1.label", "root"))

    assert error.key == "storage.partitions[1].label"
    assert "one of the keys name, size, fs" in str(error)


def test_unknown_top_level_key(tmp_path: Path) -> None:
    error = error_for(tmp_path, set_key("bootloader", {}))

    assert error.key == "bootloader"
    assert "unknown key 'bootloader'" in str(error)


def test_missing_key_named(tmp_path: Path) -> None:
    error = error_for(tmp_path, delete_key("kernel.arch"))

    assert error.key == "kernel.arch"
    assert error.value is None
    assert "kernel.arch: missing key" in str(error)


def test_duplicate_partition_name(tmp_path: Path) -> None:
    error = error_for(tmp_path, set_key("storage.partitions.7.name", "log"))

    assert error.key == "storage.partitions[7].name"
    assert error.value == "log"
    assert "duplicate partition 'log'" in str(error)


def test_missing_mbl_partition(tmp_path: Path) -> None:
    error = error_for(tmp_path, set_key("storage.partitions.7.name", "homes"))

    assert error.key == "storage.partitions"
    assert "missing partition 'home'" in str(error)
    assert ", ".join(MBL_PARTITIONS) in str(error)


def test_name_must_match_file_name(tmp_path: Path) -> None:
    data = copy.deepcopy(DEFAULT)
    path = tmp_path / "other-board.yaml"
    path.write_text(yaml.safe_dump(data))

    with pytest.raises(BoardError) as caught:
        load_board(path)

    assert caught.value.key == "name"
    assert "'other-board', the file's name without .yaml" in str(caught.value)


def test_duplicate_yaml_key_rejected() -> None:
    text = "name: x\nname: y\n"

    with pytest.raises(BoardError) as caught:
        parse_board(text, "boards/x.yaml")

    message = str(caught.value)
    assert message.startswith("boards/x.yaml: line 2, column 1: duplicate key 'name'")
    assert message.endswith("expected each key once in a mapping")
    assert "YAML mapping" not in message


def test_invalid_yaml_names_file() -> None:
    with pytest.raises(BoardError) as caught:
        parse_board("qemu: [unclosed\n", "boards/x.yaml")

    message = str(caught.value)
    assert message.startswith("boards/x.yaml: invalid YAML at line 2, column 1: ")
    assert "(while parsing a flow sequence at line 1, column 7)" in message
    assert "<unicode string>" not in message


def test_invalid_yaml_character_located() -> None:
    with pytest.raises(BoardError) as caught:
        parse_board("name: \x00\n", "boards/x.yaml")

    message = str(caught.value)
    assert message.startswith("boards/x.yaml: invalid YAML at character 7: ")
    assert "found #x0000" in message
    assert "<unicode string>" not in message


@pytest.mark.parametrize(
    ("text", "shown"),
    [("? [a, b]\n: 1\n", "key ['a', 'b'] is a list"), ("? {a: 1}\n: 1\n", "a dict")],
    ids=["list", "mapping"],
)
def test_unhashable_yaml_key_rejected(text: str, shown: str) -> None:
    with pytest.raises(BoardError) as caught:
        parse_board(text, "boards/x.yaml")

    message = str(caught.value)
    assert message.startswith("boards/x.yaml: line 1, column 3: ")
    assert shown in message
    assert "expected a plain key such as a name" in message


def test_board_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"name: caf\xe9\n")

    with pytest.raises(ConfigError) as caught:
        load_board(path)

    assert str(caught.value).startswith(
        f"cannot read board file {path}: not UTF-8 text (byte 0xe9 at offset 9)"
    )


def test_top_level_not_mapping() -> None:
    with pytest.raises(BoardError, match="expected a mapping with the keys name"):
        parse_board("- a\n- b\n", "boards/x.yaml")


# --------------------------------------------------------------------------
# Host checks


def test_host_requirements_name_packages() -> None:
    requirements = {req.purpose: req for req in host_requirements(load_board())}

    assert requirements["QEMU"].path == "qemu-system-aarch64"
    assert requirements["QEMU"].package == "qemu-system-arm"
    assert requirements["firmware"].path == "/usr/lib/u-boot/qemu_arm64/u-boot.bin"
    assert requirements["firmware"].package == "u-boot-qemu"
    assert requirements["disk overlays"].package == "qemu-utils"


def test_check_host_passes_when_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(HostRequirement, "is_present", lambda self: True)

    check_host(load_board())


def test_host_requirement_finds_file(tmp_path: Path) -> None:
    firmware = tmp_path / "u-boot.bin"
    firmware.write_bytes(b"\0")

    assert HostRequirement("firmware", str(firmware), "u-boot-qemu").is_present()
    assert not HostRequirement("firmware", str(tmp_path / "x"), "x").is_present()
    assert HostRequirement("shell", "sh", "dash").is_present()


def test_check_host_names_missing_package(tmp_path: Path) -> None:
    def absent(data: dict[str, Any]) -> None:
        data["firmware"]["path"] = str(tmp_path / "absent.bin")
        data["qemu"]["binary"] = "qemu-system-absent"

    board = load_changed(tmp_path, absent)

    with pytest.raises(ConfigError) as caught:
        check_host(board)
    message = str(caught.value)
    assert f"firmware: {tmp_path}/absent.bin (package u-boot-qemu)" in message
    assert "QEMU: qemu-system-absent (package qemu-system-arm)" in message
    assert "apt-get install --no-install-recommends qemu-system-arm u-boot-qemu" in (
        message
    )
