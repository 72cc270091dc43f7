"""Load the device configuration /etc/mbl/device.json that the image build writes.

Schema (all keys required, except the boot state keys noted)::

    {
      "board": "qemu-virt-a53",                      # non-empty string
      "slots": {"a": "/dev/vda2", "b": "/dev/vda3"},   # block device of each slot
      "scratch_dir": "/scratch",                       # absolute path
      "fw_env_config": "/etc/fw_env.config",           # absolute path
      "bootlimit": 3                                   # boots on trial, >= 1
    }

``fw_env_config`` names libubootenv's configuration file (see `updater.bootenv`).

Boards without U-Boot keep the boot state in flag files instead (see
`updater.flagfile`) and say so with two more keys, in place of ``fw_env_config``::

      "boot_state": "flag-files",                      # default "u-boot-env"
      "flag_dir": "/mnt/flags"                         # absolute path

Unknown keys are logged and ignored, so a newer image build can add keys without
breaking an older updater.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from updater.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = "/etc/mbl/device.json"

SLOT_NAMES = ("a", "b")

_KNOWN_KEYS = (
    "board",
    "slots",
    "scratch_dir",
    "fw_env_config",
    "bootlimit",
    "boot_state",
    "flag_dir",
)

BOOT_STATES = ("u-boot-env", "flag-files")


@dataclass(frozen=True)
class DeviceConfig:
    """The validated contents of device.json.

    Attributes:
        board: board name, for example ``qemu-virt-a53``.
        slots: block device of each slot, keyed by ``a`` and ``b``.
        scratch_dir: directory for temporary files of an update.
        fw_env_config: path of libubootenv's fw_env.config.
        bootlimit: boots allowed on trial before U-Boot rolls back.
        source: the file the configuration was loaded from.
        boot_state: where the boot state lives, ``u-boot-env`` or ``flag-files``.
        flag_dir: directory of the flag files; "" with ``u-boot-env``.
    """

    board: str
    slots: Mapping[str, str]
    scratch_dir: str
    fw_env_config: str
    bootlimit: int
    source: str
    boot_state: str = "u-boot-env"
    flag_dir: str = ""

    def slot_device(self, slot: str) -> str:
        """Return the block device of ``slot``.

        Raises:
            ConfigError: ``slot`` is not ``a`` or ``b``.
        """
        try:
            return self.slots[slot]
        except KeyError:
            raise ConfigError(
                f"{self.source}: no device for slot {slot!r}; slots are"
                f" {', '.join(SLOT_NAMES)}"
            ) from None


def load_config(path: str = DEFAULT_CONFIG_PATH) -> DeviceConfig:
    """Read and validate device.json.

    Raises:
        ConfigError: the file cannot be read, is not a JSON object, or a key is
            missing or has an invalid value. The message names the file, the key, the
            value seen and the values allowed.
    """
    try:
        with open(path, encoding="utf-8") as file:
            document = json.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read device configuration {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from exc
    return parse_config(document, path)


def parse_config(document: Any, source: str) -> DeviceConfig:
    """Validate a decoded device.json document.

    Raises:
        ConfigError: as `load_config`.
    """
    if not isinstance(document, dict):
        raise ConfigError(
            f"{source}: expected a JSON object, got {type(document).__name__}"
        )
    for key in sorted(set(document) - set(_KNOWN_KEYS)):
        log.warning("%s: ignoring unknown key %r", source, key)
    boot_state = document.get("boot_state", BOOT_STATES[0])
    if boot_state not in BOOT_STATES:
        raise ConfigError(
            f"{source}: key 'boot_state' must be one of {', '.join(BOOT_STATES)},"
            f" got {boot_state!r}"
        )
    flag_files = boot_state == "flag-files"
    return DeviceConfig(
        board=_non_empty_string(document, "board", source),
        slots=_slots(document, source),
        scratch_dir=_absolute_path(document, "scratch_dir", source),
        fw_env_config=(
            "" if flag_files else _absolute_path(document, "fw_env_config", source)
        ),
        bootlimit=_bootlimit(document, source),
        source=source,
        boot_state=boot_state,
        flag_dir=_absolute_path(document, "flag_dir", source) if flag_files else "",
    )


def _required(document: dict[str, Any], key: str, source: str) -> Any:
    if key not in document:
        raise ConfigError(
            f"{source}: missing key {key!r}; required keys are {', '.join(_KNOWN_KEYS)}"
        )
    return document[key]


def _non_empty_string(document: dict[str, Any], key: str, source: str) -> str:
    value = _required(document, key, source)
    if not isinstance(value, str) or not value:
        raise ConfigError(
            f"{source}: key {key!r} must be a non-empty string, got {value!r}"
        )
    return value


def _absolute_path(document: dict[str, Any], key: str, source: str) -> str:
    value = _non_empty_string(document, key, source)
    if not value.startswith("/"):
        raise ConfigError(
            f"{source}: key {key!r} must be an absolute path, got {value!r}"
        )
    return value


def _slots(document: dict[str, Any], source: str) -> dict[str, str]:
    value = _required(document, "slots", source)
    if not isinstance(value, dict) or sorted(value) != list(SLOT_NAMES):
        raise ConfigError(
            f"{source}: key 'slots' must be an object with exactly the keys"
            f" {', '.join(SLOT_NAMES)}, got {value!r}"
        )
    for slot in SLOT_NAMES:
        device = value[slot]
        if not isinstance(device, str) or not device.startswith("/dev/"):
            raise ConfigError(
                f"{source}: key 'slots.{slot}' must be a device path under /dev/,"
                f" got {device!r}"
            )
    if value["a"] == value["b"]:
        raise ConfigError(
            f"{source}: slots 'a' and 'b' must be different devices, both are"
            f" {value['a']!r}"
        )
    return {slot: value[slot] for slot in SLOT_NAMES}


def _bootlimit(document: dict[str, Any], source: str) -> int:
    value = _required(document, "bootlimit", source)
    # bool is a subclass of int, but true/false is not a boot count.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"{source}: key 'bootlimit' must be an integer >= 1, got {value!r}"
        )
    return value
