"""Board files of the board ports: the shipped boards and the keys they added."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from mbl_sim.board import board_names, host_requirements, load_board
from mbl_sim.errors import BoardError, ConfigError

MiB = 1 << 20
BOARDS_DIR = Path(__file__).parents[2] / "mbl_sim" / "boards"
SHIPPED = ["imx6ul-evk", "imx7-warp", "qemu-virt-a15", "qemu-virt-a53", "rpi3"]


def board_data(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((BOARDS_DIR / f"{name}.yaml").read_text())
    return data


def error_for(
    tmp_path: Path, name: str, change: Callable[[dict[str, Any]], None]
) -> BoardError:
    data = copy.deepcopy(board_data(name))
    change(data)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(BoardError) as caught:
        load_board(path)
    return caught.value


def test_shipped_boards_listed() -> None:
    assert board_names() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_board_loads(name: str) -> None:
    board = load_board(name)

    assert board.name == name
    assert board.description
    assert board.storage.layout["rootfs1"].device.startswith(board.storage.guest_disk)


def test_virt_a15_is_armhf_with_bootz() -> None:
    board = load_board("qemu-virt-a15")

    assert board.qemu.binary == "qemu-system-arm"
    assert board.qemu.machine == "virt,highmem=off"
    assert board.kernel.arch == "armhf"
    assert board.kernel.boot_command == "bootz"
    assert board.kernel.file_name == "zImage"
    assert board.firmware.path == Path("/usr/lib/u-boot/qemu_arm/u-boot.bin")
    assert board.device_tree.file is None


def test_rpi3_uses_archive_u_boot_and_sd() -> None:
    board = load_board("rpi3")

    assert board.qemu.cpu is None
    assert board.qemu.smp is None
    assert board.firmware.source == "archive"
    assert board.firmware.load == "kernel"
    assert board.firmware.prompt == "U-Boot> "
    assert board.firmware.own_env == "fat-file"
    assert board.kernel.file_name == "Image.gz"
    assert board.console.device == "ttyS1"
    assert board.console.serial_port == 1
    assert board.storage.interface == "sd"
    assert board.storage.uboot_command == "mmc"
    assert board.storage.transfer.interface == "partition"
    assert board.storage.transfer.guest_disk == "/dev/mmcblk0p9"
    assert board.device_tree.file == "broadcom/bcm2837-rpi-3-b.dtb"


@pytest.mark.parametrize(
    ("name", "disk", "index"),
    [("imx7-warp", "/dev/mmcblk2", 2), ("imx6ul-evk", "/dev/mmcblk0", 0)],
)
def test_imx_boards_boot_directly(name: str, disk: str, index: int) -> None:
    board = load_board(name)

    assert not board.firmware.is_u_boot
    assert board.firmware.path is None
    assert board.boot.state == "flag-files"
    assert board.storage.env is None
    assert board.storage.sd_index == index
    assert board.storage.guest_disk == disk
    assert board.storage.layout["bootflags"].fs == "ext4"
    assert board.console.device == "ttymxc0"


def test_archive_firmware_not_a_host_requirement() -> None:
    purposes = [req.purpose for req in host_requirements(load_board("rpi3"))]

    assert "firmware" not in purposes
    assert "QEMU" in purposes


def test_direct_boot_needs_no_firmware_on_host() -> None:
    purposes = [req.purpose for req in host_requirements(load_board("imx7-warp"))]

    assert purposes == ["QEMU", "disk overlays"]


def set_key(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
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


def update_storage(**values: object) -> Callable[[dict[str, Any]], None]:
    """Return a change that sets several storage keys; None deletes a key."""

    def change(data: dict[str, Any]) -> None:
        for key, value in values.items():
            if value is None:
                data["storage"].pop(key, None)
            else:
                data["storage"][key] = value

    return change


SD_TRANSFER = {"interface": "sd", "guest_disk": "/dev/mmcblk1"}
VIRTIO_TRANSFER = {"interface": "virtio", "guest_disk": "/dev/vda"}

ERROR_CASES = [
    pytest.param(
        "qemu-virt-a53",
        set_key("firmware.kind", "grub"),
        "firmware.kind",
        "one of 'u-boot', 'none'",
        id="firmware-kind",
    ),
    pytest.param(
        "imx7-warp",
        set_key("firmware.package", "u-boot-imx"),
        "firmware.package",
        "firmware kind 'none' takes no other keys",
        id="firmware-none-extra-key",
    ),
    pytest.param(
        "rpi3",
        set_key("firmware.source", "web"),
        "firmware.source",
        "one of 'host', 'archive'",
        id="firmware-source",
    ),
    pytest.param(
        "rpi3",
        set_key("firmware.load", "pflash"),
        "firmware.load",
        "one of 'bios', 'kernel'",
        id="firmware-load",
    ),
    pytest.param(
        "rpi3",
        set_key("firmware.buffer_address", "0x10000100"),
        "firmware.buffer_address",
        "a whole MiB",
        id="buffer-not-mib",
    ),
    pytest.param(
        "rpi3",
        set_key("firmware.own_env", "spi-flash"),
        "firmware.own_env",
        "one of 'unusable', 'fat-file'",
        id="own-env",
    ),
    pytest.param(
        "qemu-virt-a15",
        set_key("kernel.compression", "gzip"),
        "kernel.compression",
        "'none' for a zImage",
        id="gzip-zimage",
    ),
    pytest.param(
        "qemu-virt-a53",
        set_key("kernel.compression", "lz4"),
        "kernel.compression",
        "one of 'none', 'gzip'",
        id="compression-unknown",
    ),
    pytest.param(
        "imx7-warp",
        set_key("device_tree.storage", "soc/mmc@30b60000"),
        "device_tree.storage",
        "an absolute device tree node path",
        id="node-path-relative",
    ),
    pytest.param(
        "imx7-warp",
        set_key("device_tree.file", "imx7s-warp.dts"),
        "device_tree.file",
        "a .dtb path",
        id="dtb-file-suffix",
    ),
    pytest.param(
        "qemu-virt-a53",
        delete_key("device_tree.console"),
        "device_tree.console",
        "this key, which is required",
        id="console-node-missing",
    ),
    pytest.param(
        "rpi3",
        set_key("console.serial_port", 4),
        "console.serial_port",
        "an integer from 0 to 3",
        id="serial-port-range",
    ),
    pytest.param(
        "rpi3",
        set_key("storage.size", "1536M"),
        "storage.size",
        "a power of two",
        id="sd-size-power-of-two",
    ),
    pytest.param(
        "imx7-warp",
        set_key("storage.sd_index", 4),
        "storage.sd_index",
        "an integer from 0 to 3",
        id="sd-index-range",
    ),
    pytest.param(
        "rpi3",
        delete_key("storage.transfer"),
        "storage.transfer",
        "required for storage interface 'sd'",
        id="transfer-missing-for-sd",
    ),
    pytest.param(
        "rpi3",
        set_key("storage.transfer.partition", "scratch"),
        "storage.transfer.partition",
        "the name of a partition with fs: none",
        id="transfer-partition-has-filesystem",
    ),
    pytest.param(
        "rpi3",
        set_key("storage.transfer.interface", "usb"),
        "storage.transfer.interface",
        "one of 'virtio', 'sd', 'partition'",
        id="transfer-interface",
    ),
    pytest.param(
        "qemu-virt-a53",
        set_key("boot.state", "flag-files"),
        "boot",
        "boot state 'flag-files' is for boards without U-Boot",
        id="flag-files-with-u-boot",
    ),
    pytest.param(
        "imx7-warp",
        set_key("boot.state", "u-boot-env"),
        "boot",
        "boot state 'u-boot-env' needs U-Boot",
        id="u-boot-env-without-u-boot",
    ),
    pytest.param(
        "qemu-virt-a53",
        delete_key("storage.env"),
        "storage.env",
        "boot.state u-boot-env requires",
        id="env-missing",
    ),
    pytest.param(
        "imx7-warp",
        set_key("storage.env", {"offsets": [0x100000, 0x120000], "size": 0x4000}),
        "storage.env",
        "a flag-files board keeps no U-Boot environment; expected no env key",
        id="env-with-flag-files",
    ),
    pytest.param(
        "imx7-warp",
        update_storage(sd_index=0, transfer={**SD_TRANSFER, "index": 0}),
        "storage.transfer.index",
        "card slot 0 is also storage.sd_index",
        id="transfer-slot-of-storage",
    ),
    pytest.param(
        "rpi3",
        update_storage(transfer=SD_TRANSFER),
        "storage.transfer.index",
        "missing key: the default slot 0 is also storage.sd_index",
        id="transfer-default-slot-of-storage",
    ),
    pytest.param(
        "qemu-virt-a53",
        update_storage(
            interface="sdhci-pci",
            guest_disk="/dev/mmcblk0",
            partition_prefix="p",
            transfer=VIRTIO_TRANSFER,
        ),
        "storage.interface",
        "u-boot-qemu 2023.01) has no MMC driver",
        id="sdhci-pci-with-u-boot",
    ),
    pytest.param(
        "rpi3",
        update_storage(interface="sdhci-pci"),
        "storage.interface",
        "storage interface 'sdhci-pci' needs PCI",
        id="sdhci-pci-on-raspi3b",
    ),
    pytest.param(
        "imx7-warp",
        update_storage(interface="sdhci-pci", sd_index=None),
        "storage.interface",
        "expected 'sd' (the SoC's card slot) on machine 'mcimx7d-sabre'",
        id="sdhci-pci-on-mcimx7d-sabre",
    ),
    pytest.param(
        "imx6ul-evk",
        update_storage(interface="virtio", sd_index=None),
        "storage.interface",
        "storage interface 'virtio' needs PCI",
        id="virtio-on-mcimx6ul-evk",
    ),
    pytest.param(
        "rpi3",
        update_storage(transfer=VIRTIO_TRANSFER),
        "storage.transfer.interface",
        "transfer interface 'virtio' needs PCI",
        id="virtio-transfer-on-raspi3b",
    ),
    pytest.param(
        "qemu-virt-a53",
        update_storage(sd_index=1),
        "storage.sd_index",
        "storage interface 'virtio' has no card slot; expected no sd_index key",
        id="sd-index-on-virtio",
    ),
    pytest.param(
        "rpi3",
        set_key("storage.transfer.index", 1),
        "storage.transfer.index",
        "transfer interface 'partition' has no card slot",
        id="transfer-index-on-partition",
    ),
    pytest.param(
        "rpi3",
        set_key("storage.transfer.guest_disk", "/dev/mmcblk1"),
        "storage.transfer.guest_disk",
        "the transfer partition's device is the guest disk",
        id="transfer-guest-disk-on-partition",
    ),
    pytest.param(
        "qemu-virt-a53",
        update_storage(transfer={**VIRTIO_TRANSFER, "partition": "scratch"}),
        "storage.transfer.partition",
        "transfer interface 'virtio' is a whole disk",
        id="transfer-partition-on-virtio",
    ),
    pytest.param(
        "qemu-virt-a53",
        update_storage(guest_disk="/dev/vdz"),
        "storage.transfer",
        "no disk name follows storage.guest_disk /dev/vdz",
        id="default-transfer-after-vdz",
    ),
    pytest.param(
        "imx7-warp",
        set_key("storage.partitions.8.name", "flags"),
        "storage.partitions",
        "missing ext4 partition 'bootflags'",
        id="bootflags-missing",
    ),
    pytest.param(
        "imx6ul-evk",
        set_key("boot.state", "files"),
        "boot.state",
        "one of 'u-boot-env', 'flag-files'",
        id="boot-state-unknown",
    ),
]


@pytest.mark.parametrize(("name", "change", "key", "expected"), ERROR_CASES)
def test_invalid_port_key_message(
    tmp_path: Path,
    name: str,
    change: Callable[[dict[str, Any]], None],
    key: str,
    expected: str,
) -> None:
    error = error_for(tmp_path, name, change)

    assert error.key == key
    message = str(error)
    assert message.startswith(f"{tmp_path}/{name}.yaml: {key}: ")
    assert expected in message


def test_cpu_and_smp_optional(tmp_path: Path) -> None:
    data = board_data("qemu-virt-a53")
    del data["qemu"]["cpu"]
    del data["qemu"]["smp"]
    path = tmp_path / "qemu-virt-a53.yaml"
    path.write_text(yaml.safe_dump(data))

    board = load_board(path)

    assert board.qemu.cpu is None
    assert board.qemu.smp is None


def test_defaults_of_optional_firmware_keys() -> None:
    firmware = load_board("qemu-virt-a53").firmware

    assert firmware.source == "host"
    assert firmware.load == "bios"
    assert firmware.prompt == "=> "
    assert firmware.buffer_address == 0x50000000
    assert firmware.own_env == "unusable"


def test_virtio_transfer_defaults_to_next_disk() -> None:
    transfer = load_board("qemu-virt-a53").storage.transfer

    assert transfer.interface == "virtio"
    assert transfer.guest_disk == "/dev/vdb"


def test_sd_transfer_in_other_slot(tmp_path: Path) -> None:
    data = board_data("imx7-warp")
    data["storage"]["transfer"] = {
        "interface": "sd",
        "index": 0,
        "guest_disk": "/dev/mmcblk0",
    }
    path = tmp_path / "imx7-warp.yaml"
    path.write_text(yaml.safe_dump(data))

    transfer = load_board(path).storage.transfer

    assert transfer.interface == "sd"
    assert transfer.index == 0
    assert transfer.guest_disk == "/dev/mmcblk0"


def sdhci_pci_variant(data: dict[str, Any]) -> None:
    """Change qemu-virt-a15 into a board whose card is on sdhci-pci, booted
    without U-Boot, as the SD storage integration test builds it."""
    data["firmware"] = {"kind": "none"}
    storage = data["storage"]
    storage.update(interface="sdhci-pci", guest_disk="/dev/mmcblk0")
    storage["partition_prefix"] = "p"
    del storage["env"]
    storage["partitions"].append({"name": "bootflags", "size": "4M", "fs": "ext4"})
    storage["transfer"] = dict(VIRTIO_TRANSFER)
    data["boot"]["state"] = "flag-files"


@pytest.mark.parametrize("machine", ["virt,highmem=off", "virt-7.2,highmem=off"])
def test_sdhci_pci_without_u_boot_loads(tmp_path: Path, machine: str) -> None:
    data = board_data("qemu-virt-a15")
    sdhci_pci_variant(data)
    data["qemu"]["machine"] = machine
    path = tmp_path / "qemu-virt-a15.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))

    storage = load_board(path).storage

    assert storage.interface == "sdhci-pci"
    assert storage.transfer.interface == "virtio"
    assert storage.transfer.guest_disk == "/dev/vda"


def test_require_env_on_flag_board_names_state() -> None:
    storage = load_board("imx6ul-evk").storage

    with pytest.raises(ConfigError, match="boot state is in flag files"):
        storage.require_env()
