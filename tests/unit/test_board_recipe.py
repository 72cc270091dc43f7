"""What the image recipe derives from each board file: boot script, device settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mbl_sim.board import load_board
from mbl_sim.errors import ConfigError
from mbl_sim.images.recipe import FLAGS_MOUNT_POINT, ImageBuilder


def builder(name: str) -> ImageBuilder:
    return ImageBuilder(load_board(name))


def script_lines(name: str) -> list[str]:
    return [
        line.strip()
        for line in builder(name).render_boot_script().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_virt_a53_script_boots_image_from_virtio() -> None:
    lines = script_lines("qemu-virt-a53")

    assert "virtio dev 0" in lines
    assert "virtio read ${buf_a} 0x800 0x20" in lines
    assert "virtio write ${target} ${target_block} 0x20" in lines
    assert "load virtio 0:1 ${kaddr} Image" in lines
    assert "booti ${kaddr} ${raddr}:${filesize} ${faddr}" in lines
    assert "buf_a=0x50000000" in lines
    assert "flag_addr_b=0x50100004" in lines
    assert not any(line.startswith("unzip") for line in lines)
    assert not any("board.dtb" in line for line in lines)


def test_virt_a15_script_uses_bootz() -> None:
    lines = script_lines("qemu-virt-a15")

    assert "load virtio 0:1 ${kaddr} zImage" in lines
    assert "bootz ${kaddr} ${raddr}:${filesize} ${faddr}" in lines
    assert 'echo "mbl-boot: bootz failed"' in lines


def test_rpi3_script_reads_mmc_and_unzips() -> None:
    lines = script_lines("rpi3")

    assert "mmc dev 0" in lines
    assert "mmc read ${buf_a} 0x800 0x20" in lines
    assert "buf_a=0x10000000" in lines
    assert "load mmc 0:1 ${daddr} board.dtb" in lines
    assert "faddr=${daddr}" in lines
    assert "load mmc 0:1 0x10400000 Image.gz" in lines
    assert "unzip 0x10400000 ${kaddr}" in lines
    # The initramfs is loaded last, so that ${filesize} is its size.
    initrd = lines.index("load mmc 0:1 ${raddr} initrd.img")
    assert lines[initrd + 1] == "booti ${kaddr} ${raddr}:${filesize} ${faddr}"


def test_script_appends_board_bootargs() -> None:
    rpi3 = [line for line in script_lines("rpi3") if line.startswith("setenv bootargs")]
    a53 = [
        line
        for line in script_lines("qemu-virt-a53")
        if line.startswith("setenv bootargs")
    ]

    assert rpi3[0].endswith('mbl.envcopy=${env_copy} mbl.loglevel=4"')
    assert a53[0].endswith('mbl.envcopy=${env_copy} "')


def test_script_keeps_boot_loader_addresses_before_import() -> None:
    lines = script_lines("rpi3")

    # env import -d replaces the whole environment, so addresses are copied first.
    first_import = next(i for i, line in enumerate(lines) if "env import" in line)
    assert lines.index("daddr=${fdt_addr_r}") < first_import
    assert lines.index("kaddr=${kernel_addr_r}") < first_import


def test_flag_board_has_no_boot_script() -> None:
    with pytest.raises(ConfigError, match="flag files"):
        builder("imx7-warp").render_boot_script()


def test_boot_partition_files() -> None:
    files = builder("rpi3").boot_partition_files(Path("/k"), Path("/i"), Path("/o"))

    assert sorted(files) == ["Image.gz", "board.dtb", "boot.scr", "initrd.img"]


def test_flag_board_device_config() -> None:
    config = builder("imx7-warp").device_config()

    assert config["boot_state"] == "flag-files"
    assert config["flag_dir"] == FLAGS_MOUNT_POINT
    assert "fw_env_config" not in config
    assert config["slots"] == {"a": "/dev/mmcblk2p2", "b": "/dev/mmcblk2p3"}


def test_u_boot_board_device_config_unchanged() -> None:
    config = builder("qemu-virt-a53").device_config()

    assert json.dumps(config, sort_keys=True) == json.dumps(
        {
            "board": "qemu-virt-a53",
            "bootlimit": 3,
            "fw_env_config": "/etc/fw_env.config",
            "scratch_dir": "/scratch",
            "slots": {"a": "/dev/vda2", "b": "/dev/vda3"},
        },
        sort_keys=True,
    )


def test_flag_board_mounts_bootflags() -> None:
    entries = builder("imx6ul-evk").mount_entries()

    flags = [e for e in entries if e.mount_point == FLAGS_MOUNT_POINT]
    assert [e.device for e in flags] == ["/dev/mmcblk0p9"]
    assert builder("imx6ul-evk").fw_env_lines() == []


def test_flag_board_initramfs_settings() -> None:
    settings = builder("imx7-warp").flag_boot_settings()

    assert settings == {
        "MBL_FLAGS_DEVICE": "/dev/mmcblk2p9",
        "MBL_SLOT_A": "/dev/mmcblk2p2",
        "MBL_SLOT_B": "/dev/mmcblk2p3",
        "MBL_BOOTLIMIT": "3",
    }
    assert builder("qemu-virt-a53").flag_boot_settings() == {}


def test_direct_boot_command_line() -> None:
    bootargs = builder("imx6ul-evk").direct_bootargs()

    assert bootargs.startswith("console=ttymxc0,115200 ")
    assert "mbl.loglevel=4" in bootargs
    assert "root=" not in bootargs
    assert builder("rpi3").direct_bootargs() == ""


def test_direct_boot_patch_only_without_u_boot() -> None:
    patch = builder("imx7-warp").direct_boot_patch(initrd_size=1000)

    assert patch is not None
    assert patch.stdout_path == "/soc/bus@30800000/spba-bus@30800000/serial@30860000"
    assert patch.memory_size == 1 << 30
    assert patch.initrd_size == 1000
    assert builder("qemu-virt-a15").direct_boot_patch(initrd_size=1000) is None
