"""Stream-extract a rootfs.tar.xz into a directory, validating each member first.

Extraction is a single pass. The xz data is decompressed as it is read from the
payload, and nothing but the extracted files is written to disk. Each member is checked
by `updater.members.plan_member` and charged to a `SpaceBudget` before anything of it
is written.

Owners are kept as numeric uid/gid. User and group names in the tarball are ignored,
because the device's user database may differ from the build host's. Modes are applied
after the owner because chown clears setuid and setgid. Directory metadata is applied
after all members, because creating entries in a directory changes its mtime.
"""

from __future__ import annotations

import io
import logging
import lzma
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from updater.errors import InstallError
from updater.members import (
    ROOT,
    EntryKind,
    MemberPlan,
    SpaceBudget,
    plan_member,
    record_plan,
)
from updater.payload import ROOTFS_MEMBER, Payload, PayloadKind

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
# Decompressed bytes kept for the end-of-archive check. It must exceed what tarfile's
# stream reader buffers past its position: tarfile.RECORDSIZE, 10240 bytes.
_TAIL_BYTES = 1 << 16
_XATTR_PREFIXES = ("SCHILY.xattr.", "LIBARCHIVE.xattr.")
_LOST_AND_FOUND = "lost+found"


@dataclass(frozen=True)
class ExtractResult:
    """Counts of one extraction.

    Attributes:
        members: tarball members extracted.
        data_bytes: bytes of regular file content written.
        accounted_bytes: space the `SpaceBudget` charged, in bytes of whole blocks.
        free_bytes: free space the budget started with.
        members_with_xattrs: members whose extended attributes were not restored.
    """

    members: int
    data_bytes: int
    accounted_bytes: int
    free_bytes: int
    members_with_xattrs: int


def extract_payload_rootfs(payload: Payload, root: str) -> ExtractResult:
    """Extract the ``rootfs.tar.xz`` member of a classified payload into ``root``.

    ``root`` must be an empty directory, or contain only ``lost+found``.

    Raises:
        InstallError: the payload is not a root filesystem payload, cannot be read,
            the rootfs tarball is truncated or corrupt, a member is unsafe
            (`UnsafeMemberError`), the files do not fit, or writing failed.
    """
    if payload.kind is not PayloadKind.ROOTFS:
        raise InstallError(
            f"payload {payload.path} is a {payload.kind.value} payload, not a root"
            " filesystem"
        )
    tar_name = payload.members[0].tar_name
    try:
        with tarfile.open(payload.path, mode="r:*") as outer:
            stream = outer.extractfile(outer.getmember(tar_name))
            if stream is None:
                raise InstallError(
                    f"payload {payload.path}: {tar_name!r} is not a regular file"
                )
            with stream:
                return extract_rootfs_stream(stream, root)
    except (KeyError, tarfile.TarError) as exc:
        raise InstallError(
            f"cannot open {ROOTFS_MEMBER} in payload {payload.path}: {exc}; the"
            " payload changed after it was checked or is damaged"
        ) from exc
    except OSError as exc:
        raise InstallError(f"cannot read payload {payload.path}: {exc}") from exc


def extract_rootfs_stream(xz_stream: IO[bytes], root: str) -> ExtractResult:
    """Decompress an xz-compressed tar from ``xz_stream`` and extract it into ``root``.

    The xz data is decompressed with `lzma.LZMAFile` and read by tarfile in stream
    mode (``r|``), which is what ``tarfile.open(mode="r|xz")`` does, except that the
    rest of the decompressed data can be read after the last member. That check
    makes a truncated or corrupt xz stream and a damaged tar header fail even when
    tarfile itself stopped early without an error.

    Raises:
        InstallError: as `extract_payload_rootfs`.
    """
    root = os.path.abspath(root)
    try:
        with lzma.LZMAFile(xz_stream, mode="rb", format=lzma.FORMAT_XZ) as xz_file:
            reader = _TailReader(xz_file)
            with tarfile.open(fileobj=reader, mode="r|") as archive:
                result = _Extraction(root, archive).run()
                _check_end_of_archive(reader, archive.offset)
            return result
    except (tarfile.TarError, lzma.LZMAError, EOFError) as exc:
        raise InstallError(
            f"{ROOTFS_MEMBER} is truncated or corrupt ({exc}); build and send the"
            " payload again"
        ) from exc


class _TailReader:
    """Read-only, forward-only file object that remembers the last bytes it returned.

    It provides the methods of typeshed's tarfile file object protocol. tarfile's
    stream mode only calls `read`.
    """

    def __init__(self, source: IO[bytes]) -> None:
        self._source = source
        self.position = 0
        self.tail = bytearray()

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self.position += len(data)
        self.tail += data
        del self.tail[: max(0, len(self.tail) - _TAIL_BYTES)]
        return data

    def tell(self) -> int:
        return self.position

    def write(self, data: bytes, /) -> int:
        raise io.UnsupportedOperation("write")

    def seek(self, position: int, /) -> int:
        raise io.UnsupportedOperation("seek")

    def close(self) -> None:
        """Leave the underlying stream open, because its owner closes it."""


def _check_end_of_archive(reader: _TailReader, end_offset: int) -> None:
    """Check that a zero block and only zero bytes follow the last member.

    tarfile ends its member list quietly at the first header that is zero, invalid or
    missing, so without this check a damaged header or a tar cut at a member boundary
    would drop the rest of the root filesystem. Reading to the end also makes lzma
    verify the stream's index and checksum.
    """
    buffered_from = reader.position - len(reader.tail)
    if end_offset < buffered_from:
        raise InstallError(
            f"cannot verify the end of {ROOTFS_MEMBER}: tarfile stopped at offset"
            f" {end_offset}, before the buffered data at {buffered_from}"
        )
    rest = bytes(reader.tail[end_offset - buffered_from :])
    offset = end_offset
    while rest:
        if rest.strip(b"\0"):
            position = offset + len(rest) - len(rest.lstrip(b"\0"))
            raise InstallError(
                f"{ROOTFS_MEMBER} has data after the end of its member list (non-zero"
                f" byte at decompressed offset {position}); a tar header is damaged"
            )
        offset += len(rest)
        rest = reader.read(_CHUNK)
    if offset - end_offset < tarfile.BLOCKSIZE:
        raise InstallError(
            f"{ROOTFS_MEMBER} ends at decompressed offset {offset} without the"
            " end-of-archive zero block; the tarball is truncated"
        )


class _Extraction:
    """State of one extraction: the tree created so far, the budget, deferred work."""

    def __init__(self, root: str, archive: tarfile.TarFile) -> None:
        self.root = root
        self.archive = archive
        self.tree: dict[str, EntryKind] = {ROOT: EntryKind.DIRECTORY}
        self.budget = _measure_free_space(root)
        # Insertion-ordered, and a directory listed twice keeps its last metadata.
        self.directories: dict[str, tarfile.TarInfo] = {}
        self.members = 0
        self.data_bytes = 0
        self.members_with_xattrs = 0
        self._add_existing_entries()

    def run(self) -> ExtractResult:
        for member in self._members():
            plan = plan_member(member, self.tree)
            self.budget.charge(member, plan)
            self._create(member, plan)
            record_plan(self.tree, plan)
            self.members += 1
        self._apply_directory_metadata()
        if self.members_with_xattrs:
            log.warning(
                "%d members carry extended attributes (for example file capabilities)"
                " that were not restored",
                self.members_with_xattrs,
            )
        return ExtractResult(
            members=self.members,
            data_bytes=self.data_bytes,
            accounted_bytes=self.budget.used_bytes,
            free_bytes=self.budget.free_bytes,
            members_with_xattrs=self.members_with_xattrs,
        )

    def _members(self) -> Iterator[tarfile.TarInfo]:
        for member in self.archive:
            if any(key.startswith(_XATTR_PREFIXES) for key in member.pax_headers):
                self.members_with_xattrs += 1
            yield member

    def _add_existing_entries(self) -> None:
        try:
            names = sorted(os.listdir(self.root))
        except OSError as exc:
            raise InstallError(f"cannot list extraction target: {exc}") from exc
        unexpected = [name for name in names if name != _LOST_AND_FOUND]
        if unexpected:
            raise InstallError(
                f"extraction target {self.root} is not empty (contains"
                f" {', '.join(unexpected[:5])}); expected an empty filesystem"
            )
        if _LOST_AND_FOUND in names:
            self.tree[_LOST_AND_FOUND] = EntryKind.DIRECTORY
        self.budget.add_existing_directory(ROOT, names)

    def _create(self, member: tarfile.TarInfo, plan: MemberPlan) -> None:
        for parent in plan.new_parents:
            _make_directory(self._path(parent))
        target = self._path(plan.path)
        try:
            self._create_entry(member, plan, target)
        except OSError as exc:
            raise InstallError(
                f"cannot extract {member.name!r} to {target}: {exc}"
            ) from exc

    def _create_entry(
        self, member: tarfile.TarInfo, plan: MemberPlan, target: str
    ) -> None:
        if plan.link_target is not None:
            os.link(self._path(plan.link_target), target, follow_symlinks=False)
        elif plan.kind is EntryKind.DIRECTORY:
            if not plan.exists:
                os.mkdir(target, 0o700)
            self.directories[target] = member
        elif plan.kind is EntryKind.FILE:
            self.data_bytes += self._write_file(member, target)
        elif plan.kind is EntryKind.SYMLINK:
            os.symlink(member.linkname, target)
            os.chown(target, member.uid, member.gid, follow_symlinks=False)
            _set_mtime(target, member, follow_symlinks=False)
        else:
            _make_node(member, target)
            _set_owner_mode_mtime(target, member)

    def _write_file(self, member: tarfile.TarInfo, target: str) -> int:
        source = self.archive.extractfile(member)
        if source is None:
            raise InstallError(f"member {member.name!r} has no data")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(target, flags, 0o600)
        try:
            written = _copy_data(source, fd, member)
            _set_owner_mode_mtime(fd, member)
        finally:
            os.close(fd)
        return written

    def _apply_directory_metadata(self) -> None:
        for target, member in reversed(self.directories.items()):
            try:
                _set_owner_mode_mtime(target, member)
            except OSError as exc:
                raise InstallError(
                    f"cannot set owner, mode or mtime of {target}: {exc}"
                ) from exc

    def _path(self, relative: str) -> str:
        return os.path.join(self.root, relative) if relative else self.root


def _measure_free_space(root: str) -> SpaceBudget:
    # f_bavail excludes the blocks reserved for root (5 % by default with mke2fs) and
    # the clusters ext4 keeps for itself, so the budget stays below what root could
    # allocate.
    try:
        stats = os.statvfs(root)
    except OSError as exc:
        raise InstallError(f"cannot measure free space in {root}: {exc}") from exc
    return SpaceBudget(
        block_size=stats.f_frsize,
        free_bytes=stats.f_bavail * stats.f_frsize,
        free_inodes=stats.f_favail,
    )


def _copy_data(source: IO[bytes], fd: int, member: tarfile.TarInfo) -> int:
    written = 0
    while chunk := source.read(min(_CHUNK, member.size - written)):
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]
        written += len(chunk)
        if written >= member.size:
            break
    if written != member.size:
        raise InstallError(
            f"member {member.name!r} ends after {written} of {member.size} bytes;"
            f" {ROOTFS_MEMBER} is truncated"
        )
    return written


def _make_directory(path: str) -> None:
    try:
        os.mkdir(path)
        os.chmod(path, 0o755)
    except OSError as exc:
        raise InstallError(f"cannot create directory {path}: {exc}") from exc


def _make_node(member: tarfile.TarInfo, target: str) -> None:
    if member.isfifo():
        os.mkfifo(target, 0o600)
        return
    file_type = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
    device = os.makedev(member.devmajor, member.devminor)
    os.mknod(target, 0o600 | file_type, device)


def _set_owner_mode_mtime(target: str | int, member: tarfile.TarInfo) -> None:
    """Apply uid/gid, then the mode (chown clears setuid), then the mtime.

    ``target`` is a path that is known not to be a symbolic link, or an open fd.
    """
    os.chown(target, member.uid, member.gid)
    os.chmod(target, stat.S_IMODE(member.mode))
    _set_mtime(target, member, follow_symlinks=True)


def _set_mtime(
    target: str | int, member: tarfile.TarInfo, *, follow_symlinks: bool
) -> None:
    mtime_ns = round(member.mtime * 1_000_000_000)
    os.utime(target, ns=(mtime_ns, mtime_ns), follow_symlinks=follow_symlinks)
