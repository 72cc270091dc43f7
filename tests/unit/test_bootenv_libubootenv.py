"""Interoperability of updater.bootenv with libubootenv's fw_printenv and fw_setenv.

Both tools run on a plain image file through ``-c CONFIG``, so the tests need neither a
device nor root.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from updater.bootenv import (
    HEADER_SIZE,
    EnvLocation,
    encode_copy,
    load_fw_env_config,
    newer_copy_index,
    read_env,
    write_env,
)

pytestmark = pytest.mark.needs_libubootenv

SIZE = 0x2000
OFFSETS = (0x4000, 0x6000)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """An fw_env.config for two copies in a zero-filled 64 KiB image file."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(0x10000))
    path = tmp_path / "fw_env.config"
    path.write_text(
        "# two redundant copies in an image file\n"
        + "".join(f"{image} {offset:#x} {SIZE:#x}\n" for offset in OFFSETS)
    )
    return path


def locations(config: Path) -> tuple[EnvLocation, EnvLocation]:
    return load_fw_env_config(str(config))


def put_copies(config: Path, first: bytes, second: bytes) -> None:
    for location, raw in zip(locations(config), (first, second), strict=True):
        with open(location.device, "r+b") as image:
            image.seek(location.offset)
            image.write(raw)


def image_bytes(config: Path) -> bytes:
    return Path(locations(config)[0].device).read_bytes()


def fw_printenv(config: Path) -> dict[str, str]:
    result = subprocess.run(
        ["fw_printenv", "-c", str(config)], capture_output=True, text=True, check=True
    )
    return dict(line.split("=", 1) for line in result.stdout.splitlines())


def fw_setenv(config: Path, name: str, value: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["fw_setenv", "-c", str(config), name, value],
        capture_output=True,
        text=True,
        check=False,
    )


def corrupt(raw: bytes) -> bytes:
    return raw[:HEADER_SIZE] + bytes([raw[HEADER_SIZE] ^ 0xFF]) + raw[HEADER_SIZE + 1 :]


def test_updater_write_read_by_fw_printenv(config: Path) -> None:
    put_copies(config, encode_copy({"bootlimit": "3"}, 1, SIZE), bytes(SIZE))
    variables = {"active_slot": "b", "bootlimit": "3", "bootcmd": "run boot_a; reset"}
    write_env(locations(config), variables)
    assert fw_printenv(config) == variables


def test_fw_setenv_write_read_by_updater(config: Path) -> None:
    put_copies(config, encode_copy({"keep": "yes"}, 1, SIZE), bytes(SIZE))
    assert fw_setenv(config, "active_slot", "b").returncode == 0
    env = read_env(locations(config))
    assert env.variables == {"keep": "yes", "active_slot": "b"}


@pytest.mark.parametrize(
    ("first", "second"), [(1, 2), (2, 1), (5, 5), (255, 0), (0, 255), (254, 255)]
)
def test_fw_setenv_writes_where_updater_predicts(
    config: Path, first: int, second: int
) -> None:
    put_copies(
        config,
        encode_copy({"v": "A"}, first, SIZE),
        encode_copy({"v": "B"}, second, SIZE),
    )
    before = read_env(locations(config))
    assert fw_setenv(config, "v", "new").returncode == 0
    after = read_env(locations(config))
    assert after.current == before.next_write_index
    assert after.flag == (before.flag + 1) % 256
    assert after.variables == {"v": "new"}


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (1, 2),
        (2, 1),
        (5, 5),
        (0, 0),
        (255, 255),
        (255, 0),
        (0, 255),
        (1, 255),
        (255, 1),
    ],
)
def test_fw_printenv_selects_same_copy(config: Path, first: int, second: int) -> None:
    put_copies(
        config,
        encode_copy({"who": "A"}, first, SIZE),
        encode_copy({"who": "B"}, second, SIZE),
    )
    expected = "AB"[newer_copy_index(first, second)]
    assert fw_printenv(config) == {"who": expected}
    assert read_env(locations(config)).variables == {"who": expected}


def test_flag_wrap_read_by_fw_printenv(config: Path) -> None:
    put_copies(
        config,
        encode_copy({"v": "old"}, 254, SIZE),
        encode_copy({"v": "cur"}, 255, SIZE),
    )
    env = write_env(locations(config), {"v": "wrapped"})
    assert env.flag == 0
    assert env.current == 0
    assert fw_printenv(config) == {"v": "wrapped"}


def test_fw_setenv_after_newest_corrupt(config: Path) -> None:
    older = encode_copy({"v": "A"}, 7, SIZE)
    put_copies(config, older, corrupt(encode_copy({"v": "B"}, 9, SIZE)))
    assert fw_printenv(config) == {"v": "A"}
    assert fw_setenv(config, "v", "C").returncode == 0
    env = read_env(locations(config))
    assert env.current == 1
    assert env.flag == 8
    assert env.variables == {"v": "C"}
    assert image_bytes(config)[OFFSETS[0] : OFFSETS[0] + SIZE] == older


def test_updater_write_over_corrupt_copy(config: Path) -> None:
    put_copies(
        config,
        encode_copy({"v": "A"}, 7, SIZE),
        corrupt(encode_copy({"v": "B"}, 9, SIZE)),
    )
    env = write_env(locations(config), {"v": "C"})
    assert env.current == 1
    assert fw_printenv(config) == {"v": "C"}


def test_fw_setenv_both_corrupt_changes_nothing(config: Path) -> None:
    put_copies(
        config,
        corrupt(encode_copy({"v": "A"}, 1, SIZE)),
        corrupt(encode_copy({"v": "B"}, 2, SIZE)),
    )
    before = image_bytes(config)
    assert fw_setenv(config, "v", "C").returncode != 0
    assert image_bytes(config) == before
