"""Build OPKG ``.ipk`` application packages and application payloads on the host.

A package is built from a data directory and control fields, in either wrapper that
the device's updater reads (`updater.ipk`):

- ``ar``: an ar archive of ``debian-binary``, ``control.tar.*`` and ``data.tar.*``,
  as opkg-build (Yocto) writes it, with GNU ``ar`` member names (``debian-binary/``);
- ``tar``: a gzip-compressed tar of the same members, as OpenWrt's ipkg-build
  writes it (data before control).

Each inner tarball is compressed with gzip or xz. With ``dot_slash`` the members of
the tar wrapper and of both inner tarballs are named ``./NAME``, and the inner
tarballs start with a ``./`` entry for their root, as ``tar -C DIR -czf X .`` writes.

A directory in opkg-build's layout (the control file in ``DIR/CONTROL/control`` and
the application's files beside it) is built with `build_ipk_from_directory`.
`ShellApp` writes a small ``/bin/sh`` application for tests and scenarios.

All entries are owned by root (uid and gid 0), also when a user without root
privileges builds the package.
"""

from __future__ import annotations

import gzip
import io
import logging
import lzma
import os
import shlex
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mbl_sim.errors import ConfigError
from mbl_sim.payloads import wrap_payload
from updater.control import format_stanza, parse_stanzas

log = logging.getLogger(__name__)

WRAPPERS = ("ar", "tar")
COMPRESSIONS = ("gz", "xz")
CONTROL_DIRECTORY = "CONTROL"

_AR_MAGIC = b"!<arch>\n"
# Maximum member name length in a GNU ar header, which has 16 bytes for the name
# and its terminating '/'.
_AR_MAX_NAME = 15


@dataclass(frozen=True)
class IpkFormat:
    """Wrapper and compression of a package.

    Attributes:
        wrapper: ``ar`` (opkg-build, Yocto) or ``tar`` (gzip-compressed tar, OpenWrt).
        control_compression: ``gz`` or ``xz`` for ``control.tar.*``.
        data_compression: ``gz`` or ``xz`` for ``data.tar.*``.
        dot_slash: start member names with ``./`` (the tar wrapper and both inner
            tarballs; ar member names never carry it).
    """

    wrapper: str = "ar"
    control_compression: str = "gz"
    data_compression: str = "gz"
    dot_slash: bool = False

    def __post_init__(self) -> None:
        if self.wrapper not in WRAPPERS:
            raise ConfigError(
                f"ipk wrapper must be one of {', '.join(WRAPPERS)}, got"
                f" {self.wrapper!r}"
            )
        for name in ("control_compression", "data_compression"):
            value = getattr(self, name)
            if value not in COMPRESSIONS:
                raise ConfigError(
                    f"ipk {name} must be one of {', '.join(COMPRESSIONS)}, got"
                    f" {value!r}"
                )


def ipk_file_name(fields: Mapping[str, str]) -> str:
    """Return opkg-build's file name ``NAME_VERSION_ARCH.ipk`` (without the epoch)."""
    version = fields["Version"].partition(":")[2] or fields["Version"]
    return f"{fields['Package']}_{version}_{fields['Architecture']}.ipk"


def control_text(fields: Mapping[str, str]) -> str:
    """Return the control file for ``fields``.

    Raises:
        ConfigError: a field name or value cannot be written in control syntax.
    """
    try:
        return format_stanza(fields.items())
    except ValueError as exc:
        raise ConfigError(f"invalid control fields: {exc}") from exc


def build_ipk(
    data: Path,
    fields: Mapping[str, str],
    output: Path,
    package_format: IpkFormat | None = None,
    *,
    exclude: Sequence[str] = (),
) -> Path:
    """Build the package ``output`` from the directory ``data`` and the control
    ``fields``, and return ``output``.

    ``exclude`` names top-level entries of ``data`` to leave out.

    Raises:
        ConfigError: ``data`` is not a directory, or a field is invalid.
    """
    package_format = package_format or IpkFormat()
    if not data.is_dir():
        raise ConfigError(f"package data directory {data} not found")
    control = control_text(fields).encode()
    control_tar = _compress(
        _tar_bytes({"control": (control, 0o644)}, None, package_format.dot_slash),
        package_format.control_compression,
    )
    data_tar = _compress(
        _tar_bytes({}, (data, set(exclude)), package_format.dot_slash),
        package_format.data_compression,
    )
    members = [
        ("debian-binary", b"2.0\n"),
        (f"control.tar.{package_format.control_compression}", control_tar),
        (f"data.tar.{package_format.data_compression}", data_tar),
    ]
    output.parent.mkdir(parents=True, exist_ok=True)
    if package_format.wrapper == "ar":
        output.write_bytes(ar_bytes(members))
    else:
        # ipkg-build's order: debian-binary, data, control.
        reordered = [members[0], members[2], members[1]]
        output.write_bytes(_outer_tar_gz(reordered, package_format.dot_slash))
    log.info("built %s (%s wrapper)", output, package_format.wrapper)
    return output


def build_ipk_from_directory(
    directory: Path,
    output_dir: Path,
    package_format: IpkFormat | None = None,
    overrides: Mapping[str, str] | None = None,
) -> Path:
    """Build a package from a directory in opkg-build's layout and return its path.

    ``directory/CONTROL/control`` provides the control fields, ``overrides``
    replaces or adds fields, and every other entry of ``directory`` is data. The
    package is written to ``output_dir/NAME_VERSION_ARCH.ipk``.

    Raises:
        ConfigError: the control file is missing, invalid or lacks Package, Version
            or Architecture.
    """
    control_path = directory / CONTROL_DIRECTORY / "control"
    try:
        text = control_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read {control_path}: {exc}; a package directory needs its"
            f" control file in {CONTROL_DIRECTORY}/control"
        ) from exc
    stanzas, issues = parse_stanzas(text)
    if issues or len(stanzas) != 1:
        problem = issues[0].message if issues else f"{len(stanzas)} stanzas"
        raise ConfigError(f"{control_path}: invalid control file ({problem})")
    fields = {f.name: f.value for f in stanzas[0].fields}
    fields.update(overrides or {})
    missing = [
        name for name in ("Package", "Version", "Architecture") if not fields.get(name)
    ]
    if missing:
        raise ConfigError(f"{control_path}: missing field {', '.join(missing)}")
    output = output_dir / ipk_file_name(fields)
    return build_ipk(
        directory, fields, output, package_format, exclude=[CONTROL_DIRECTORY]
    )


def build_app_payload(packages: Sequence[Path], output: Path) -> Path:
    """Wrap ``packages`` into the payload tar ``output``, each under its file name.

    Raises:
        ConfigError: no packages, two with the same file name, or a missing file.
    """
    if not packages:
        raise ConfigError("an application payload needs at least one .ipk")
    members: dict[str, Path] = {}
    for package in packages:
        if not package.is_file():
            raise ConfigError(f"package {package} not found")
        if package.name in members:
            raise ConfigError(f"two packages are named {package.name}")
        members[package.name] = package
    return wrap_payload(members, output)


def ar_bytes(members: Sequence[tuple[str, bytes]]) -> bytes:
    """Return an ar archive of ``members`` (name, content) with GNU member names.

    Raises:
        ConfigError: a name is longer than 15 characters (this writer has no
            long-name table).
    """
    parts = [_AR_MAGIC]
    for name, content in members:
        if len(name) > _AR_MAX_NAME:
            raise ConfigError(f"ar member name {name!r} is longer than 15 characters")
        header = (
            f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{0o100644:<8o}{len(content):<10}`\n"
        )
        parts += [header.encode("ascii"), content]
        if len(content) % 2:
            parts.append(b"\n")
    return b"".join(parts)


def _compress(data: bytes, compression: str) -> bytes:
    if compression == "xz":
        return lzma.compress(data, format=lzma.FORMAT_XZ, preset=3)
    return gzip.compress(data, compresslevel=6, mtime=0)


def _root_owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _tar_bytes(
    files: Mapping[str, tuple[bytes, int]],
    tree: tuple[Path, set[str]] | None,
    dot_slash: bool,
) -> bytes:
    """Return an uncompressed tar of ``files`` (name → content, mode) and of the
    directory ``tree`` (path, top-level names to leave out)."""
    prefix = "./" if dot_slash else ""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        if tree is not None and dot_slash:
            archive.add(tree[0], arcname="./", recursive=False, filter=_root_owned)
        for name, (content, mode) in files.items():
            info = _root_owned(tarfile.TarInfo(prefix + name))
            info.size = len(content)
            info.mode = mode
            archive.addfile(info, io.BytesIO(content))
        if tree is not None:
            _add_tree(archive, tree[0], tree[1], prefix)
    return buffer.getvalue()


def _add_tree(
    archive: tarfile.TarFile, root: Path, exclude: set[str], prefix: str
) -> None:
    for directory, dirnames, filenames in os.walk(root):
        dirnames.sort()
        relative_dir = Path(directory).relative_to(root)
        if relative_dir == Path("."):
            dirnames[:] = [name for name in dirnames if name not in exclude]
            filenames = [name for name in filenames if name not in exclude]
        for name in sorted([*dirnames, *filenames]):
            path = Path(directory, name)
            arcname = prefix + (relative_dir / name).as_posix()
            archive.add(path, arcname=arcname, recursive=False, filter=_root_owned)


def _outer_tar_gz(members: Sequence[tuple[str, bytes]], dot_slash: bool) -> bytes:
    prefix = "./" if dot_slash else ""
    files = {name: (content, 0o644) for name, content in members}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for name, (content, mode) in files.items():
            info = _root_owned(tarfile.TarInfo(prefix + name))
            info.size = len(content)
            info.mode = mode
            archive.addfile(info, io.BytesIO(content))
    return gzip.compress(buffer.getvalue(), compresslevel=6, mtime=0)


@dataclass(frozen=True)
class ShellApp:
    """A small application: a ``/bin/sh`` script run as ``bin/NAME``.

    Attributes:
        name: the package name.
        version: the package version.
        script: the body of the script, after ``#!/bin/sh``.
        architecture: the ``Architecture`` field.
        stop_timeout: ``App-Stop-Timeout`` in seconds, or None to leave it out.
        health_window: ``App-Health-Window`` in seconds, or None to leave it out.
        depends: the ``Depends`` field, or "" to leave it out.
        files: more data files: path in the package → content.
        fields: more control fields, or replacements.
    """

    name: str
    version: str
    script: str = "while :; do sleep 1; done"
    architecture: str = "all"
    stop_timeout: float | None = None
    health_window: float | None = 1.0
    depends: str = ""
    files: Mapping[str, bytes] = field(default_factory=dict)
    fields: Mapping[str, str] = field(default_factory=dict)

    def control_fields(self) -> dict[str, str]:
        """Return the control fields of the package."""
        fields = {
            "Package": self.name,
            "Version": self.version,
            "Architecture": self.architecture,
            "Maintainer": "mbl-sim <mbl-sim@localhost>",
            "Description": f"mbl-sim test application {self.name}",
            "App-Exec": shlex.join([f"bin/{self.name}"]),
        }
        if self.depends:
            fields["Depends"] = self.depends
        if self.stop_timeout is not None:
            fields["App-Stop-Timeout"] = f"{self.stop_timeout:g}"
        if self.health_window is not None:
            fields["App-Health-Window"] = f"{self.health_window:g}"
        fields.update(self.fields)
        return fields

    def write_tree(self, directory: Path) -> Path:
        """Write the application's data files under ``directory`` and return it."""
        program = directory / "bin" / self.name
        program.parent.mkdir(parents=True, exist_ok=True)
        program.write_text(f"#!/bin/sh\n{self.script}\n")
        program.chmod(0o755)
        for relative, content in self.files.items():
            path = directory / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        return directory

    def build(self, output_dir: Path, package_format: IpkFormat | None = None) -> Path:
        """Build the package into ``output_dir`` and return its path."""
        fields = self.control_fields()
        with tempfile.TemporaryDirectory(prefix="mbl-app-") as scratch:
            # The ./ root entry of a dot_slash build records this directory's mode,
            # which mkdtemp creates as 0700.
            os.chmod(scratch, 0o755)
            data = self.write_tree(Path(scratch))
            return build_ipk(
                data, fields, output_dir / ipk_file_name(fields), package_format
            )


def build_shell_app_payload(
    apps: Sequence[ShellApp],
    output: Path,
    package_format: IpkFormat | None = None,
) -> Path:
    """Build ``apps`` and wrap them into the payload ``output``; return its path."""
    package_dir = output.with_name(output.name + ".packages")
    package_dir.mkdir(parents=True, exist_ok=True)
    packages = [app.build(package_dir, package_format) for app in apps]
    return build_app_payload(packages, output)
