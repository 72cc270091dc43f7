"""Tests for reading .ipk packages: both wrappers, inner compressions, ./ names,
ar dialects, invalid packages and unsafe data entries."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from mbl_sim.ipk import IpkFormat, ShellApp, ar_bytes, build_ipk
from updater.errors import PackageError
from updater.ipk import IpkPackage, open_ipk

FORMATS = {
    "ar-gz": IpkFormat(),
    "ar-xz-data": IpkFormat(data_compression="xz"),
    "ar-xz-both": IpkFormat(control_compression="xz", data_compression="xz"),
    "tar-gz-dot-slash": IpkFormat(wrapper="tar", dot_slash=True),
    "tar-gz-plain-names": IpkFormat(wrapper="tar"),
    "tar-xz-data-dot-slash": IpkFormat(
        wrapper="tar", data_compression="xz", dot_slash=True
    ),
}

APP = ShellApp(
    "hello",
    "1.0.0-r0",
    files={"share/hello/greeting.txt": b"hello\n" * 100, "etc/hello.conf": b"a=1\n"},
    stop_timeout=3,
    health_window=0.5,
)


def open_path(path: Path) -> IpkPackage:
    return open_ipk(path.open("rb"), path.name)


def tree(root: Path) -> dict[str, tuple[int, bytes | str | None]]:
    """Map each path below ``root`` to its mode and content (or link target)."""
    entries: dict[str, tuple[int, bytes | str | None]] = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(directory, name)
            info = path.lstat()
            content: bytes | str | None = None
            if stat.S_ISLNK(info.st_mode):
                content = os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                content = path.read_bytes()
            entries[str(path.relative_to(root))] = (info.st_mode, content)
    return entries


def data_tar(entries: list[tarfile.TarInfo], contents: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for info in entries:
            data = contents.get(info.name)
            if data is not None:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                archive.addfile(info)
    return gzip.compress(buffer.getvalue())


def control_tar(control: str, extra: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in {"./control": control.encode(), **(extra or {})}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return gzip.compress(buffer.getvalue())


CONTROL = (
    "Package: hello\nVersion: 1.0\nArchitecture: all\nApp-Exec: bin/hello --loop\n"
)


def entry(
    name: str, kind: bytes = tarfile.REGTYPE, **values: object
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind in (tarfile.DIRTYPE, tarfile.REGTYPE) else 0o777
    for key, value in values.items():
        setattr(info, key, value)
    return info


def handmade_ipk(
    path: Path,
    data: bytes,
    control: bytes | None = None,
    members: list[tuple[str, bytes]] | None = None,
) -> Path:
    control = control if control is not None else control_tar(CONTROL)
    members = members or [
        ("debian-binary", b"2.0\n"),
        ("control.tar.gz", control),
        ("data.tar.gz", data),
    ]
    path.write_bytes(ar_bytes(members))
    return path


def program_entries() -> tuple[list[tarfile.TarInfo], dict[str, bytes]]:
    return (
        [entry("bin", tarfile.DIRTYPE), entry("bin/hello")],
        {"bin/hello": b"#!/bin/sh\nsleep 100\n"},
    )


# -- wrappers and compressions -------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_reads_control(tmp_path: Path, name: str) -> None:
    package = open_path(APP.build(tmp_path, FORMATS[name]))
    control = package.control
    assert control.name == "hello"
    assert str(control.version) == "1.0.0-r0"
    assert control.architecture == "all"
    assert control.command == ("bin/hello",)
    assert control.stop_timeout == 3
    assert control.health_window == 0.5
    expected_kind = "ar" if FORMATS[name].wrapper == "ar" else "gzip-compressed tar"
    assert package.wrapper_kind == expected_kind
    assert package.data_member == f"data.tar.{FORMATS[name].data_compression}"


def test_every_format_extracts_identical_files(tmp_path: Path) -> None:
    trees = {}
    for name, package_format in FORMATS.items():
        package = open_path(APP.build(tmp_path / name, package_format))
        target = tmp_path / name / "data"
        target.mkdir()
        package.extract_data(str(target))
        trees[name] = tree(target)
    reference = trees.pop("ar-gz")
    assert set(reference) == {
        "bin",
        "bin/hello",
        "etc",
        "etc/hello.conf",
        "share",
        "share/hello",
        "share/hello/greeting.txt",
    }
    for name, files in trees.items():
        assert files == reference, name


def test_scan_counts_files_and_space(tmp_path: Path) -> None:
    package = open_path(APP.build(tmp_path))
    summary = package.scan_data(block_size=1024)
    script = len(f"#!/bin/sh\n{APP.script}\n")
    assert summary.file_bytes == 600 + 4 + script
    assert summary.members == 7
    assert summary.inodes == 7
    # Three files of one block each and four directories of one block each.
    assert summary.space_bytes == 7 * 1024


def test_binutils_ar_package_is_read(tmp_path: Path) -> None:
    if shutil.which("ar") is None:
        pytest.skip("binutils ar not found")
    built = open_path(APP.build(tmp_path / "ours"))
    members = tmp_path / "members"
    members.mkdir()
    subprocess.run(
        ["ar", "x", str(tmp_path / "ours" / "hello_1.0.0-r0_all.ipk")],
        cwd=members,
        check=True,
    )
    repacked = tmp_path / "binutils.ipk"
    subprocess.run(
        ["ar", "rc", str(repacked), "debian-binary", "control.tar.gz", "data.tar.gz"],
        cwd=members,
        check=True,
    )
    assert open_path(repacked).control.label == built.control.label


def test_ar_names_without_slash_or_with_dot_slash(tmp_path: Path) -> None:
    entries, contents = program_entries()
    data = data_tar(entries, contents)
    members = [
        ("./debian-binary", b"2.0\n"),
        ("control.tar.gz", control_tar(CONTROL)),
        ("data.tar.gz", data),
    ]
    raw = bytearray(ar_bytes(members))
    # dpkg-deb style: names padded with spaces and no trailing '/'.
    raw = raw.replace(b"control.tar.gz/", b"control.tar.gz ")
    path = tmp_path / "dpkg-style.ipk"
    path.write_bytes(bytes(raw))
    assert open_path(path).control.name == "hello"


def ar_header(name: str, size: int) -> bytes:
    return f"{name:<16}{0:<12}{0:<6}{0:<6}{0o100644:<8o}{size:<10}`\n".encode()


def test_ar_gnu_long_name_table(tmp_path: Path) -> None:
    entries, contents = program_entries()
    data = data_tar(entries, contents)
    table = b"control.tar.gz/\ndata.tar.gz/\n"
    parts = [b"!<arch>\n", ar_header("//", len(table)), table, b"\n"]
    for name, content in [
        ("debian-binary/", b"2.0\n"),
        ("/0", control_tar(CONTROL)),
        ("/16", data),
    ]:
        parts += [ar_header(name, len(content)), content]
        if len(content) % 2:
            parts.append(b"\n")
    path = tmp_path / "gnu-long.ipk"
    path.write_bytes(b"".join(parts))
    assert open_path(path).control.name == "hello"


def test_ar_bsd_long_names(tmp_path: Path) -> None:
    entries, contents = program_entries()
    data = data_tar(entries, contents)
    parts = [b"!<arch>\n"]
    for name, content in [
        ("debian-binary", b"2.0\n"),
        ("control.tar.gz", control_tar(CONTROL)),
        ("data.tar.gz", data),
    ]:
        encoded = name.encode()
        parts += [ar_header(f"#1/{len(encoded)}", len(encoded) + len(content))]
        parts += [encoded, content]
        if (len(encoded) + len(content)) % 2:
            parts.append(b"\n")
    path = tmp_path / "bsd.ipk"
    path.write_bytes(b"".join(parts))
    assert open_path(path).control.name == "hello"


def test_maintainer_scripts_are_listed(tmp_path: Path) -> None:
    entries, contents = program_entries()
    control = control_tar(CONTROL, {"./postinst": b"#!/bin/sh\n", "./conffiles": b""})
    path = handmade_ipk(tmp_path / "p.ipk", data_tar(entries, contents), control)
    assert open_path(path).maintainer_scripts == ("postinst",)


# -- not an .ipk ----------------------------------------------------------------------


def test_html_page_is_not_a_valid_ipk(tmp_path: Path) -> None:
    path = tmp_path / "hello.ipk"
    path.write_text("<!DOCTYPE html>\n<html><body>404 Not Found</body></html>\n")
    with pytest.raises(PackageError) as caught:
        open_path(path)
    message = str(caught.value)
    assert "hello.ipk is not a valid .ipk" in message
    assert "HTML page" in message
    assert "<!DOCTYPE html>" in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "is empty"),
        (b"PK\x03\x04zipfile", "starts with b'PK"),
        (b"!<arch>\ndebian-binary/  0  ", "truncated"),
        (gzip.compress(b"not a tar" * 100), "not a readable tar archive"),
    ],
)
def test_other_files_are_not_valid_ipks(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "x.ipk"
    path.write_bytes(content)
    with pytest.raises(PackageError, match=r"not a valid \.ipk") as caught:
        open_path(path)
    assert expected in str(caught.value)


def test_truncated_ar_member_rejected(tmp_path: Path) -> None:
    whole = APP.build(tmp_path).read_bytes()
    path = tmp_path / "cut.ipk"
    path.write_bytes(whole[: len(whole) - 50])
    with pytest.raises(PackageError, match="truncated"):
        open_path(path)


def test_corrupt_data_fails_scan(tmp_path: Path) -> None:
    entries, contents = program_entries()
    contents["bin/big"] = os.urandom(200_000)
    entries.append(entry("bin/big"))
    data = data_tar(entries, contents)
    corrupt = data[:1000] + bytes(b ^ 0xFF for b in data[1000:1100]) + data[1100:]
    path = handmade_ipk(tmp_path / "p.ipk", corrupt)
    package = open_path(path)
    with pytest.raises(PackageError, match="truncated or corrupt"):
        package.scan_data(1024)


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        (
            [("debian-binary", b"2.0\n"), ("data.tar.gz", b"x")],
            r"control\.tar\.\* is missing",
        ),
        (
            [
                ("debian-binary", b"2.0\n"),
                ("control.tar.gz", b"x"),
                ("data.tar.gz", b"x"),
                ("notes.txt", b"x"),
            ],
            "unexpected member 'notes.txt'",
        ),
        (
            [
                ("debian-binary", b"2.0\n"),
                ("control.tar.gz", b"x"),
                ("control.tar.xz", b"x"),
                ("data.tar.gz", b"x"),
            ],
            "both",
        ),
        (
            [
                ("debian-binary", b"3.0\n"),
                ("control.tar.gz", b"x"),
                ("data.tar.gz", b"x"),
            ],
            "expected format version 2.0",
        ),
        (
            [
                ("debian-binary", b"2.0\n"),
                ("control.tar.gz", b"x"),
                ("data.tar.zst", b"x"),
            ],
            "zstd",
        ),
    ],
)
def test_member_problems_rejected(
    tmp_path: Path, members: list[tuple[str, bytes]], expected: str
) -> None:
    path = tmp_path / "p.ipk"
    path.write_bytes(ar_bytes(members))
    with pytest.raises(PackageError, match=expected):
        open_path(path)


def test_signature_member_ignored(tmp_path: Path) -> None:
    entries, contents = program_entries()
    members = [
        ("debian-binary", b"2.0\n"),
        ("control.tar.gz", control_tar(CONTROL)),
        ("data.tar.gz", data_tar(entries, contents)),
        ("_gpgorigin", b"signature"),
    ]
    path = handmade_ipk(tmp_path / "p.ipk", b"", members=members)
    assert open_path(path).control.name == "hello"


# -- data entries ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (entry("/etc/passwd"), "absolute name"),
        (entry("../escape"), "'..'"),
        (entry("bin/../../escape"), "'..'"),
        (entry("dev/console", tarfile.CHRTYPE), "device node"),
        (entry("fifo", tarfile.FIFOTYPE), "device node, FIFO"),
        (entry("link/evil"), "symbolic link"),
        (entry("bin/hello", tarfile.DIRTYPE), "would replace"),
    ],
)
def test_unsafe_data_entries_rejected(
    tmp_path: Path, bad: tarfile.TarInfo, expected: str
) -> None:
    entries, contents = program_entries()
    entries.append(entry("link", tarfile.SYMTYPE, linkname="/etc"))
    entries.append(bad)
    path = handmade_ipk(tmp_path / "p.ipk", data_tar(entries, contents))
    package = open_path(path)
    with pytest.raises(PackageError, match=expected) as caught:
        package.scan_data(1024)
    assert "p.ipk: data entry" in str(caught.value)
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(PackageError, match=expected):
        package.extract_data(str(target))
    assert not (tmp_path / "escape").exists()


def test_links_and_modes_extracted(tmp_path: Path) -> None:
    entries, contents = program_entries()
    entries += [
        entry("bin/setuid", mode=0o4755),
        entry("bin/same", tarfile.LNKTYPE, linkname="bin/hello"),
        entry("bin/sh", tarfile.SYMTYPE, linkname="/bin/sh"),
        entry("private", tarfile.DIRTYPE, mode=0o700),
    ]
    contents["bin/setuid"] = b"x"
    path = handmade_ipk(tmp_path / "p.ipk", data_tar(entries, contents))
    target = tmp_path / "target"
    target.mkdir()
    assert open_path(path).extract_data(str(target)) == 6
    assert stat.S_IMODE((target / "bin/setuid").stat().st_mode) == 0o755
    assert (target / "bin/same").stat().st_ino == (target / "bin/hello").stat().st_ino
    assert os.readlink(target / "bin/sh") == "/bin/sh"
    assert stat.S_IMODE((target / "private").stat().st_mode) == 0o700


@pytest.mark.parametrize(
    ("exec_line", "files", "expected"),
    [
        ("bin/missing", {}, "is not in the package's data"),
        ("bin/hello", {"bin/hello": 0o644}, "is not executable"),
        ("./bin", {}, "is a directory"),
    ],
)
def test_app_exec_program_checked(
    tmp_path: Path, exec_line: str, files: dict[str, int], expected: str
) -> None:
    entries = [entry("bin", tarfile.DIRTYPE), entry("bin/hello")]
    for name, mode in files.items():
        entries[1] = entry(name, mode=mode)
    control = control_tar(CONTROL.replace("bin/hello --loop", exec_line))
    data = data_tar(entries, {"bin/hello": b"#!/bin/sh\n"})
    package = open_path(handmade_ipk(tmp_path / "p.ipk", data, control))
    with pytest.raises(PackageError, match=expected):
        package.scan_data(1024)


def test_absolute_app_exec_needs_no_file(tmp_path: Path) -> None:
    control = control_tar(CONTROL.replace("bin/hello --loop", "/bin/sh -c 'sleep 9'"))
    data = data_tar([entry("README")], {"README": b"x"})
    package = open_path(handmade_ipk(tmp_path / "p.ipk", data, control))
    assert package.control.command == ("/bin/sh", "-c", "sleep 9")
    assert package.scan_data(1024).members == 1


def test_build_ipk_rejects_missing_directory(tmp_path: Path) -> None:
    from mbl_sim.errors import ConfigError

    with pytest.raises(ConfigError, match="not found"):
        build_ipk(tmp_path / "nothing", APP.control_fields(), tmp_path / "x.ipk")
