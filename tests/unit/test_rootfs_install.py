"""Tests for install_rootfs: command sequence, cleanup on errors, real ext4 images."""

from __future__ import annotations

import io
import lzma
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from updater.command import run_command
from updater.errors import CommandError, InstallError
from updater.members import estimate_space
from updater.payload import Payload, classify_payload
from updater.rootfs import install_rootfs

Entry = tuple[tarfile.TarInfo, bytes]


def entry(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    *,
    data: bytes = b"",
    link: str = "",
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
) -> Entry:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.mtime = 1_700_000_000
    info.size = len(data)
    if kind == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 5, 1
    return info, data


def rootfs_tree() -> list[Entry]:
    """The special entries a Debian root filesystem contains."""
    return [
        entry("./", tarfile.DIRTYPE, mode=0o755),
        entry("./bin", tarfile.DIRTYPE, mode=0o755),
        entry("./bin/su", data=b"\x7fELF su", mode=0o4755),
        entry("./usr/bin/a", data=b"\x7fELF a", mode=0o755),
        entry("./usr/bin/b", tarfile.LNKTYPE, link="./usr/bin/a"),
        entry("./etc", tarfile.DIRTYPE, mode=0o755),
        entry("./etc/localtime", tarfile.SYMTYPE, link="/usr/share/zoneinfo/UTC"),
        entry("./dev", tarfile.DIRTYPE, mode=0o755),
        entry("./dev/console", tarfile.CHRTYPE, mode=0o600, gid=5),
    ]


def write_payload(directory: Path, entries: Sequence[Entry]) -> Payload:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in entries:
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    rootfs = directory / "rootfs.tar.xz"
    rootfs.write_bytes(lzma.compress(buffer.getvalue(), preset=0))
    path = directory / "payload.tar"
    with tarfile.open(path, "w") as payload:
        payload.add(rootfs, arcname="rootfs.tar.xz")
    return classify_payload(path)


class FakeRunner:
    """Records commands without running them.

    Files are extracted into the plain mount directory, and ``umount`` empties it
    again, as unmounting a real filesystem would.
    """

    def __init__(self, fail: str | None = None) -> None:
        self.commands: list[list[str]] = []
        self.fail = fail

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.commands.append(list(argv))
        if argv[0] == self.fail:
            raise CommandError(f"{argv[0]} failed", argv, 8, "stderr text")
        if argv[0] == "umount":
            for path in Path(argv[-1]).iterdir():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        return subprocess.CompletedProcess(list(argv), 0, "", "")

    @property
    def programs(self) -> list[str]:
        return [argv[0] for argv in self.commands]


def test_install_command_sequence(tmp_path: Path) -> None:
    payload = write_payload(tmp_path, [entry("etc/hostname", data=b"device\n")])
    runner = FakeRunner()
    result = install_rootfs(
        payload, "/dev/vdz3", label="rootfs2", runner=runner, mount_parent=str(tmp_path)
    )
    mount_dir = runner.commands[1][-1]
    assert runner.commands == [
        ["mke2fs", "-F", "-q", "-t", "ext4", "-L", "rootfs2", "/dev/vdz3"],
        ["mount", "-t", "ext4", "/dev/vdz3", mount_dir],
        ["umount", mount_dir],
        ["e2fsck", "-n", "-f", "/dev/vdz3"],
    ]
    assert os.path.dirname(mount_dir) == str(tmp_path)
    assert not os.path.exists(mount_dir)
    assert result.device == "/dev/vdz3"
    assert result.extract.members == 1


def test_install_unsafe_member_unmounts(tmp_path: Path) -> None:
    payload = write_payload(tmp_path, [entry("../escape", data=b"x")])
    runner = FakeRunner()
    with pytest.raises(InstallError, match="'\\.\\.' component"):
        install_rootfs(
            payload, "/dev/vdz3", label="x", runner=runner, mount_parent=str(tmp_path)
        )
    assert runner.programs == ["mke2fs", "mount", "umount"]
    assert not (tmp_path / "escape").exists()


@pytest.mark.parametrize(
    ("failing", "step", "programs"),
    [
        ("mke2fs", "formatting /dev/vdz3 failed", ["mke2fs"]),
        ("mount", "mounting /dev/vdz3 failed", ["mke2fs", "mount"]),
        ("umount", "unmounting /dev/vdz3 failed", ["mke2fs", "mount", "umount"]),
        (
            "e2fsck",
            "checking the new filesystem on /dev/vdz3 failed",
            ["mke2fs", "mount", "umount", "e2fsck"],
        ),
    ],
)
def test_install_command_failure(
    tmp_path: Path, failing: str, step: str, programs: list[str]
) -> None:
    payload = write_payload(tmp_path, [entry("etc/hostname", data=b"device\n")])
    runner = FakeRunner(fail=failing)
    with pytest.raises(InstallError, match=step) as excinfo:
        install_rootfs(
            payload, "/dev/vdz3", label="x", runner=runner, mount_parent=str(tmp_path)
        )
    assert f"{failing} failed" in str(excinfo.value)
    assert runner.programs == programs
    mount_points = [p for p in tmp_path.iterdir() if p.name.startswith("mbl-update-")]
    # A mount point that could not be unmounted stays, because it is still in use.
    assert len(mount_points) == (1 if failing == "umount" else 0)


def make_image(path: Path, size: int) -> str:
    with open(path, "wb") as image:
        image.truncate(size)
    return str(path)


def with_mounted(image: str, directory: Path, check: Callable[[Path], None]) -> None:
    directory.mkdir(exist_ok=True)
    run_command(["mount", "-o", "ro", "-t", "ext4", image, str(directory)])
    try:
        check(directory)
    finally:
        run_command(["umount", str(directory)])


def fresh_free_space(image: str, directory: Path) -> tuple[int, int]:
    """Make a filesystem as install_rootfs does; return block size and free bytes."""
    run_command(["mke2fs", "-F", "-q", "-t", "ext4", "-L", "probe", image])
    free: list[int] = []

    def measure(root: Path) -> None:
        stats = os.statvfs(root)
        free.extend([stats.f_frsize, stats.f_bavail * stats.f_frsize])

    with_mounted(image, directory, measure)
    return free[0], free[1]


@pytest.mark.needs_loop_mount
def test_install_into_ext4_image(tmp_path: Path) -> None:
    image = make_image(tmp_path / "slot.img", 16 << 20)
    payload = write_payload(tmp_path, rootfs_tree())
    install_rootfs(payload, image, label="rootfs2", mount_parent=str(tmp_path))

    def check(root: Path) -> None:
        a, b = (root / "usr/bin/a").stat(), (root / "usr/bin/b").stat()
        assert a.st_ino == b.st_ino
        assert a.st_nlink == 2
        assert os.readlink(root / "etc/localtime") == "/usr/share/zoneinfo/UTC"
        su = (root / "bin/su").stat()
        assert stat.S_IMODE(su.st_mode) == 0o4755
        assert su.st_uid == 0
        console = (root / "dev/console").lstat()
        assert stat.S_ISCHR(console.st_mode)
        assert console.st_rdev == os.makedev(5, 1)

    with_mounted(image, tmp_path / "check", check)
    label = run_command(["e2label", image]).stdout.strip()
    assert label == "rootfs2"


def filled_tree(filler_size: int, pad_size: int) -> list[Entry]:
    entries = [*rootfs_tree(), entry("filler", data=b"\0" * filler_size)]
    if pad_size:
        entries.append(entry("pad", data=b"\0" * pad_size))
    return entries


def exactly_fitting_sizes(block_size: int, free: int) -> tuple[int, int]:
    """Return filler and pad sizes whose estimate equals ``free``."""

    def needed(filler: int, pad: int) -> int:
        infos = [info for info, _ in filled_tree(filler, pad)]
        return estimate_space(infos, block_size)[0]

    filler = free - needed(0, 0)
    while needed(filler, 0) > free:
        filler -= block_size
    pad = free - needed(filler, 0)
    assert needed(filler, pad) == free
    return filler, pad


@pytest.mark.needs_loop_mount
def test_install_exact_fit_and_one_byte_over(tmp_path: Path) -> None:
    image = make_image(tmp_path / "slot.img", 24 << 20)
    block_size, free = fresh_free_space(image, tmp_path / "probe")
    filler, pad = exactly_fitting_sizes(block_size, free)

    fitting = write_payload(tmp_path, filled_tree(filler, pad))
    result = install_rootfs(fitting, image, label="rootfs2", mount_parent=str(tmp_path))
    assert result.extract.accounted_bytes == free
    assert result.extract.free_bytes == free

    too_large = write_payload(tmp_path, filled_tree(filler + 1, pad))
    with pytest.raises(InstallError, match="does not fit"):
        install_rootfs(too_large, image, label="rootfs2", mount_parent=str(tmp_path))
