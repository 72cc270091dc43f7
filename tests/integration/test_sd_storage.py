"""SD-attached storage on real guests.

Covered: QEMU's write log behind the SoC's card slot, writes that are durable once
complete, and a card on a PCI SDHCI controller. The Raspberry Pi keeps U-Boot's own
environment as a FAT file, and the crash states of its ``saveenv`` are checked too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mbl_sim.board import load_board
from mbl_sim.campaign.fat_env import saveenv_campaign
from mbl_sim.device import Device
from mbl_sim.images.recipe import ImageBuilder
from mbl_sim.storage import AfterWrites, volatile_indices

pytestmark = pytest.mark.qemu

FLAG_FILE_BOARD = "imx6ul-evk"
FAT_ENV_BOARD = "rpi3"
BOARDS_DIR = Path(__file__).parents[2] / "mbl_sim" / "boards"


def sdhci_pci_board(directory: Path) -> Path:
    """Write a variant of qemu-virt-a15 whose disk is an SD card on a PCI SDHCI
    controller. u-boot-qemu has no MMC driver, so QEMU boots the kernel directly
    and the boot state is flag files."""
    data = yaml.safe_load((BOARDS_DIR / "qemu-virt-a15.yaml").read_text())
    data["name"] = "virt-sdhci"
    data["firmware"] = {"kind": "none"}
    data["kernel"]["modules"] = [
        *data["kernel"]["modules"],
        "sdhci",
        "sdhci_pci",
        "mmc_block",
    ]
    storage = data["storage"]
    storage.update(interface="sdhci-pci", guest_disk="/dev/mmcblk0")
    storage["partition_prefix"] = "p"
    del storage["env"]
    storage["partitions"].append({"name": "bootflags", "size": "4M", "fs": "ext4"})
    storage["transfer"] = {"interface": "virtio", "guest_disk": "/dev/vda"}
    data["boot"]["state"] = "flag-files"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "virt-sdhci.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_sdhci_pci_keeps_writes(tmp_path: Path) -> None:
    board = load_board(sdhci_pci_board(tmp_path / "boards"))
    images = ImageBuilder(board).build()
    with Device(images, tmp_path / "device") as device:
        model = device.attach_storage_model()
        device.power_on()

        assert device.check_output("mount | grep ' on / '").startswith(
            "/dev/mmcblk0p2 "
        )
        device.check_output("echo kept > /home/kept; sync")
        assert model.read_log().entries
        cut = device.power_cut()
        assert cut is not None
        assert cut.dropped_writes == 0
        device.power_on()
        assert device.check_output("cat /home/kept") == "kept\n"


def test_sd_writes_durable_once_complete(tmp_path: Path) -> None:
    images = ImageBuilder(load_board(FLAG_FILE_BOARD)).build()
    with Device(images, tmp_path / "device") as device:
        model = device.attach_storage_model()
        device.power_on()
        device.check_output("echo first > /home/first; sync")
        session_log = model.read_log()
        writes = [entry for entry in session_log.entries if entry.is_write]
        assert writes
        assert all(entry.is_fua for entry in writes)
        assert volatile_indices(session_log, len(session_log)) == []

        device.arm_power_cut(AfterWrites(1))
        device.check_output("echo second > /home/second; sync")
        cut = device.wait_for_power_cut(timeout=60)

        assert cut.dropped_writes == 0
        assert cut.durable_writes >= len(writes) + 1
        # The second sync writes data, journal blocks and a commit block. The cut
        # after the first of them leaves the file out, but the filesystem mounts.
        device.power_on()
        assert device.booted_slot == "a"
        assert device.check_output("cat /home/first") == "first\n"
        assert device.run("test -e /home/second").exit_status == 1


def test_fat_saveenv_states_lose_env(tmp_path: Path) -> None:
    images = ImageBuilder(load_board(FAT_ENV_BOARD)).build()

    result = saveenv_campaign(images, tmp_path)

    verdicts = [state.verdict for state in result.states]
    assert "FAT" in result.saved
    assert result.writes > 1
    assert len(result.states) == len(set(s.label for s in result.states))
    assert verdicts[0] == "old"
    assert verdicts[-1] == "new"
    assert result.count("lost") > 0, result.describe()
    # fatwrite rewrites the file in place: once the new environment is complete,
    # the later writes (FAT and directory entry) never take it away again.
    first_new = verdicts.index("new")
    assert set(verdicts[first_new:]) == {"new"}
    assert f"{result.count('lost')} have none" in result.describe()
