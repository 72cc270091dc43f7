"""Codec for U-Boot's redundant environment, used on the device and by the host harness.

Each of the two copies has U-Boot's redundant layout::

    crc32 (4 bytes, little endian) | flag (1 byte) | data (size - 5 bytes)

``crc32`` is ``zlib.crc32`` over the data area. The data area contains ``name=value\\0``
entries, an empty entry (one more ``\\0``) that ends the list, and zero padding.

U-Boot on non-flash storage (MMC, files) treats the flag as a counter that every save
increments modulo 256. Of two valid copies, the one with the larger flag is current,
except that 0 is newer than 255, and with equal flags the first copy wins
(``env_import_redund`` in U-Boot's env/common.c). A save writes the whole variable set
into the other copy's place (the older or the invalid copy) with flag = current flag +
1, so a power cut at any byte leaves either the old or the new environment readable.

Measured with libubootenv-tool 0.3.2 (Debian bookworm) on an image file with two 8 KiB
copies: ``fw_printenv`` chooses the same copy as the rule above for the flag pairs
(1, 2), (2, 1), (5, 5), (255, 0), (0, 255), (0, 0), (255, 255), (1, 255), (255, 1)
and (128, 0). ``fw_setenv`` writes into the other copy with flag = current + 1, also
when the other copy has a bad CRC and a larger flag. When both copies are invalid it
writes nothing and exits non-zero. It sorts the variables by name, keeps ``name=``
entries with an empty value and drops entries without ``=``. The unit tests in
tests/unit/test_bootenv_libubootenv.py repeat these checks when ``fw_printenv`` is
installed.
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from updater.errors import (
    BootEnvCopyError,
    BootEnvCorruptError,
    BootEnvError,
    ConfigError,
)

log = logging.getLogger(__name__)

HEADER_SIZE = 5
"""Bytes before the data area of a copy: the CRC32 (4) and the flag (1)."""

FLAG_MODULUS = 256

COPY_COUNT = 2

# Variable names and values are bytes to U-Boot. They are decoded as UTF-8, and
# surrogateescape keeps any other byte sequence so that a read-modify-write round trip
# leaves variables the updater does not touch byte-for-byte unchanged.
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"

_HEX_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+")
_DECIMAL_NUMBER = re.compile(r"0|[1-9][0-9]*")
_SINGLE_DIGIT = re.compile(r"[0-9]")


@dataclass(frozen=True)
class EnvLocation:
    """Position of one environment copy: a block device or image file and a byte range.

    ``sector_size`` and ``sectors`` are the optional fourth and fifth fields of
    fw_env.config. They matter only for MTD flash and are kept for completeness.
    """

    device: str
    offset: int
    size: int
    sector_size: int | None = None
    sectors: int | None = None

    def describe(self) -> str:
        """Return ``DEVICE at offset 0xOFFSET (size 0xSIZE)`` for messages."""
        return f"{self.device} at offset {self.offset:#x} (size {self.size:#x})"


@dataclass(frozen=True)
class EnvCopy:
    """The flag and the variables of one valid environment copy."""

    flag: int
    variables: dict[str, str]


@dataclass(frozen=True)
class BootEnv:
    """The current environment and where it was found.

    Attributes:
        variables: the variables of the current copy.
        current: index (0 or 1) of the current copy in ``locations``.
        flag: the flag byte of the current copy.
        locations: both copy locations, in fw_env.config order.
        other_copy_error: why the other copy is invalid, or None if it is valid.
    """

    variables: dict[str, str]
    current: int
    flag: int
    locations: tuple[EnvLocation, EnvLocation]
    other_copy_error: str | None = None

    @property
    def current_location(self) -> EnvLocation:
        """Location of the copy the variables were read from."""
        return self.locations[self.current]

    @property
    def next_write_index(self) -> int:
        """Index of the copy that the next write replaces."""
        return 1 - self.current


def encode_copy(variables: Mapping[str, str], flag: int, size: int) -> bytes:
    """Encode ``variables`` as one copy of ``size`` bytes with the given flag.

    Variables are written sorted by name, as libubootenv 0.3.2's ``fw_setenv`` does.

    Raises:
        BootEnvError: ``flag`` is not 0..255, ``size`` is not larger than the 5-byte
            header, a name is empty or contains ``=`` or NUL, a value contains NUL, or
            the variables do not fit (the message gives bytes needed and available).
    """
    if not 0 <= flag < FLAG_MODULUS:
        raise BootEnvError(f"environment flag must be 0..255, got {flag}")
    if size <= HEADER_SIZE:
        raise BootEnvError(
            f"environment copy size must be larger than the {HEADER_SIZE}-byte header,"
            f" got {size}; check the size field in fw_env.config"
        )
    data = _encode_data(variables)
    available = size - HEADER_SIZE
    if len(data) > available:
        raise BootEnvError(
            f"environment variables need {len(data)} bytes but a copy of {size} bytes"
            f" has {available} bytes for data; remove variables or enlarge the"
            " environment"
        )
    data = data.ljust(available, b"\0")
    return zlib.crc32(data).to_bytes(4, "little") + bytes([flag]) + data


def _encode_data(variables: Mapping[str, str]) -> bytes:
    entries = []
    for name in sorted(variables):
        value = variables[name]
        _validate_variable(name, value)
        entries.append(f"{name}={value}".encode(_ENCODING, _ERRORS) + b"\0")
    # The empty entry ends the list.
    return b"".join(entries) + b"\0"


def _validate_variable(name: str, value: str) -> None:
    if not name or "=" in name or "\0" in name:
        raise BootEnvError(
            f"invalid environment variable name {name!r}: a name must be non-empty"
            " and contain neither '=' nor NUL"
        )
    if "\0" in value:
        raise BootEnvError(
            f"invalid value for environment variable {name!r}: {value!r} contains NUL,"
            " which ends an entry in U-Boot's format"
        )


def decode_copy(raw: bytes) -> EnvCopy:
    """Check the CRC of one raw copy and parse its variables.

    Entries without ``=`` are skipped, as libubootenv 0.3.2 does, and so are entries
    with an empty name. A name that occurs twice takes its last value.

    Raises:
        BootEnvCopyError: the copy is not longer than the header, the CRC does not
            match, or the data area has no empty entry that ends the list.
    """
    data = _checked_data(raw, HEADER_SIZE)
    return EnvCopy(flag=raw[4], variables=_parse_data(data))


def decode_single_copy(raw: bytes) -> dict[str, str]:
    """Check and parse an environment in U-Boot's single-copy layout, ``crc32 |
    data``, and return its variables. A build without a redundant environment
    writes this layout, for example into ``uboot.env`` on a FAT partition.

    Raises:
        BootEnvCopyError: the CRC does not match, or the data area has no empty
            entry that ends the list.
    """
    return _parse_data(_checked_data(raw, 4))


def _checked_data(raw: bytes, header_size: int) -> bytes:
    """Return the data area after the ``header_size``-byte header, whose first four
    bytes are the data's CRC32."""
    if len(raw) <= header_size:
        raise BootEnvCopyError(
            f"environment has {len(raw)} bytes, expected more than the"
            f" {header_size}-byte header"
        )
    stored_crc = int.from_bytes(raw[:4], "little")
    data = raw[header_size:]
    computed_crc = zlib.crc32(data)
    if stored_crc != computed_crc:
        raise BootEnvCopyError(
            f"CRC mismatch: stored {stored_crc:#010x}, computed {computed_crc:#010x}"
        )
    return data


def _parse_data(data: bytes) -> dict[str, str]:
    variables: dict[str, str] = {}
    position = 0
    while True:
        end = data.find(b"\0", position)
        if end < 0:
            raise BootEnvCopyError(
                "data area has no empty entry that ends the variable list"
            )
        if end == position:
            return variables
        name, separator, value = data[position:end].partition(b"=")
        if separator and name:
            variables[name.decode(_ENCODING, _ERRORS)] = value.decode(
                _ENCODING, _ERRORS
            )
        else:
            log.debug(
                "skipping environment entry without '=' or with an empty name: %r",
                data[position:end],
            )
        position = end + 1


def newer_copy_index(first_flag: int, second_flag: int) -> int:
    """Return the index (0 or 1) of the newer of two valid copies, by their flags.

    0 is newer than 255, otherwise the larger flag is newer. Equal flags select the
    first copy, as U-Boot and libubootenv 0.3.2 do.
    """
    if first_flag == FLAG_MODULUS - 1 and second_flag == 0:
        return 1
    if second_flag == FLAG_MODULUS - 1 and first_flag == 0:
        return 0
    return 1 if second_flag > first_flag else 0


def decode_env(
    raw_copies: Sequence[bytes], locations: Sequence[EnvLocation]
) -> BootEnv:
    """Decode both raw copies and select the current one.

    Raises:
        BootEnvCorruptError: both copies are invalid. The message names both locations
            and the reason for each.
        BootEnvError: the number of copies or locations is not two.
    """
    pair = _location_pair(locations)
    if len(raw_copies) != COPY_COUNT:
        raise BootEnvError(f"expected {COPY_COUNT} raw copies, got {len(raw_copies)}")

    copies: list[EnvCopy | None] = []
    reasons: list[str | None] = []
    for raw in raw_copies:
        try:
            copies.append(decode_copy(raw))
            reasons.append(None)
        except BootEnvCopyError as exc:
            copies.append(None)
            reasons.append(str(exc))
    return _select(copies, reasons, pair)


def _select(
    copies: list[EnvCopy | None],
    reasons: list[str | None],
    locations: tuple[EnvLocation, EnvLocation],
) -> BootEnv:
    first, second = copies
    if first is None and second is None:
        raise BootEnvCorruptError(
            "both U-Boot environment copies are invalid:"
            f" copy 1 on {locations[0].describe()}: {reasons[0]};"
            f" copy 2 on {locations[1].describe()}: {reasons[1]}."
            " Nothing was changed, and the boot script boots the factory slot in"
            " this state. Write both copies again from the device's factory image:"
            " U-Boot's own saveenv does not write these copies"
        )
    if first is not None and second is not None:
        current = newer_copy_index(first.flag, second.flag)
    else:
        current = 0 if first is not None else 1
        log.warning(
            "U-Boot environment copy %d on %s is invalid (%s); using copy %d",
            2 - current,
            locations[1 - current].describe(),
            reasons[1 - current],
            current + 1,
        )
    chosen = copies[current]
    assert chosen is not None
    return BootEnv(
        variables=dict(chosen.variables),
        current=current,
        flag=chosen.flag,
        locations=locations,
        other_copy_error=reasons[1 - current],
    )


def read_env(locations: Sequence[EnvLocation]) -> BootEnv:
    """Read both copies from their devices or image files and return the current one.

    A copy that cannot be read in full (the file ends early) counts as invalid.

    Raises:
        BootEnvCorruptError: both copies are invalid.
        BootEnvError: a device cannot be opened or read, or there are not exactly two
            locations.
    """
    pair = _location_pair(locations)
    raw_copies = [_read_copy(location) for location in pair]
    return decode_env(raw_copies, pair)


def write_env(
    locations: Sequence[EnvLocation], variables: Mapping[str, str]
) -> BootEnv:
    """Replace the whole environment with ``variables`` in one write of one copy.

    The current environment is read first to decide where the new copy goes, so a write
    is rejected when both copies are invalid and leaves the bytes unchanged.

    Raises:
        BootEnvCorruptError: both copies are invalid.
        BootEnvError: the variables are invalid or do not fit, or reading, writing or
            verifying a copy failed.
    """
    return write_next_copy(read_env(locations), variables)


def update_env(
    locations: Sequence[EnvLocation], changes: Mapping[str, str | None]
) -> BootEnv:
    """Set (or, for a None value, delete) ``changes`` and keep all other variables.

    All changes go out in one write of one copy, as `write_env` describes.

    Raises:
        BootEnvCorruptError: both copies are invalid.
        BootEnvError: as `write_env`.
    """
    current = read_env(locations)
    variables = dict(current.variables)
    for name, value in changes.items():
        if value is None:
            variables.pop(name, None)
        else:
            variables[name] = value
    return write_next_copy(current, variables)


def write_next_copy(current: BootEnv, variables: Mapping[str, str]) -> BootEnv:
    """Write ``variables`` into the place of the copy that is not current.

    The new copy's flag is ``current.flag + 1`` modulo 256, which makes it the newer
    copy by `newer_copy_index`. The device is fsynced and the written bytes are read
    back and compared.

    Raises:
        BootEnvError: the variables are invalid or do not fit, or writing or verifying
            failed.
    """
    target = current.locations[current.next_write_index]
    flag = (current.flag + 1) % FLAG_MODULUS
    raw = encode_copy(variables, flag, target.size)
    _write_copy(target, raw)
    if _read_copy(target) != raw:
        raise BootEnvError(
            f"environment copy on {target.describe()} reads back different bytes"
            " after the write; the storage may be failing"
        )
    log.info(
        "wrote U-Boot environment copy %d on %s with flag %d",
        current.next_write_index + 1,
        target.describe(),
        flag,
    )
    return BootEnv(
        variables=dict(variables),
        current=current.next_write_index,
        flag=flag,
        locations=current.locations,
    )


def _location_pair(
    locations: Sequence[EnvLocation],
) -> tuple[EnvLocation, EnvLocation]:
    if len(locations) != COPY_COUNT:
        raise BootEnvError(
            f"a redundant environment needs {COPY_COUNT} copy locations, got"
            f" {len(locations)}; list one line per copy in fw_env.config"
        )
    return locations[0], locations[1]


def _read_copy(location: EnvLocation) -> bytes:
    try:
        fd = os.open(location.device, os.O_RDONLY)
    except OSError as exc:
        raise BootEnvError(
            f"cannot open {location.device} to read the U-Boot environment: {exc};"
            " check the device in fw_env.config"
        ) from exc
    try:
        return os.pread(fd, location.size, location.offset)
    except OSError as exc:
        raise BootEnvError(
            f"cannot read the U-Boot environment from {location.describe()}: {exc}"
        ) from exc
    finally:
        os.close(fd)


def _write_copy(location: EnvLocation, raw: bytes) -> None:
    # No O_CREAT and no O_TRUNC, because the copy lives inside a disk or image file.
    try:
        fd = os.open(location.device, os.O_WRONLY)
    except OSError as exc:
        raise BootEnvError(
            f"cannot open {location.device} to write the U-Boot environment: {exc}"
        ) from exc
    try:
        written = os.pwrite(fd, raw, location.offset)
        if written != len(raw):
            raise BootEnvError(
                f"short write to {location.describe()}: {written} of {len(raw)} bytes;"
                " the other copy is still valid and current"
            )
        os.fsync(fd)
    except OSError as exc:
        raise BootEnvError(
            f"cannot write the U-Boot environment to {location.describe()}: {exc};"
            " the other copy is still valid and current"
        ) from exc
    finally:
        os.close(fd)


def parse_fw_env_config(text: str, source: str) -> tuple[EnvLocation, ...]:
    """Parse libubootenv's fw_env.config text into copy locations, in file order.

    Each non-empty line is ``device offset size [sector-size [sectors]]``, separated by
    blanks. ``#`` starts a comment anywhere on a line. The number formats follow what
    libubootenv 0.3.2 reads: the offset is decimal or ``0x`` hex, while the size,
    sector size and sector count are always hexadecimal, so ``2000`` means 0x2000.
    Forms that the two readings would disagree on are rejected: an offset with a
    leading 0 (octal to libubootenv), and a size-type field of more than one digit
    without the ``0x`` prefix.

    Raises:
        ConfigError: a line has fewer than 3 or more than 5 fields, or a number is
            malformed. The message names ``source``, the line number and the field.
    """
    locations = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{source}, line {number}"
        if not 3 <= len(fields) <= 5:
            raise ConfigError(
                f"{where}: expected 'device offset size [sector-size [sectors]]',"
                f" got {len(fields)} fields: {line.strip()!r}"
            )
        optional = [
            _parse_hex_field(token, name, where)
            for token, name in zip(
                fields[3:], ("sector size", "sector count"), strict=False
            )
        ]
        locations.append(
            EnvLocation(
                device=fields[0],
                offset=_parse_offset(fields[1], where),
                size=_parse_hex_field(fields[2], "size", where),
                sector_size=optional[0] if optional else None,
                sectors=optional[1] if len(optional) > 1 else None,
            )
        )
    return tuple(locations)


def load_fw_env_config(path: str) -> tuple[EnvLocation, EnvLocation]:
    """Read fw_env.config and return the two copy locations of a redundant environment.

    Raises:
        ConfigError: the file cannot be read, does not list exactly two copies, the
            copies differ in size, a size is not larger than the 5-byte header, or the
            two copies overlap on the same device.
    """
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the U-Boot environment configuration {path}: {exc}"
        ) from exc
    locations = parse_fw_env_config(text, path)
    if len(locations) != COPY_COUNT:
        raise ConfigError(
            f"{path}: expected {COPY_COUNT} lines (one per redundant environment copy),"
            f" found {len(locations)}"
        )
    first, second = locations
    _check_copy_pair(first, second, path)
    return first, second


def _check_copy_pair(first: EnvLocation, second: EnvLocation, path: str) -> None:
    if first.size != second.size:
        raise ConfigError(
            f"{path}: both environment copies must have the same size, got"
            f" {first.size:#x} and {second.size:#x}"
        )
    if first.size <= HEADER_SIZE:
        raise ConfigError(
            f"{path}: environment size {first.size:#x} is not larger than the"
            f" {HEADER_SIZE}-byte header"
        )
    same_device = os.path.realpath(first.device) == os.path.realpath(second.device)
    if same_device and abs(first.offset - second.offset) < first.size:
        raise ConfigError(
            f"{path}: the copies at offsets {first.offset:#x} and {second.offset:#x}"
            f" overlap on {first.device} (size {first.size:#x})"
        )


def _parse_offset(token: str, where: str) -> int:
    if _HEX_NUMBER.fullmatch(token):
        return int(token[2:], 16)
    if _DECIMAL_NUMBER.fullmatch(token):
        return int(token, 10)
    raise ConfigError(
        f"{where}: invalid offset {token!r}; expected decimal digits without a leading"
        " 0 (libubootenv would read it as octal) or 0x followed by hex digits"
    )


def _parse_hex_field(token: str, field: str, where: str) -> int:
    if _HEX_NUMBER.fullmatch(token):
        return int(token[2:], 16)
    # One decimal digit means the same in hex and decimal.
    if _SINGLE_DIGIT.fullmatch(token):
        return int(token)
    raise ConfigError(
        f"{where}: invalid {field} {token!r}; write it as 0x followed by hex digits,"
        " because libubootenv 0.3.2 reads this field as hexadecimal even without 0x"
    )
