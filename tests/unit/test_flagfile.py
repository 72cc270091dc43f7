"""Flag-file boot state: reading, flipping, marking good, and the slots hook."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from updater import flagfile
from updater.config import parse_config
from updater.errors import ConfigError, SlotError
from updater.flagfile import FlagFiles
from updater.slots import (
    boot_store,
    flip_to,
    mark_good,
    read_boot_variables,
    read_status,
)


@pytest.fixture
def flags(tmp_path: Path) -> FlagFiles:
    directory = tmp_path / "flags"
    directory.mkdir()
    return FlagFiles(str(directory), {"a": "/dev/null", "b": "/dev/zero"}, 3)


def write(flags: FlagFiles, name: str, text: str) -> None:
    Path(flags.path(name)).write_text(text)


def test_factory_state_is_slot_a(flags: FlagFiles) -> None:
    state = flagfile.read_flags(flags)

    assert state.active_slot == "a"
    assert state.trial_slot is None
    assert state.bootcount == 0
    assert state.variables == {
        "active_slot": "a",
        "previous_slot": "b",
        "upgrade_available": "0",
        "bootcount": "0",
        "bootlimit": "3",
    }


def test_rootfs2_flag_selects_slot_b(flags: FlagFiles) -> None:
    write(flags, "rootfs2", "")

    assert flagfile.read_flags(flags).active_slot == "b"


def test_trial_of_active_slot(flags: FlagFiles) -> None:
    write(flags, "rootfs2", "")
    write(flags, "trial", "b 2\n")

    state = flagfile.read_flags(flags)

    assert state.trial_slot == "b"
    assert state.bootcount == 2
    assert state.variables["upgrade_available"] == "1"


def test_trial_of_inactive_slot_is_stale(flags: FlagFiles) -> None:
    write(flags, "trial", "b 0\n")

    state = flagfile.read_flags(flags)

    assert state.active_slot == "a"
    assert state.trial_slot is None
    assert state.stale_trial
    assert state.variables["upgrade_available"] == "0"


def test_rolled_back_from_reported(flags: FlagFiles) -> None:
    write(flags, "rolled_back_from", "b\n")

    assert flagfile.read_flags(flags).variables["rolled_back_from"] == "b"


def test_flip_to_b_writes_trial_then_rootfs2(flags: FlagFiles) -> None:
    write(flags, "rolled_back_from", "b\n")

    state = flagfile.flip_to(flags, "b", "a")

    assert state.active_slot == "b"
    assert state.trial_slot == "b"
    assert state.bootcount == 0
    assert Path(flags.path("trial")).read_text() == "b 0\n"
    assert os.path.exists(flags.path("rootfs2"))
    assert not os.path.exists(flags.path("rolled_back_from"))
    assert not [n for n in os.listdir(flags.directory) if n.endswith(".tmp")]


def test_flip_to_a_removes_rootfs2(flags: FlagFiles) -> None:
    write(flags, "rootfs2", "")

    state = flagfile.flip_to(flags, "a", "b")

    assert state.active_slot == "a"
    assert state.trial_slot == "a"
    assert not os.path.exists(flags.path("rootfs2"))


def test_cut_before_commit_keeps_old_slot(flags: FlagFiles) -> None:
    # The state after flip_to's first two steps, before rootfs2 appears.
    write(flags, "trial", "b 0\n")

    state = flagfile.read_flags(flags)

    assert state.active_slot == "a"
    assert state.variables["upgrade_available"] == "0"


@pytest.mark.parametrize(("slot", "previous"), [("b", "b"), ("c", "a"), ("a", "")])
def test_flip_to_rejects_slots(flags: FlagFiles, slot: str, previous: str) -> None:
    with pytest.raises(SlotError):
        flagfile.flip_to(flags, slot, previous)
    assert os.listdir(flags.directory) == []


def test_mark_good_removes_trial(flags: FlagFiles) -> None:
    flagfile.flip_to(flags, "b", "a")

    state = flagfile.mark_good(flags, "b")

    assert state.trial_slot is None
    assert not os.path.exists(flags.path("trial"))
    assert state.active_slot == "b"


def test_mark_good_rejects_inactive_slot(flags: FlagFiles) -> None:
    flagfile.flip_to(flags, "b", "a")

    with pytest.raises(SlotError, match="not the active slot"):
        flagfile.mark_good(flags, "a")
    assert os.path.exists(flags.path("trial"))


def test_mark_good_without_trial_writes_nothing(flags: FlagFiles) -> None:
    state = flagfile.mark_good(flags, "a")

    assert state.active_slot == "a"
    assert os.listdir(flags.directory) == []


def test_missing_directory_named(tmp_path: Path) -> None:
    flags = FlagFiles(str(tmp_path / "absent"), {"a": "/dev/x", "b": "/dev/y"}, 3)

    with pytest.raises(SlotError, match="bootflags partition must be mounted"):
        flagfile.read_flags(flags)


def test_unmounted_directory_refused_before_writing(tmp_path: Path) -> None:
    # An unmounted bootflags partition leaves the root filesystem's empty directory.
    flags = FlagFiles(str(tmp_path), {"a": "/dev/x", "b": "/dev/y"}, 3, True)

    with pytest.raises(SlotError, match="is not a mount point"):
        flagfile.read_flags(flags)
    with pytest.raises(SlotError, match="is not a mount point"):
        flagfile.flip_to(flags, "b", "a")
    assert os.listdir(tmp_path) == []


def test_mount_point_accepted() -> None:
    flags = FlagFiles("/", {"a": "/dev/x", "b": "/dev/y"}, 3, mount_point=True)

    assert flagfile.read_flags(flags).active_slot in ("a", "b")


def test_running_slot_from_root_device(tmp_path: Path) -> None:
    root_device = os.stat("/").st_dev
    matching = [
        f"/dev/{name}"
        for name in os.listdir("/dev")
        if os.path.exists(f"/dev/{name}")
        and not os.path.islink(f"/dev/{name}")
        and os.stat(f"/dev/{name}").st_rdev == root_device
    ]
    if not matching:
        pytest.skip("the root filesystem's device has no node in /dev here")
    flags = FlagFiles(str(tmp_path), {"a": "/dev/null", "b": matching[0]}, 3)

    assert flagfile.running_slot(flags) == "b"


def test_running_slot_unknown(tmp_path: Path) -> None:
    flags = FlagFiles(str(tmp_path), {"a": "/dev/null", "b": "/dev/zero"}, 3)

    with pytest.raises(SlotError, match="neither slot device"):
        flagfile.running_slot(flags)


# --------------------------------------------------------------------------
# The hook in updater.slots and device.json


def flag_config(directory: str) -> dict[str, object]:
    return {
        "board": "imx7-warp",
        "slots": {"a": "/dev/mmcblk2p2", "b": "/dev/mmcblk2p3"},
        "scratch_dir": "/scratch",
        "bootlimit": 3,
        "boot_state": "flag-files",
        "flag_dir": directory,
    }


def test_config_selects_flag_files(flags: FlagFiles) -> None:
    config = parse_config(flag_config(flags.directory), "device.json")

    store = boot_store(config)

    assert isinstance(store, FlagFiles)
    assert store.directory == flags.directory
    assert store.bootlimit == 3
    assert config.fw_env_config == ""


def test_config_rejects_unknown_boot_state() -> None:
    document = flag_config("/mnt/flags")
    document["boot_state"] = "nvram"

    with pytest.raises(ConfigError, match="'boot_state' must be one of"):
        parse_config(document, "device.json")


def test_config_flag_dir_must_be_absolute() -> None:
    document = flag_config("mnt/flags")

    with pytest.raises(ConfigError, match="'flag_dir' must be an absolute path"):
        parse_config(document, "device.json")


def test_slots_functions_dispatch_to_flag_files(flags: FlagFiles) -> None:
    flip_to(flags, "b", "a")
    assert read_boot_variables(flags)["active_slot"] == "b"
    mark_good(flags, "b")

    status = read_status(flags)

    assert status.store == "flag-files"
    assert status.active_slot == "b"
    assert status.upgrade_available == "0"
    assert status.env_location.device == flags.directory
    assert json.dumps(status.environment)
