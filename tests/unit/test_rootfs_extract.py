"""Tests for stream extraction of rootfs.tar.xz into a directory (no mkfs, no mount)."""

from __future__ import annotations

import io
import lzma
import os
import stat
import tarfile
from pathlib import Path

import pytest

from updater import extract
from updater.errors import InstallError, UnsafeMemberError
from updater.extract import extract_payload_rootfs, extract_rootfs_stream
from updater.members import SpaceBudget, estimate_space
from updater.payload import classify_payload

MTIME = 1_700_000_000
UID = os.getuid()
GID = os.getgid()


def entry(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    *,
    data: bytes = b"",
    link: str = "",
    mode: int = 0o644,
    uid: int = UID,
    gid: int = GID,
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.uname = info.gname = "builder"
    info.mtime = MTIME
    info.size = len(data)
    if kind == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 5, 1
    return info, data


def tar_bytes(*entries: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in entries:
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def xz(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_XZ, preset=0)


def extract_bytes(xz_data: bytes, root: Path) -> extract.ExtractResult:
    return extract_rootfs_stream(io.BytesIO(xz_data), str(root))


def basic_tree() -> list[tuple[tarfile.TarInfo, bytes]]:
    return [
        entry("./", tarfile.DIRTYPE, mode=0o755),
        entry("./usr", tarfile.DIRTYPE, mode=0o755),
        entry("./usr/bin", tarfile.DIRTYPE, mode=0o755),
        entry("./usr/bin/a", data=b"#!/bin/sh\necho a\n", mode=0o755),
        entry("./usr/bin/b", tarfile.LNKTYPE, link="./usr/bin/a"),
        entry("./etc", tarfile.DIRTYPE, mode=0o755),
        entry("./etc/localtime", tarfile.SYMTYPE, link="/usr/share/zoneinfo/UTC"),
        entry("./etc/hostname", data=b"device\n"),
        entry("./tmp", tarfile.DIRTYPE, mode=0o1777),
        entry("./run/initctl", tarfile.FIFOTYPE, mode=0o600),
    ]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


def test_extract_basic_tree(root: Path) -> None:
    result = extract_bytes(xz(tar_bytes(*basic_tree())), root)
    a = (root / "usr/bin/a").stat()
    b = (root / "usr/bin/b").stat()
    assert (root / "usr/bin/a").read_bytes() == b"#!/bin/sh\necho a\n"
    assert a.st_ino == b.st_ino
    assert a.st_nlink == 2
    assert os.readlink(root / "etc/localtime") == "/usr/share/zoneinfo/UTC"
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    assert stat.S_ISFIFO((root / "run/initctl").lstat().st_mode)
    assert stat.S_IMODE((root / "run").stat().st_mode) == 0o755
    assert result.members == 10
    assert result.data_bytes == len(b"#!/bin/sh\necho a\n") + len(b"device\n")


def test_extract_keeps_mtimes(root: Path) -> None:
    extract_bytes(xz(tar_bytes(*basic_tree())), root)
    for path in ("usr/bin/a", "etc/hostname", "usr/bin", "usr", "etc", "tmp", ""):
        assert (root / path).stat().st_mtime == MTIME, path
    assert (root / "etc/localtime").lstat().st_mtime == MTIME


def test_extract_does_not_follow_absolute_symlink(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    entries = [
        entry("etc", tarfile.DIRTYPE, mode=0o755),
        entry("etc/localtime", tarfile.SYMTYPE, link=str(outside / "zone")),
    ]
    extract_bytes(xz(tar_bytes(*entries)), root)
    assert os.readlink(root / "etc/localtime") == str(outside / "zone")
    assert list(outside.iterdir()) == []


@pytest.mark.needs_root
def test_extract_special_entries_as_root(root: Path) -> None:
    entries = [
        entry("./", tarfile.DIRTYPE, mode=0o755, uid=0, gid=0),
        entry("bin", tarfile.DIRTYPE, mode=0o755, uid=0, gid=0),
        entry("bin/su", data=b"\x7fELF", mode=0o4755, uid=0, gid=0),
        entry("usr/bin/wall", data=b"\x7fELF", mode=0o2755, uid=0, gid=5),
        entry("dev", tarfile.DIRTYPE, mode=0o755, uid=0, gid=0),
        entry("dev/console", tarfile.CHRTYPE, mode=0o600, uid=0, gid=5),
        entry("home/user", tarfile.DIRTYPE, mode=0o2750, uid=1000, gid=1000),
        entry("home/user/.profile", data=b"x", mode=0o640, uid=1000, gid=1000),
        entry("home/user/link", tarfile.SYMTYPE, link="/etc", uid=1000, gid=1000),
    ]
    extract_bytes(xz(tar_bytes(*entries)), root)

    su = (root / "bin/su").stat()
    assert stat.S_IMODE(su.st_mode) == 0o4755
    assert (su.st_uid, su.st_gid) == (0, 0)
    wall = (root / "usr/bin/wall").stat()
    assert stat.S_IMODE(wall.st_mode) == 0o2755
    assert wall.st_gid == 5
    console = (root / "dev/console").lstat()
    assert stat.S_ISCHR(console.st_mode)
    assert (os.major(console.st_rdev), os.minor(console.st_rdev)) == (5, 1)
    assert stat.S_IMODE(console.st_mode) == 0o600
    assert console.st_gid == 5
    home = (root / "home/user").stat()
    assert (home.st_uid, home.st_gid) == (1000, 1000)
    assert stat.S_IMODE(home.st_mode) == 0o2750
    link = (root / "home/user/link").lstat()
    assert (link.st_uid, link.st_gid) == (1000, 1000)


def test_extract_escaping_member_fails(root: Path, tmp_path: Path) -> None:
    entries = [*basic_tree(), entry("../escape", data=b"owned")]
    with pytest.raises(UnsafeMemberError, match=r"'\.\.' component"):
        extract_bytes(xz(tar_bytes(*entries)), root)
    assert not (tmp_path / "escape").exists()


def test_extract_absolute_member_fails(root: Path) -> None:
    with pytest.raises(UnsafeMemberError, match="absolute name"):
        extract_bytes(xz(tar_bytes(entry("/abs", data=b"x"))), root)


def test_extract_write_through_symlink_fails(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    entries = [
        entry("evil", tarfile.SYMTYPE, link=str(outside)),
        entry("evil/pwned", data=b"owned"),
    ]
    with pytest.raises(UnsafeMemberError, match="symbolic link"):
        extract_bytes(xz(tar_bytes(*entries)), root)
    assert list(outside.iterdir()) == []


def test_extract_relative_symlink_not_followed(root: Path, tmp_path: Path) -> None:
    entries = [
        entry("up", tarfile.SYMTYPE, link=".."),
        entry("up/sibling", data=b"owned"),
    ]
    with pytest.raises(UnsafeMemberError, match="symbolic link"):
        extract_bytes(xz(tar_bytes(*entries)), root)
    assert not (tmp_path / "sibling").exists()


def test_extract_into_non_empty_directory_fails(root: Path) -> None:
    (root / "leftover").write_text("x")
    with pytest.raises(InstallError, match="is not empty"):
        extract_bytes(xz(tar_bytes(*basic_tree())), root)


def test_extract_accepts_lost_and_found(root: Path) -> None:
    (root / "lost+found").mkdir()
    extract_bytes(xz(tar_bytes(*basic_tree())), root)
    assert (root / "etc/hostname").exists()


def test_extract_truncated_xz_fails(root: Path) -> None:
    data = xz(tar_bytes(*basic_tree(), entry("big", data=os.urandom(50_000))))
    with pytest.raises(InstallError, match="truncated or corrupt"):
        extract_bytes(data[: len(data) // 2], root)


def test_extract_xz_without_footer_fails(root: Path) -> None:
    data = xz(tar_bytes(*basic_tree()))
    with pytest.raises(InstallError, match="truncated or corrupt"):
        extract_bytes(data[:-12], root)


def test_extract_corrupt_xz_fails(root: Path) -> None:
    data = bytearray(
        xz(tar_bytes(*basic_tree(), entry("big", data=os.urandom(50_000))))
    )
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(InstallError, match="truncated or corrupt"):
        extract_bytes(bytes(data), root)


def test_extract_not_xz_fails(root: Path) -> None:
    with pytest.raises(InstallError, match="truncated or corrupt"):
        extract_bytes(tar_bytes(*basic_tree()), root)


def test_extract_tar_cut_at_member_boundary_fails(root: Path) -> None:
    # A valid xz stream around a tar that stops after a complete member: tarfile
    # alone ends the member list without an error.
    tar = tar_bytes(entry("a", data=b"x" * 512), entry("b", data=b"y" * 512))
    first_member_end = tar.index(b"y" * 512) - 512
    with pytest.raises(InstallError, match="without the end-of-archive"):
        extract_bytes(xz(tar[:first_member_end]), root)


def test_extract_damaged_header_fails(root: Path) -> None:
    tar = bytearray(tar_bytes(entry("a", data=b"x" * 512), entry("b", data=b"y" * 512)))
    second_header = tar.index(b"y" * 512) - 512
    tar[second_header + 148 : second_header + 156] = b"garbage!"
    with pytest.raises(InstallError, match="data after the end of its member list"):
        extract_bytes(xz(bytes(tar)), root)


def test_extract_counts_xattr_members(root: Path) -> None:
    info, data = entry("ping", data=b"\x7fELF", mode=0o755)
    info.pax_headers = {"SCHILY.xattr.security.capability": "x"}
    result = extract_bytes(xz(tar_bytes((info, data))), root)
    assert result.members_with_xattrs == 1


def filler_entries(size: int) -> list[tuple[tarfile.TarInfo, bytes]]:
    return [
        entry("./", tarfile.DIRTYPE, mode=0o755),
        entry("etc", tarfile.DIRTYPE, mode=0o755),
        entry("etc/hostname", data=b"device\n"),
        entry("filler", data=b"\0" * size),
    ]


def fixed_budget(
    monkeypatch: pytest.MonkeyPatch, free_bytes: int, block_size: int = 4096
) -> None:
    def measure(root: str) -> SpaceBudget:
        return SpaceBudget(
            block_size=block_size, free_bytes=free_bytes, free_inodes=100
        )

    monkeypatch.setattr(extract, "_measure_free_space", measure)


def test_extract_exact_fit_accepted(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = filler_entries(8 * 4096)
    needed, _ = estimate_space([info for info, _ in entries], 4096, root_entries=())
    fixed_budget(monkeypatch, needed)
    result = extract_bytes(xz(tar_bytes(*entries)), root)
    assert result.accounted_bytes == needed
    assert result.free_bytes == needed


def test_extract_one_byte_too_large_rejected(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fitting = filler_entries(8 * 4096)
    needed, _ = estimate_space([info for info, _ in fitting], 4096, root_entries=())
    fixed_budget(monkeypatch, needed)
    with pytest.raises(InstallError, match="does not fit") as excinfo:
        extract_bytes(xz(tar_bytes(*filler_entries(8 * 4096 + 1))), root)
    assert f"only {needed} bytes are free" in str(excinfo.value)
    assert not (root / "filler").exists()


def test_extract_from_payload(tmp_path: Path, root: Path) -> None:
    rootfs = tmp_path / "rootfs.tar.xz"
    rootfs.write_bytes(xz(tar_bytes(*basic_tree())))
    payload_path = tmp_path / "payload.tar"
    with tarfile.open(payload_path, "w") as archive:
        archive.add(rootfs, arcname="./rootfs.tar.xz")
    result = extract_payload_rootfs(classify_payload(payload_path), str(root))
    assert result.members == 10
    assert (root / "etc/hostname").read_text() == "device\n"
