"""Tests for payload classification: accepted layouts and every rejection rule."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from updater.errors import PayloadError
from updater.payload import PayloadKind, classify_payload


def add_file(archive: tarfile.TarFile, name: str, data: bytes = b"data") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def add_entry(archive: tarfile.TarFile, name: str, kind: bytes, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    archive.addfile(info)


def make_payload(tmp_path: Path, *names: str, mode: str = "w") -> Path:
    path = tmp_path / "payload.tar"
    with tarfile.open(path, mode) as archive:  # type: ignore[call-overload]
        for name in names:
            add_file(archive, name)
    return path


def test_rootfs_payload(tmp_path: Path) -> None:
    path = make_payload(tmp_path, "rootfs.tar.xz")
    payload = classify_payload(path)
    assert payload.kind is PayloadKind.ROOTFS
    assert payload.names == ("rootfs.tar.xz",)
    assert payload.members[0].size == 4
    assert payload.path == str(path)


def test_rootfs_payload_with_dot_slash(tmp_path: Path) -> None:
    payload = classify_payload(make_payload(tmp_path, "./rootfs.tar.xz"))
    assert payload.kind is PayloadKind.ROOTFS
    assert payload.members[0].name == "rootfs.tar.xz"
    assert payload.members[0].tar_name == "./rootfs.tar.xz"


def test_apps_payload(tmp_path: Path) -> None:
    payload = classify_payload(make_payload(tmp_path, "one.ipk", "./two.ipk"))
    assert payload.kind is PayloadKind.APPS
    assert payload.names == ("one.ipk", "two.ipk")
    assert payload.total_size == 8


def test_gzip_payload_accepted(tmp_path: Path) -> None:
    payload = classify_payload(make_payload(tmp_path, "rootfs.tar.xz", mode="w:gz"))
    assert payload.kind is PayloadKind.ROOTFS


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ((), "has no members"),
        (("rootfs.tar.xz", "app.ipk"), "contains both rootfs.tar.xz and application"),
        (("rootfs.tar.xz", "README"), "'README' is not expected"),
        (("app.ipk", "notes.txt"), "'notes.txt' is not expected"),
        (("rootfs.tar",), "'rootfs.tar' is not expected"),
        ((".ipk",), "'.ipk' is not expected"),
        (("APP.IPK",), "'APP.IPK' is not expected"),
        (("apps/app.ipk",), "'apps/app.ipk' is in a subdirectory"),
        (("good.ipk", "sub/bad.ipk"), "'sub/bad.ipk' is in a subdirectory"),
        (("./x/rootfs.tar.xz",), "in a subdirectory"),
        (("rootfs.tar.xz", "./rootfs.tar.xz"), "occurs more than once"),
        (("a.ipk", "a.ipk"), "occurs more than once"),
        (("/rootfs.tar.xz",), "has an absolute name"),
        (("../app.ipk",), "contains '..'"),
    ],
)
def test_payload_rejected(tmp_path: Path, names: tuple[str, ...], message: str) -> None:
    path = make_payload(tmp_path, *names)
    with pytest.raises(PayloadError, match=message) as excinfo:
        classify_payload(path)
    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize(
    ("kind", "link", "message"),
    [
        (tarfile.DIRTYPE, "", "is a directory"),
        (tarfile.SYMTYPE, "rootfs.tar.xz", "is a symbolic link"),
        (tarfile.LNKTYPE, "rootfs.tar.xz", "is a hard link"),
        (tarfile.CHRTYPE, "", "is a device node"),
        (tarfile.FIFOTYPE, "", "is a FIFO"),
    ],
)
def test_non_regular_member_rejected(
    tmp_path: Path, kind: bytes, link: str, message: str
) -> None:
    path = tmp_path / "payload.tar"
    with tarfile.open(path, "w") as archive:
        add_file(archive, "rootfs.tar.xz")
        add_entry(archive, "extra.ipk", kind, link)
    with pytest.raises(PayloadError, match=message):
        classify_payload(path)


def test_directory_entry_rejected(tmp_path: Path) -> None:
    path = tmp_path / "payload.tar"
    with tarfile.open(path, "w") as archive:
        add_entry(archive, "./", tarfile.DIRTYPE)
        add_file(archive, "./rootfs.tar.xz")
    with pytest.raises(PayloadError, match="is a directory"):
        classify_payload(path)


def test_not_a_tar_rejected(tmp_path: Path) -> None:
    path = tmp_path / "payload.tar"
    path.write_bytes(b"<html>404 Not Found</html>\n" * 40)
    with pytest.raises(PayloadError, match="is not a valid tar archive"):
        classify_payload(path)


def test_empty_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "payload.tar"
    path.write_bytes(b"")
    with pytest.raises(PayloadError, match="is not a valid tar archive"):
        classify_payload(path)


def test_missing_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(PayloadError, match="cannot read payload"):
        classify_payload(tmp_path / "missing.tar")


def test_truncated_member_rejected(tmp_path: Path) -> None:
    path = tmp_path / "payload.tar"
    with tarfile.open(path, "w") as archive:
        add_file(archive, "rootfs.tar.xz", b"x" * 5000)
    path.write_bytes(path.read_bytes()[:2048])
    with pytest.raises(PayloadError, match="is truncated"):
        classify_payload(path)


def test_damaged_second_header_rejected(tmp_path: Path) -> None:
    # tarfile stops listing at an invalid header after the first member, which would
    # hide the second member from the rules.
    path = tmp_path / "payload.tar"
    with tarfile.open(path, "w") as archive:
        add_file(archive, "rootfs.tar.xz", b"x" * 100)
        add_file(archive, "extra.bin", b"y" * 100)
    data = bytearray(path.read_bytes())
    data[1024 + 148 : 1024 + 156] = b"garbage!"  # checksum field of the second header
    path.write_bytes(bytes(data))
    with pytest.raises(PayloadError, match="data after the last member"):
        classify_payload(path)


def test_trailing_garbage_rejected(tmp_path: Path) -> None:
    path = make_payload(tmp_path, "rootfs.tar.xz")
    path.write_bytes(path.read_bytes() + b"trailing")
    with pytest.raises(PayloadError, match="data after the last member"):
        classify_payload(path)
