"""Tests for the redundant U-Boot environment codec and fw_env.config parser."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest

from updater.bootenv import (
    HEADER_SIZE,
    EnvLocation,
    decode_copy,
    decode_env,
    decode_single_copy,
    encode_copy,
    load_fw_env_config,
    newer_copy_index,
    parse_fw_env_config,
    read_env,
    update_env,
    write_env,
)
from updater.errors import (
    BootEnvCopyError,
    BootEnvCorruptError,
    BootEnvError,
    ConfigError,
)

SIZE = 0x2000
OFFSETS = (0x4000, 0x6000)


def make_image(tmp_path: Path, copies: tuple[bytes, bytes]) -> list[EnvLocation]:
    """Write two raw copies into a 64 KiB image file and return their locations."""
    image = tmp_path / "disk.img"
    data = bytearray(0x10000)
    for offset, raw in zip(OFFSETS, copies, strict=True):
        data[offset : offset + len(raw)] = raw
    image.write_bytes(bytes(data))
    return [EnvLocation(str(image), offset, SIZE) for offset in OFFSETS]


def image_bytes(locations: list[EnvLocation]) -> bytes:
    return Path(locations[0].device).read_bytes()


def corrupt(raw: bytes) -> bytes:
    """Flip one data byte so the CRC no longer matches."""
    return raw[:HEADER_SIZE] + bytes([raw[HEADER_SIZE] ^ 0xFF]) + raw[HEADER_SIZE + 1 :]


def test_encode_copy_layout() -> None:
    raw = encode_copy({"b": "2", "a": "1"}, 7, 64)
    assert len(raw) == 64
    assert raw[4] == 7
    assert raw[HEADER_SIZE:].rstrip(b"\0") == b"a=1\0b=2"
    assert int.from_bytes(raw[:4], "little") == zlib.crc32(raw[HEADER_SIZE:])


def test_decode_copy_round_trip() -> None:
    variables = {"bootcmd": "run mbl_boot", "empty": "", "utf8": "größe"}
    copy = decode_copy(encode_copy(variables, 200, 256))
    assert copy.flag == 200
    assert copy.variables == variables


def test_decode_copy_keeps_non_utf8_bytes() -> None:
    data = b"raw=\xff\xfe\0\0".ljust(32 - HEADER_SIZE, b"\0")
    raw = zlib.crc32(data).to_bytes(4, "little") + b"\x01" + data
    variables = decode_copy(raw).variables
    assert encode_copy(variables, 1, 32) == raw


def test_decode_copy_rejects_bad_crc() -> None:
    raw = corrupt(encode_copy({"a": "1"}, 1, 64))
    with pytest.raises(BootEnvCopyError, match="CRC mismatch"):
        decode_copy(raw)


def test_decode_copy_rejects_missing_end_marker() -> None:
    data = b"a=" + b"x" * (32 - HEADER_SIZE - 2)
    raw = zlib.crc32(data).to_bytes(4, "little") + b"\x01" + data
    with pytest.raises(BootEnvCopyError, match="ends the variable list"):
        decode_copy(raw)


def test_decode_copy_skips_entries_without_name() -> None:
    data = b"a=1\0noequals\0=value\0b=2\0\0".ljust(64 - HEADER_SIZE, b"\0")
    raw = zlib.crc32(data).to_bytes(4, "little") + b"\x01" + data
    assert decode_copy(raw).variables == {"a": "1", "b": "2"}


def test_decode_copy_rejects_header_only() -> None:
    with pytest.raises(BootEnvCopyError, match="header"):
        decode_copy(b"\0" * HEADER_SIZE)


@pytest.mark.parametrize("name", ["", "a=b", "a\0b"])
def test_encode_copy_rejects_invalid_name(name: str) -> None:
    with pytest.raises(BootEnvError, match="invalid environment variable name"):
        encode_copy({name: "x"}, 0, 64)


def test_encode_copy_rejects_nul_in_value() -> None:
    with pytest.raises(BootEnvError, match="contains NUL"):
        encode_copy({"a": "x\0y"}, 0, 64)


@pytest.mark.parametrize("flag", [-1, 256])
def test_encode_copy_rejects_flag_out_of_range(flag: int) -> None:
    with pytest.raises(BootEnvError, match=r"0\.\.255"):
        encode_copy({}, flag, 64)


@pytest.mark.parametrize("size", [0, HEADER_SIZE])
def test_encode_copy_rejects_tiny_size(size: int) -> None:
    with pytest.raises(BootEnvError, match="larger than the 5-byte header"):
        encode_copy({}, 0, size)


def test_encode_copy_exact_fit() -> None:
    # "a=123\0" plus the end marker is 7 bytes of data.
    raw = encode_copy({"a": "123"}, 0, HEADER_SIZE + 7)
    assert decode_copy(raw).variables == {"a": "123"}


def test_encode_copy_one_byte_too_many() -> None:
    with pytest.raises(BootEnvError, match="need 8 bytes but a copy of 12 bytes has 7"):
        encode_copy({"a": "1234"}, 0, HEADER_SIZE + 7)


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        (1, 2, 1),
        (2, 1, 0),
        (5, 5, 0),
        (0, 0, 0),
        (255, 255, 0),
        (255, 0, 1),
        (0, 255, 0),
        (1, 255, 1),
        (255, 1, 0),
        (254, 255, 1),
        (128, 0, 0),
    ],
)
def test_newer_copy_index_flag_rule(first: int, second: int, expected: int) -> None:
    assert newer_copy_index(first, second) == expected


def test_decode_env_both_valid_picks_newer() -> None:
    locations = [EnvLocation("img", offset, 64) for offset in OFFSETS]
    env = decode_env(
        [encode_copy({"v": "old"}, 9, 64), encode_copy({"v": "new"}, 10, 64)],
        locations,
    )
    assert env.current == 1
    assert env.flag == 10
    assert env.variables == {"v": "new"}
    assert env.other_copy_error is None
    assert env.next_write_index == 0


def test_read_env_from_image(tmp_path: Path) -> None:
    locations = make_image(
        tmp_path,
        (encode_copy({"v": "first"}, 3, SIZE), encode_copy({"v": "second"}, 2, SIZE)),
    )
    env = read_env(locations)
    assert env.variables == {"v": "first"}
    assert env.current == 0
    assert env.current_location == locations[0]


def test_write_env_goes_to_other_copy(tmp_path: Path) -> None:
    first = encode_copy({"v": "first"}, 3, SIZE)
    locations = make_image(tmp_path, (first, encode_copy({"v": "x"}, 2, SIZE)))
    env = write_env(locations, {"v": "new"})
    image = image_bytes(locations)
    assert env.current == 1
    assert env.flag == 4
    assert image[OFFSETS[0] : OFFSETS[0] + SIZE] == first
    assert image[OFFSETS[1] : OFFSETS[1] + SIZE] == encode_copy({"v": "new"}, 4, SIZE)
    assert read_env(locations).variables == {"v": "new"}


def test_write_env_alternates_copies(tmp_path: Path) -> None:
    locations = make_image(
        tmp_path, (encode_copy({}, 0, SIZE), encode_copy({}, 255, SIZE))
    )
    # 0 is newer than 255, so copy 1 is current and the writes alternate from copy 2.
    indices = [write_env(locations, {"n": str(n)}).current for n in range(4)]
    assert indices == [1, 0, 1, 0]
    assert read_env(locations).flag == 4


def test_write_env_flag_wraps_to_zero(tmp_path: Path) -> None:
    locations = make_image(
        tmp_path, (encode_copy({"v": "old"}, 254, SIZE), encode_copy({}, 255, SIZE))
    )
    env = write_env(locations, {"v": "wrapped"})
    assert env.current == 0
    assert env.flag == 0
    reread = read_env(locations)
    assert reread.current == 0
    assert reread.flag == 0
    assert reread.variables == {"v": "wrapped"}


def test_update_env_keeps_other_variables(tmp_path: Path) -> None:
    locations = make_image(
        tmp_path,
        (encode_copy({"keep": "1", "drop": "2", "set": "old"}, 1, SIZE), b""),
    )
    env = update_env(locations, {"set": "new", "drop": None, "add": "3"})
    assert env.variables == {"keep": "1", "set": "new", "add": "3"}
    assert read_env(locations).variables == env.variables


def test_newest_copy_corrupt_reads_older(tmp_path: Path) -> None:
    older = encode_copy({"v": "A"}, 7, SIZE)
    newer_corrupt = corrupt(encode_copy({"v": "B"}, 9, SIZE))
    locations = make_image(tmp_path, (older, newer_corrupt))
    env = read_env(locations)
    assert env.variables == {"v": "A"}
    assert env.current == 0
    assert env.flag == 7
    assert env.other_copy_error is not None
    assert "CRC mismatch" in env.other_copy_error


def test_write_replaces_corrupt_newest_copy(tmp_path: Path) -> None:
    older = encode_copy({"v": "A"}, 7, SIZE)
    locations = make_image(tmp_path, (older, corrupt(encode_copy({"v": "B"}, 9, SIZE))))
    env = write_env(locations, {"v": "C"})
    image = image_bytes(locations)
    assert env.current == 1
    assert newer_copy_index(7, env.flag) == 1
    assert image[OFFSETS[0] : OFFSETS[0] + SIZE] == older
    reread = read_env(locations)
    assert reread.variables == {"v": "C"}
    assert reread.other_copy_error is None


def test_both_copies_corrupt_read_names_both(tmp_path: Path) -> None:
    locations = make_image(
        tmp_path,
        (
            corrupt(encode_copy({"v": "A"}, 1, SIZE)),
            corrupt(encode_copy({"v": "B"}, 2, SIZE)),
        ),
    )
    with pytest.raises(BootEnvCorruptError) as excinfo:
        read_env(locations)
    message = str(excinfo.value)
    assert "offset 0x4000" in message
    assert "offset 0x6000" in message
    assert message.count("CRC mismatch") == 2


def test_both_copies_corrupt_write_leaves_bytes(tmp_path: Path) -> None:
    locations = make_image(
        tmp_path,
        (
            corrupt(encode_copy({"v": "A"}, 1, SIZE)),
            corrupt(encode_copy({"v": "B"}, 2, SIZE)),
        ),
    )
    before = image_bytes(locations)
    with pytest.raises(BootEnvCorruptError):
        write_env(locations, {"active_slot": "b"})
    with pytest.raises(BootEnvCorruptError):
        update_env(locations, {"active_slot": "b"})
    assert image_bytes(locations) == before


def test_blank_image_is_corrupt(tmp_path: Path) -> None:
    locations = make_image(tmp_path, (b"", b""))
    with pytest.raises(BootEnvCorruptError):
        read_env(locations)


def test_read_env_short_file_invalid(tmp_path: Path) -> None:
    image = tmp_path / "short.img"
    image.write_bytes(encode_copy({"v": "only"}, 5, 64))
    locations = [EnvLocation(str(image), 0, 64), EnvLocation(str(image), 64, 64)]
    env = read_env(locations)
    assert env.variables == {"v": "only"}
    assert env.other_copy_error is not None


def test_read_env_missing_device(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    with pytest.raises(BootEnvError, match="cannot open"):
        read_env([EnvLocation(missing, 0, 64), EnvLocation(missing, 64, 64)])


def test_read_env_needs_two_locations(tmp_path: Path) -> None:
    with pytest.raises(BootEnvError, match="needs 2 copy locations, got 1"):
        read_env([EnvLocation(str(tmp_path), 0, 64)])


def test_write_env_too_large_leaves_bytes(tmp_path: Path) -> None:
    locations = make_image(tmp_path, (encode_copy({"v": "A"}, 1, SIZE), b""))
    before = image_bytes(locations)
    with pytest.raises(BootEnvError, match="need"):
        write_env(locations, {"big": "x" * SIZE})
    assert image_bytes(locations) == before


def test_fw_env_config_parses_fields() -> None:
    text = (
        "# MMC environment\n"
        "\n"
        "/dev/mmcblk0  0x4000  0x2000  0x200 0x10  # first copy\n"
        "/dev/mmcblk0\t24576\t0X2000\n"
    )
    first, second = parse_fw_env_config(text, "fw_env.config")
    assert first == EnvLocation("/dev/mmcblk0", 0x4000, 0x2000, 0x200, 0x10)
    assert second == EnvLocation("/dev/mmcblk0", 24576, 0x2000)


def test_fw_env_config_single_digit_sizes() -> None:
    (location,) = parse_fw_env_config("/dev/x 0 0x2000 0x200 1\n", "cfg")
    assert location.sectors == 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("/dev/x 0x4000", "got 2 fields"),
        ("/dev/x 0 0x2000 1 1 1", "got 6 fields"),
        ("/dev/x 040000 0x2000", "invalid offset '040000'"),
        ("/dev/x -1 0x2000", "invalid offset"),
        ("/dev/x 0x 0x2000", "invalid offset"),
        ("/dev/x 1_000 0x2000", "invalid offset"),
        ("/dev/x 0 8192", "invalid size '8192'"),
        ("/dev/x 0 0xZZ", "invalid size"),
        ("/dev/x 0 0x2000 512", "invalid sector size '512'"),
    ],
)
def test_fw_env_config_rejects_line(line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as excinfo:
        parse_fw_env_config(f"# header\n{line}\n", "fw_env.config")
    assert "fw_env.config, line 2" in str(excinfo.value)


def test_load_fw_env_config(tmp_path: Path) -> None:
    config = tmp_path / "fw_env.config"
    config.write_text("/dev/vda 0x4000 0x2000\n/dev/vda 0x6000 0x2000\n")
    assert load_fw_env_config(str(config)) == (
        EnvLocation("/dev/vda", 0x4000, 0x2000),
        EnvLocation("/dev/vda", 0x6000, 0x2000),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("/dev/vda 0x4000 0x2000\n", "expected 2 lines"),
        ("/dev/vda 0x4000 0x2000\n/dev/vda 0x6000 0x1000\n", "same size"),
        ("/dev/vda 0x4000 0x2000\n/dev/vda 0x5000 0x2000\n", "overlap"),
        ("/dev/vda 0x4000 0x5\n/dev/vda 0x6000 0x5\n", "not larger than"),
    ],
)
def test_load_fw_env_config_rejects(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "fw_env.config"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_fw_env_config(str(config))


def test_load_fw_env_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_fw_env_config(str(tmp_path / "missing.config"))


def test_decode_single_copy_layout() -> None:
    data = b"bootdelay=2\0mbl_certify=1\0\0".ljust(60, b"\0")
    raw = zlib.crc32(data).to_bytes(4, "little") + data

    assert decode_single_copy(raw) == {"bootdelay": "2", "mbl_certify": "1"}
    with pytest.raises(BootEnvCopyError, match="CRC mismatch"):
        decode_single_copy(raw[:10] + b"X" + raw[11:])
    with pytest.raises(BootEnvCopyError, match="more than the 4-byte header"):
        decode_single_copy(raw[:4])
