"""Classify and validate an update payload tar without extracting anything.

A payload is a tar archive whose members all sit at its top level:

- exactly one regular file ``rootfs.tar.xz``: a root filesystem update;
- one or more regular files ``NAME.ipk``: an application update.

Anything else is rejected with `PayloadError` before the device changes:

- an empty archive, or both kinds together;
- any other name, or a name that occurs twice;
- a member in a subdirectory (an ``.ipk`` there is rejected, not ignored);
- a non-regular member: directory, link, device node, FIFO or sparse file;
- an absolute name or a ``..`` component;
- a file that is not a tar archive, or a truncated one.

One leading ``./`` on a member name is accepted, because
``tar -C DIR -cf payload.tar ./rootfs.tar.xz`` writes it.

The design's payload format is an uncompressed tar. `tarfile.open` also decompresses
gzip, bzip2 and xz archives transparently, so such payloads are accepted too. Only for
an uncompressed tar can the checks below also prove that no member is cut short and
that nothing but zero padding follows the last member.
"""

from __future__ import annotations

import enum
import logging
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass

from updater.errors import PayloadError

log = logging.getLogger(__name__)

ROOTFS_MEMBER = "rootfs.tar.xz"
APP_SUFFIX = ".ipk"

# Tar headers and member data are padded to this many bytes.
_TAR_BLOCK = tarfile.BLOCKSIZE
# Bytes read at a time while checking the padding after the last member.
_CHUNK = 1 << 16


class PayloadKind(enum.Enum):
    """Kind of update that a payload carries."""

    ROOTFS = "rootfs"
    APPS = "apps"


@dataclass(frozen=True)
class PayloadMember:
    """One top-level member of a payload.

    Attributes:
        name: the name without a leading ``./``, for example ``rootfs.tar.xz``.
        tar_name: the name as stored in the archive, for `tarfile.TarFile.getmember`.
        size: the member's size in bytes.
    """

    name: str
    tar_name: str
    size: int


@dataclass(frozen=True)
class Payload:
    """A classified payload: its file, its kind and its members in archive order."""

    path: str
    kind: PayloadKind
    members: tuple[PayloadMember, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """Member names without a leading ``./``."""
        return tuple(member.name for member in self.members)

    @property
    def total_size(self) -> int:
        """Sum of the member sizes in bytes."""
        return sum(member.size for member in self.members)


def classify_payload(path: str | os.PathLike[str]) -> Payload:
    """Open the payload tar at ``path``, check every member and return its kind.

    Raises:
        PayloadError: the file cannot be read, is not a tar archive, is truncated or
            breaks a rule in the module docstring. The message names the payload, the
            member and the rule.
    """
    path = os.fspath(path)
    members = _list_members(path)
    return classify_members(members, path)


def classify_members(members: Iterable[tarfile.TarInfo], source: str) -> Payload:
    """Apply the payload rules to the archive entries ``members`` of ``source``.

    Raises:
        PayloadError: as `classify_payload`.
    """
    checked: list[PayloadMember] = []
    seen: set[str] = set()
    for info in members:
        member = _check_member(info, source)
        if member.name in seen:
            raise PayloadError(
                f"payload {source}: member {info.name!r} occurs more than once; each"
                " name may occur only once"
            )
        seen.add(member.name)
        checked.append(member)
    return Payload(path=source, kind=_kind(checked, source), members=tuple(checked))


def _check_member(info: tarfile.TarInfo, source: str) -> PayloadMember:
    where = f"payload {source}: member {info.name!r}"
    name = info.name[2:] if info.name.startswith("./") else info.name
    if name.startswith("/"):
        raise PayloadError(f"{where} has an absolute name; names must be relative")
    if ".." in name.split("/"):
        raise PayloadError(f"{where} contains '..'; names must stay inside the archive")
    if not _is_plain_file(info):
        raise PayloadError(
            f"{where} is a {_type_name(info)}; a payload may contain only regular files"
            f" ({ROOTFS_MEMBER} or *{APP_SUFFIX})"
        )
    if "/" in name:
        raise PayloadError(
            f"{where} is in a subdirectory; all members must be at the top level"
        )
    if name != ROOTFS_MEMBER and not _is_app_name(name):
        raise PayloadError(
            f"{where} is not expected; a payload contains either one {ROOTFS_MEMBER}"
            f" or one or more *{APP_SUFFIX} files"
        )
    return PayloadMember(name=name, tar_name=info.name, size=info.size)


def _kind(members: list[PayloadMember], source: str) -> PayloadKind:
    if not members:
        raise PayloadError(
            f"payload {source} has no members; expected one {ROOTFS_MEMBER} or one or"
            f" more *{APP_SUFFIX} files"
        )
    apps = [member.name for member in members if member.name != ROOTFS_MEMBER]
    if len(apps) == len(members):
        return PayloadKind.APPS
    if apps:
        raise PayloadError(
            f"payload {source} contains both {ROOTFS_MEMBER} and application packages"
            f" ({', '.join(apps)}); a payload updates either the root filesystem or"
            " applications, so send them as two payloads"
        )
    return PayloadKind.ROOTFS


def _is_app_name(name: str) -> bool:
    return name.endswith(APP_SUFFIX) and len(name) > len(APP_SUFFIX)


def _is_plain_file(info: tarfile.TarInfo) -> bool:
    # isreg() includes GNU sparse files, whose data area is not the file's content.
    return info.isreg() and not info.issparse()


def _type_name(info: tarfile.TarInfo) -> str:
    if info.isdir():
        return "directory"
    if info.issym():
        return f"symbolic link to {info.linkname!r}"
    if info.islnk():
        return f"hard link to {info.linkname!r}"
    if info.ischr() or info.isblk():
        return "device node"
    if info.isfifo():
        return "FIFO"
    if info.issparse():
        return "sparse file"
    return f"member of tar type {info.type!r}"


def _list_members(path: str) -> list[tarfile.TarInfo]:
    """Read all member headers of the payload and check an uncompressed tar's layout."""
    try:
        plain = _is_uncompressed_tar(path)
        with tarfile.open(path, mode="r:*") as archive:
            members = archive.getmembers()
    except OSError as exc:
        raise PayloadError(f"cannot read payload {path}: {exc}") from exc
    except (tarfile.TarError, EOFError) as exc:
        raise PayloadError(
            f"payload {path} is not a valid tar archive or is truncated ({exc});"
            " transfer it again, or build it with"
            f" 'tar -cf PAYLOAD.tar {ROOTFS_MEMBER}' or with the .ipk files"
        ) from exc
    if plain:
        _check_layout(path, members)
    return members


def _is_uncompressed_tar(path: str) -> bool:
    try:
        with tarfile.open(path, mode="r:"):
            return True
    except tarfile.ReadError:
        return False


def _check_layout(path: str, members: list[tarfile.TarInfo]) -> None:
    """Check that no member is cut short and only zeros follow the last member.

    tarfile stops listing members at the first invalid header after the first
    member, so a damaged header in the middle would otherwise hide every member that
    follows it.
    """
    file_size = os.path.getsize(path)
    end = 0
    for info in members:
        end = info.offset_data + _padded(info.size)
        if info.offset_data + info.size > file_size:
            raise PayloadError(
                f"payload {path} is truncated: member {info.name!r} needs"
                f" {info.offset_data + info.size} bytes, the file has {file_size};"
                " transfer the payload again"
            )
    offset = _first_nonzero_byte(path, end)
    if offset is not None:
        raise PayloadError(
            f"payload {path} has data after the last member it lists (non-zero byte at"
            f" offset {offset}); the archive is damaged or has an invalid header"
        )


def _padded(size: int) -> int:
    return -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _first_nonzero_byte(path: str, start: int) -> int | None:
    with open(path, "rb") as file:
        file.seek(start)
        position = start
        while chunk := file.read(_CHUNK):
            stripped = chunk.lstrip(b"\0")
            if stripped:
                return position + len(chunk) - len(stripped)
            position += len(chunk)
    return None
