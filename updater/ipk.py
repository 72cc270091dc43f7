"""Read OPKG ``.ipk`` packages: the wrapper, the control file and the data tarball.

An .ipk has three members:

- ``debian-binary``: the package format version, ``2.0``;
- ``control.tar.*``: the ``control`` file, and maintainer scripts that are not run;
- ``data.tar.*``: the files of the application.

Two wrappers are in use and both are read. opkg-build (opkg-utils, used by Yocto)
writes an ``ar`` archive as dpkg does. OpenWrt's ipkg-build writes a gzip-compressed
tar. Member names may start with ``./`` in either wrapper. The inner tarballs may be
compressed with gzip (``.tar.gz``), xz (``.tar.xz``) or bzip2 (``.tar.bz2``), or not
at all (``.tar``). Members whose name starts with ``_`` are ignored, as dpkg does.

The ``ar`` format is parsed here. An archive starts with the 8-byte magic
``!<arch>\\n``. Each member has a 60-byte header (name 16, mtime 12, uid 6, gid 6,
mode 8, size 10, magic 2 bytes) followed by its data, padded with ``\\n`` to an even
offset. GNU ``ar`` ends short names with ``/`` and keeps long names in a ``//``
member. BSD ``ar`` writes ``#1/LENGTH`` and puts the name before the data.

The data tarball is read twice. `IpkPackage.scan_data` checks every entry and counts
the space it needs before anything is written. `IpkPackage.extract_data` then writes
it. Entries are checked with the rules of `updater.members.plan_member`, so nothing
lands outside the application's directory: no absolute names, no ``..``, nothing
written through a symbolic link. Only directories, regular files, symbolic and hard
links are accepted. Files are owned by the updater's user (root) whatever the
tarball says, and setuid and setgid bits are dropped, because an application runs as
root anyway and the owners of a build host mean nothing on the device.

The control file must contain these fields:

- ``Package``: the package name (Debian policy: ``[a-z0-9][a-z0-9+.-]+``);
- ``Version``: ``[epoch:]upstream[-revision]``;
- ``Architecture``: the device's architecture, ``all`` or ``noarch``;
- ``App-Exec``: the command that runs the application in the foreground, split into
  words as a POSIX shell would, without expansions. A program path with a ``/`` that
  is not absolute is taken relative to the package's data directory and must be an
  executable file in the package.

and may contain:

- ``Depends``, ``Provides``: as in Debian;
- ``App-Stop-Timeout``: seconds between SIGTERM and SIGKILL when the application is
  stopped (default 5);
- ``App-Health-Window``: seconds the application must keep running after it starts
  for the start to count as successful (default 2).
"""

from __future__ import annotations

import bz2
import gzip
import io
import logging
import lzma
import math
import os
import shlex
import stat
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, TypeVar, cast

from updater.control import (
    PACKAGE_NAME,
    Dependency,
    Relation,
    Stanza,
    Version,
    parse_provides,
    parse_relations,
    parse_stanzas,
    parse_version,
)
from updater.errors import AppError, PackageError, UnsafeMemberError
from updater.members import (
    ROOT,
    EntryKind,
    MemberPlan,
    estimate_space,
    normalize_member_name,
    plan_member,
    record_plan,
)

log = logging.getLogger(__name__)

AR_MAGIC = b"!<arch>\n"
GZIP_MAGIC = b"\x1f\x8b"
DEBIAN_BINARY = "debian-binary"
CONTROL_FILE = "control"

DEFAULT_STOP_TIMEOUT = 5.0
DEFAULT_HEALTH_WINDOW = 2.0
# Upper bound of App-Stop-Timeout and App-Health-Window, in seconds, so that a typo
# cannot make an update wait for hours.
MAX_SECONDS = 600.0

_T = TypeVar("_T")

_AR_HEADER_SIZE = 60
_AR_HEADER_END = b"`\n"
# Bytes per read from a member or a decompressor. tarfile's stream mode reads 10 KiB
# at a time by default, and each read costs several Python calls, which dominate
# under emulation.
_CHUNK = 1 << 20
_COMPRESSIONS = {".tar": "", ".tar.gz": "gz", ".tar.xz": "xz", ".tar.bz2": "bz2"}
_UNSUPPORTED = {".tar.zst": "zstd", ".tar.lzma": "lzma (legacy)"}
_MAINTAINER_SCRIPTS = ("preinst", "postinst", "prerm", "postrm")
# Permission bits kept from the tarball: setuid and setgid are dropped.
_MODE_MASK = 0o1777
_READ_ERRORS = (
    tarfile.TarError,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    OSError,
    ValueError,
)


@dataclass(frozen=True)
class AppControl:
    """The validated control file of an application package.

    Attributes:
        name: the ``Package`` field.
        version: the parsed ``Version`` field.
        architecture: the ``Architecture`` field.
        depends: the parsed ``Depends`` field.
        provides: the parsed ``Provides`` field.
        command: the ``App-Exec`` field split into words.
        stop_timeout: seconds between SIGTERM and SIGKILL.
        health_window: seconds the app must keep running after it starts.
        stanza: all fields of the control file.
    """

    name: str
    version: Version
    architecture: str
    depends: tuple[Dependency, ...]
    provides: tuple[Relation, ...]
    command: tuple[str, ...]
    stop_timeout: float
    health_window: float
    stanza: Stanza

    @property
    def label(self) -> str:
        """``NAME VERSION``, as messages show a package."""
        return f"{self.name} {self.version}"


@dataclass(frozen=True)
class DataSummary:
    """Contents and space needs of the data tarball of a package.

    Attributes:
        members: tarball entries.
        file_bytes: sum of the regular file sizes.
        space_bytes: bytes of whole blocks the entries need on the target filesystem,
            counted by `updater.members.estimate_space`.
        inodes: inodes the entries need.
    """

    members: int
    file_bytes: int
    space_bytes: int
    inodes: int


def parse_control(text: str, source: str) -> AppControl:
    """Parse and validate the text of an application's control file.

    Raises:
        PackageError: a syntax error, a missing field or an invalid value. The
            message names ``source``, the field and the value.
    """
    stanzas, issues = parse_stanzas(text)
    if issues:
        raise PackageError(f"{source}: invalid control file: {issues[0].message}")
    if len(stanzas) != 1:
        raise PackageError(
            f"{source}: the control file must contain exactly one stanza, it has"
            f" {len(stanzas)}"
        )
    stanza = stanzas[0]
    name = _required(stanza, "Package", source)
    if not PACKAGE_NAME.fullmatch(name):
        raise PackageError(
            f"{source}: invalid Package {name!r}; a package name has at least two"
            " characters from a-z, 0-9, '+', '-', '.' and starts with a letter or"
            " digit"
        )
    try:
        version = parse_version(_required(stanza, "Version", source))
        depends = parse_relations(stanza.get("Depends") or "")
    except ValueError as exc:
        raise PackageError(f"{source}: {exc}") from exc
    return AppControl(
        name=name,
        version=version,
        architecture=_required(stanza, "Architecture", source),
        depends=depends,
        provides=_provides(stanza, source),
        command=_command(stanza, source),
        stop_timeout=_seconds(stanza, "App-Stop-Timeout", DEFAULT_STOP_TIMEOUT, source),
        health_window=_seconds(
            stanza, "App-Health-Window", DEFAULT_HEALTH_WINDOW, source
        ),
        stanza=stanza,
    )


def _required(stanza: Stanza, name: str, source: str) -> str:
    value = stanza.get(name)
    if not value:
        state = "missing" if value is None else "empty"
        raise PackageError(
            f"{source}: control field {name} is {state}; an application package"
            " needs Package, Version, Architecture and App-Exec"
        )
    return value


def _provides(stanza: Stanza, source: str) -> tuple[Relation, ...]:
    try:
        return parse_provides(stanza.get("Provides") or "")
    except ValueError as exc:
        raise PackageError(f"{source}: {exc}") from exc


def _command(stanza: Stanza, source: str) -> tuple[str, ...]:
    text = _required(stanza, "App-Exec", source)
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise PackageError(f"{source}: cannot split App-Exec {text!r}: {exc}") from exc
    if not words:
        raise PackageError(f"{source}: App-Exec {text!r} names no program")
    program = words[0]
    if not program.startswith("/") and ".." in program.split("/"):
        raise PackageError(
            f"{source}: App-Exec program {program!r} leaves the package's directory;"
            " use a path inside the package or an absolute path"
        )
    return tuple(words)


def _seconds(stanza: Stanza, name: str, default: float, source: str) -> float:
    text = stanza.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= MAX_SECONDS:
        raise PackageError(
            f"{source}: {name} must be a number of seconds from 0 to {MAX_SECONDS:g},"
            f" got {text!r}"
        )
    return value


# -- wrappers -----------------------------------------------------------------------


class _Window(io.RawIOBase):
    """Read-only view of ``size`` bytes at ``offset`` of a seekable stream."""

    def __init__(self, stream: IO[bytes], offset: int, size: int) -> None:
        super().__init__()
        self._stream = stream
        self._offset = offset
        self._size = size
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}
        self._position = max(0, base[whence] + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count = min(len(view), self._size - self._position)
        if count <= 0:
            return 0
        self._stream.seek(self._offset + self._position)
        data = self._stream.read(count)
        view[: len(data)] = data
        self._position += len(data)
        return len(data)


@dataclass(frozen=True)
class _Member:
    name: str
    offset: int
    size: int


class _Wrapper:
    """The outer archive of an .ipk: its members by name without ``./``."""

    kind = ""

    def names(self) -> list[str]:
        raise NotImplementedError

    def open(self, name: str) -> IO[bytes]:
        raise NotImplementedError


class _ArWrapper(_Wrapper):
    kind = "ar"

    def __init__(self, stream: IO[bytes], source: str) -> None:
        self._stream = stream
        self._members = _read_ar_index(stream, source)

    def names(self) -> list[str]:
        return list(self._members)

    def open(self, name: str) -> IO[bytes]:
        member = self._members[name]
        window = _Window(self._stream, member.offset, member.size)
        return io.BufferedReader(window, buffer_size=_CHUNK)


class _TarWrapper(_Wrapper):
    kind = "gzip-compressed tar"

    def __init__(self, stream: IO[bytes], source: str) -> None:
        self._source = source
        try:
            # Open as long as the package is used. The caller owns and closes
            # ``stream``, and the tarfile has no other resource to release.
            self._archive = tarfile.open(fileobj=stream, mode="r:gz")  # noqa: SIM115
            infos = self._archive.getmembers()
        except _READ_ERRORS as exc:
            raise PackageError(
                f"{source} is not a valid .ipk: it is gzip-compressed but not a"
                f" readable tar archive ({exc})"
            ) from exc
        self._members: dict[str, tarfile.TarInfo] = {}
        for info in infos:
            name = _strip_dot_slash(info.name)
            if info.isdir() and name in ("", "."):
                continue
            if not info.isfile():
                raise PackageError(
                    f"{source} is not a valid .ipk: member {info.name!r} is not a"
                    " regular file"
                )
            _add_unique(self._members, name, info, source)

    def names(self) -> list[str]:
        return list(self._members)

    def open(self, name: str) -> IO[bytes]:
        stream = self._archive.extractfile(self._members[name])
        if stream is None:
            raise PackageError(f"{self._source}: cannot read member {name!r}")
        return stream


def _strip_dot_slash(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def _add_unique(members: dict[str, _T], name: str, value: _T, source: str) -> None:
    if name in members:
        raise PackageError(
            f"{source} is not a valid .ipk: member {name!r} occurs more than once"
        )
    members[name] = value


def _read_ar_index(stream: IO[bytes], source: str) -> dict[str, _Member]:
    size = stream.seek(0, io.SEEK_END)
    members: dict[str, _Member] = {}
    long_names = b""
    position = len(AR_MAGIC)
    while position < size:
        if size - position < _AR_HEADER_SIZE:
            raise PackageError(
                f"{source} is not a valid .ipk: ar archive is truncated at offset"
                f" {position} (a member header needs {_AR_HEADER_SIZE} bytes)"
            )
        stream.seek(position)
        header = stream.read(_AR_HEADER_SIZE)
        name, data_offset, data_size, total = _parse_ar_header(
            header, position, long_names, stream, source
        )
        if position + _AR_HEADER_SIZE + total > size:
            raise PackageError(
                f"{source} is not a valid .ipk: ar member {name!r} needs {total}"
                f" bytes after offset {position + _AR_HEADER_SIZE}, the file ends"
                f" at {size}; the package is truncated"
            )
        if name == "//":
            stream.seek(data_offset)
            long_names = stream.read(data_size)
        elif name not in ("/", "/SYM64/"):
            _add_unique(
                members,
                _strip_dot_slash(name),
                _Member(name, data_offset, data_size),
                source,
            )
        position += _AR_HEADER_SIZE + total + total % 2
    return members


def _parse_ar_header(
    header: bytes, position: int, long_names: bytes, stream: IO[bytes], source: str
) -> tuple[str, int, int, int]:
    """Return a member's name, data offset, data size and size in the archive."""
    where = f"{source} is not a valid .ipk: ar member header at offset {position}"
    if header[58:60] != _AR_HEADER_END:
        raise PackageError(f"{where} does not end with '`\\n'")
    size_field = header[48:58].strip()
    if not size_field.isdigit():
        raise PackageError(f"{where} has an invalid size field {size_field!r}")
    total = int(size_field)
    try:
        raw_name = header[:16].decode("ascii").rstrip(" ")
    except UnicodeDecodeError:
        raise PackageError(f"{where} has a name that is not ASCII") from None
    data_offset = position + _AR_HEADER_SIZE

    if raw_name.startswith("#1/") and raw_name[3:].isdigit():
        # BSD: the name is the first LENGTH bytes of the member's data.
        length = int(raw_name[3:])
        if length > total:
            raise PackageError(f"{where}: BSD name length {length} exceeds the member")
        stream.seek(data_offset)
        name = stream.read(length).rstrip(b"\0").decode("ascii", "replace")
        return name, data_offset + length, total - length, total

    if raw_name.startswith("/") and raw_name[1:].isdigit():
        # GNU: "/OFFSET" names the entry at OFFSET of the "//" member.
        return _gnu_long_name(raw_name, long_names, where), data_offset, total, total

    if raw_name in ("/", "//", "/SYM64/"):
        return raw_name, data_offset, total, total
    return raw_name.rstrip("/"), data_offset, total, total


def _gnu_long_name(raw_name: str, long_names: bytes, where: str) -> str:
    start = int(raw_name[1:])
    end = long_names.find(b"/\n", start)
    if start >= len(long_names) or end < 0:
        raise PackageError(f"{where}: long name {raw_name!r} is not in the table")
    return long_names[start:end].decode("ascii", "replace")


def _open_wrapper(stream: IO[bytes], source: str) -> _Wrapper:
    stream.seek(0)
    start = stream.read(512)
    stream.seek(0)
    if start.startswith(AR_MAGIC):
        return _ArWrapper(stream, source)
    if start.startswith(GZIP_MAGIC):
        return _TarWrapper(stream, source)
    raise PackageError(_not_an_ipk(start, source))


def _not_an_ipk(start: bytes, source: str) -> str:
    message = (
        f"{source} is not a valid .ipk: expected an ar archive (starting with"
        f" '!<arch>') or a gzip-compressed tar, but the file"
    )
    if not start:
        return f"{message} is empty"
    message += f" starts with {start[:32]!r}"
    lowered = start.lstrip().lower()
    if lowered.startswith((b"<!doctype html", b"<html")) or b"<html" in lowered:
        message += (
            "; it is an HTML page, for example an error page that a download saved"
            " in place of the package"
        )
    elif lowered.startswith(b"<"):
        message += "; it is an XML or HTML document"
    return message + ". Download or build the package again"


# -- packages -----------------------------------------------------------------------


@dataclass(frozen=True)
class _InnerTar:
    name: str
    compression: str


class IpkPackage:
    """An opened .ipk: its wrapper, its validated control file and its data member.

    Use `open_ipk` to create one. The package reads from the stream it was opened on,
    so the stream must stay open while the package is used.
    """

    def __init__(
        self,
        source: str,
        wrapper: _Wrapper,
        control: AppControl,
        data: _InnerTar,
        scripts: tuple[str, ...],
    ) -> None:
        self.source = source
        self.wrapper_kind = wrapper.kind
        self.control = control
        self.data_member = data.name
        self.maintainer_scripts = scripts
        self._wrapper = wrapper
        self._data = data

    def scan_data(self, block_size: int) -> DataSummary:
        """Check every entry of the data tarball and count what extracting it needs on
        a filesystem with ``block_size``-byte blocks. Nothing is written.

        Raises:
            PackageError: the tarball is corrupt, an entry would land outside the
                application's directory or has an unsupported type, or the App-Exec
                program is not an executable file in the package.
        """
        infos: list[tarfile.TarInfo] = []
        tree: dict[str, EntryKind] = {ROOT: EntryKind.DIRECTORY}
        modes: dict[str, int] = {}
        for info, _ in self._data_members():
            plan = self._plan(info, tree)
            record_plan(tree, plan)
            modes[plan.path] = info.mode
            infos.append(info)
        self._check_program(tree, modes)
        space, inodes = estimate_space(infos, block_size, root_entries=())
        return DataSummary(
            members=len(infos),
            file_bytes=sum(info.size for info in infos if info.isfile()),
            space_bytes=space,
            inodes=inodes,
        )

    def extract_data(self, target: str) -> int:
        """Extract the data tarball into the empty directory ``target``; return the
        number of entries. The caller syncs the filesystem.

        Raises:
            PackageError: as `scan_data`; ``target`` may then contain part of the
                data, and the caller removes it.
            AppError: writing into ``target`` failed.
        """
        tree: dict[str, EntryKind] = {ROOT: EntryKind.DIRECTORY}
        directories: list[tuple[str, tarfile.TarInfo]] = []
        count = 0
        for info, archive in self._data_members():
            plan = self._plan(info, tree)
            path = os.path.join(target, plan.path) if plan.path else target
            try:
                for parent in plan.new_parents:
                    os.mkdir(os.path.join(target, parent), 0o755)
                _create_entry(info, plan.kind, plan.link_target, path, target, archive)
            except OSError as exc:
                raise AppError(
                    f"cannot extract {info.name!r} of {self.source} to {path}: {exc}"
                ) from exc
            if plan.kind is EntryKind.DIRECTORY and plan.link_target is None:
                directories.append((path, info))
            record_plan(tree, plan)
            count += 1
        for path, info in reversed(directories):
            try:
                _set_mode_and_mtime(path, info)
            except OSError as exc:
                raise AppError(f"cannot set mode of {path}: {exc}") from exc
        return count

    def _plan(self, info: tarfile.TarInfo, tree: dict[str, EntryKind]) -> MemberPlan:
        where = f"{self.source}: data entry {info.name!r}"
        if not (info.isdir() or info.isfile() or info.issym() or info.islnk()):
            raise PackageError(
                f"{where} is a device node, FIFO or other special file; an"
                " application package may contain only directories, regular files"
                " and links"
            )
        try:
            plan = plan_member(info, tree)
        except UnsafeMemberError as exc:
            raise PackageError(
                f"{where} would land outside the application's directory or"
                f" replace another entry: {exc}"
            ) from exc
        return plan

    def _check_program(self, tree: dict[str, EntryKind], modes: dict[str, int]) -> None:
        program = self.control.command[0]
        if program.startswith("/") or "/" not in program:
            return
        path = normalize_member_name(program)
        kind = tree.get(path)
        if kind is None:
            raise PackageError(
                f"{self.source}: App-Exec program {program!r} is not in the package's"
                f" data ({self.data_member})"
            )
        if kind is EntryKind.FILE and not modes.get(path, 0) & 0o111:
            raise PackageError(
                f"{self.source}: App-Exec program {program!r} is not executable"
                f" (mode {stat.S_IMODE(modes.get(path, 0)):04o})"
            )
        if kind is EntryKind.DIRECTORY:
            raise PackageError(
                f"{self.source}: App-Exec program {program!r} is a directory"
            )

    def _data_members(self) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
        yield from _read_inner_tar(self._wrapper, self._data, self.source)


def open_ipk(stream: IO[bytes], source: str) -> IpkPackage:
    """Open the .ipk in the seekable ``stream``, check its members and read its
    control file. ``source`` names the package in messages.

    Raises:
        PackageError: the file is not an .ipk in either wrapper, a member is missing,
            duplicated or unexpected, the format version is not 2.x, an inner
            tarball uses an unsupported compression or is corrupt, or the control
            file is invalid.
    """
    wrapper = _open_wrapper(stream, source)
    control_tar, data_tar = _find_members(wrapper, source)
    _check_debian_binary(wrapper, source)
    control_text, scripts = _read_control_tar(wrapper, control_tar, source)
    control = parse_control(control_text, source)
    package = IpkPackage(source, wrapper, control, data_tar, scripts)
    log.info(
        "%s: package %s, %s wrapper, %s, %s",
        source,
        control.label,
        wrapper.kind,
        control_tar.name,
        data_tar.name,
    )
    return package


def _find_members(wrapper: _Wrapper, source: str) -> tuple[_InnerTar, _InnerTar]:
    found: dict[str, _InnerTar] = {}
    names = wrapper.names()
    for name in names:
        if name == DEBIAN_BINARY or name.startswith("_"):
            continue
        stem, dot, _ = name.partition(".")
        if stem not in ("control", "data") or not dot:
            raise PackageError(
                f"{source} is not a valid .ipk: unexpected member {name!r}; expected"
                " debian-binary, control.tar.* and data.tar.*"
            )
        if stem in found:
            raise PackageError(
                f"{source} is not a valid .ipk: both {found[stem].name!r} and"
                f" {name!r} are present"
            )
        found[stem] = _InnerTar(name, _compression(name, source))
    missing = [
        member
        for member, present in (
            (DEBIAN_BINARY, DEBIAN_BINARY in names),
            ("control.tar.*", "control" in found),
            ("data.tar.*", "data" in found),
        )
        if not present
    ]
    if missing:
        raise PackageError(
            f"{source} is not a valid .ipk: member {', '.join(missing)} is missing"
            f" (members: {', '.join(names) or 'none'})"
        )
    return found["control"], found["data"]


def _compression(name: str, source: str) -> str:
    suffix = name[name.index(".") :]
    if suffix in _COMPRESSIONS:
        return _COMPRESSIONS[suffix]
    if suffix in _UNSUPPORTED:
        raise PackageError(
            f"{source}: member {name!r} is compressed with {_UNSUPPORTED[suffix]},"
            " which this updater cannot read; rebuild the package with gzip or xz"
        )
    raise PackageError(
        f"{source} is not a valid .ipk: member {name!r} is not a tarball"
        " (.tar, .tar.gz, .tar.xz or .tar.bz2)"
    )


def _check_debian_binary(wrapper: _Wrapper, source: str) -> None:
    with wrapper.open(DEBIAN_BINARY) as stream:
        content = stream.read(64)
    version = content.strip()
    if version != b"2" and not version.startswith(b"2."):
        raise PackageError(
            f"{source} is not a valid .ipk: debian-binary contains {content!r},"
            " expected format version 2.0"
        )


def _read_control_tar(
    wrapper: _Wrapper, member: _InnerTar, source: str
) -> tuple[str, tuple[str, ...]]:
    text: str | None = None
    scripts = []
    for info, archive in _read_inner_tar(wrapper, member, source):
        name = _strip_dot_slash(info.name)
        if name in _MAINTAINER_SCRIPTS:
            scripts.append(name)
        if name != CONTROL_FILE or not info.isfile():
            continue
        stream = archive.extractfile(info)
        if stream is None:
            continue
        try:
            text = stream.read().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PackageError(
                f"{source}: the control file is not valid UTF-8 ({exc})"
            ) from exc
    if text is None:
        raise PackageError(
            f"{source} is not a valid .ipk: {member.name} has no 'control' file"
        )
    return text, tuple(scripts)


def _read_inner_tar(
    wrapper: _Wrapper, member: _InnerTar, source: str
) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    """Yield the entries of an inner tarball in stream mode, then read the
    decompressed stream to its end, so that a truncated or corrupt member fails
    even when tarfile stopped at an end-of-archive block before the damage."""
    try:
        with wrapper.open(member.name) as raw:
            stream = _decompress(raw, member.compression)
            with tarfile.open(fileobj=stream, mode="r|", bufsize=_CHUNK) as archive:
                for info in archive:
                    yield info, archive
            while chunk := stream.read(_CHUNK):
                if chunk.strip(b"\0"):
                    raise PackageError(
                        f"{source}: {member.name} has data after its end-of-archive"
                        " block; a tar header is damaged"
                    )
    except (PackageError, AppError):
        raise
    except _READ_ERRORS as exc:
        raise PackageError(
            f"{source}: {member.name} is truncated or corrupt ({exc}); download or"
            " build the package again"
        ) from exc


def _decompress(raw: IO[bytes], compression: str) -> IO[bytes]:
    if compression == "gz":
        # typeshed does not declare GzipFile as an IO[bytes], but it is one.
        return cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
    if compression == "xz":
        return lzma.LZMAFile(raw, mode="rb", format=lzma.FORMAT_XZ)
    if compression == "bz2":
        return bz2.BZ2File(raw, mode="rb")
    return raw


# -- extraction ---------------------------------------------------------------------


def _create_entry(
    info: tarfile.TarInfo,
    kind: EntryKind,
    link_target: str | None,
    path: str,
    root: str,
    archive: tarfile.TarFile,
) -> None:
    if link_target is not None:
        os.link(os.path.join(root, link_target), path, follow_symlinks=False)
    elif kind is EntryKind.DIRECTORY:
        if not os.path.isdir(path) or os.path.islink(path):
            os.mkdir(path, 0o700)
    elif kind is EntryKind.SYMLINK:
        os.symlink(info.linkname, path)
        mtime = round(info.mtime * 1_000_000_000)
        os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
    else:
        _write_file(info, path, archive)


def _write_file(info: tarfile.TarInfo, path: str, archive: tarfile.TarFile) -> None:
    source = archive.extractfile(info)
    if source is None:
        raise PackageError(f"data entry {info.name!r} has no content")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        remaining = info.size
        while remaining:
            chunk = _read_chunk(source, min(_CHUNK, remaining), info)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            remaining -= len(chunk)
        _set_mode_and_mtime(fd, info)
    finally:
        os.close(fd)


def _read_chunk(source: IO[bytes], size: int, info: tarfile.TarInfo) -> bytes:
    # Errors while reading come from the package, not from the device's storage.
    try:
        chunk = source.read(size)
    except _READ_ERRORS as exc:
        raise PackageError(f"cannot read data entry {info.name!r}: {exc}") from exc
    if not chunk:
        raise PackageError(f"data entry {info.name!r} ends early; the package is cut")
    return chunk


def _set_mode_and_mtime(target: str | int, info: tarfile.TarInfo) -> None:
    os.chmod(target, stat.S_IMODE(info.mode) & _MODE_MASK)
    mtime = round(info.mtime * 1_000_000_000)
    os.utime(target, ns=(mtime, mtime))
