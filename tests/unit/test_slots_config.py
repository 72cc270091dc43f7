"""Tests for loading the device configuration /etc/mbl/device.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from updater.config import DeviceConfig, load_config, parse_config
from updater.errors import ConfigError

VALID: dict[str, Any] = {
    "board": "qemu-virt-a53",
    "slots": {"a": "/dev/vda2", "b": "/dev/vda3"},
    "scratch_dir": "/scratch",
    "fw_env_config": "/etc/fw_env.config",
    "bootlimit": 3,
}


def write_config(tmp_path: Path, document: object) -> str:
    path = tmp_path / "device.json"
    path.write_text(json.dumps(document))
    return str(path)


def test_load_config_valid(tmp_path: Path) -> None:
    path = write_config(tmp_path, VALID)
    assert load_config(path) == DeviceConfig(
        board="qemu-virt-a53",
        slots={"a": "/dev/vda2", "b": "/dev/vda3"},
        scratch_dir="/scratch",
        fw_env_config="/etc/fw_env.config",
        bootlimit=3,
        source=path,
    )


def test_slot_device() -> None:
    config = parse_config(VALID, "device.json")
    assert config.slot_device("b") == "/dev/vda3"
    with pytest.raises(ConfigError, match="no device for slot 'c'"):
        config.slot_device("c")


def test_unknown_key_ignored(caplog: pytest.LogCaptureFixture) -> None:
    config = parse_config({**VALID, "apps_dir": "/apps"}, "device.json")
    assert config.board == "qemu-virt-a53"
    assert "ignoring unknown key 'apps_dir'" in caplog.text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"board": ""}, "key 'board' must be a non-empty string, got ''"),
        ({"board": 5}, "key 'board' must be a non-empty string, got 5"),
        ({"slots": {"a": "/dev/vda2"}}, "exactly the keys a, b"),
        ({"slots": ["/dev/vda2", "/dev/vda3"]}, "exactly the keys a, b"),
        ({"slots": {"a": "/dev/vda2", "b": "vda3"}}, "'slots.b' must be a device path"),
        ({"slots": {"a": "/dev/vda2", "b": "/dev/vda2"}}, "must be different devices"),
        ({"scratch_dir": "scratch"}, "'scratch_dir' must be an absolute path"),
        ({"fw_env_config": None}, "'fw_env_config' must be a non-empty string"),
        ({"bootlimit": 0}, "'bootlimit' must be an integer >= 1, got 0"),
        ({"bootlimit": "3"}, "'bootlimit' must be an integer >= 1, got '3'"),
        ({"bootlimit": True}, "'bootlimit' must be an integer >= 1, got True"),
    ],
)
def test_invalid_value_rejected(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    path = write_config(tmp_path, {**VALID, **change})
    with pytest.raises(ConfigError, match=message) as excinfo:
        load_config(path)
    assert path in str(excinfo.value)


@pytest.mark.parametrize("key", sorted(VALID))
def test_missing_key_rejected(tmp_path: Path, key: str) -> None:
    document = {name: value for name, value in VALID.items() if name != key}
    with pytest.raises(ConfigError, match=f"missing key '{key}'"):
        load_config(write_config(tmp_path, document))


def test_not_an_object_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a JSON object, got list"):
        load_config(write_config(tmp_path, [VALID]))


def test_invalid_json_rejected(tmp_path: Path) -> None:
    path = tmp_path / "device.json"
    path.write_text('{"board": "x",\n  "slots": }')
    with pytest.raises(ConfigError, match="invalid JSON at line 2, column 12"):
        load_config(str(path))


def test_missing_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read device configuration"):
        load_config(str(tmp_path / "missing.json"))
