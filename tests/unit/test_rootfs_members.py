"""Tests for rootfs tarball member validation and space accounting (no extraction)."""

from __future__ import annotations

import io
import tarfile

import pytest

from updater.errors import InstallError, UnsafeMemberError
from updater.members import (
    ROOT,
    EntryKind,
    MemberPlan,
    SpaceBudget,
    estimate_space,
    normalize_member_name,
    plan_member,
    record_plan,
)

BLOCK = 4096
DOTDOT = r"'\.\.' component"


def entry(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    *,
    link: str = "",
    size: int = 0,
    mode: int = 0o644,
    uid: int = 0,
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = size
    info.mode = mode
    info.uid = uid
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 5, 1
    return info


def through_tar(*entries: tarfile.TarInfo) -> list[tarfile.TarInfo]:
    """Write the entries into an in-memory tar and read the headers back."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info in entries:
            archive.addfile(
                info, io.BytesIO(b"\0" * info.size) if info.isreg() else None
            )
    buffer.seek(0)
    with tarfile.open(fileobj=buffer, mode="r") as archive:
        return archive.getmembers()


def plan_all(*entries: tarfile.TarInfo) -> dict[str, EntryKind]:
    """Plan and record every entry in order; return the resulting tree."""
    tree: dict[str, EntryKind] = {ROOT: EntryKind.DIRECTORY}
    for member in through_tar(*entries):
        record_plan(tree, plan_member(member, tree))
    return tree


def plan_last(*entries: tarfile.TarInfo) -> tuple[tarfile.TarInfo, MemberPlan]:
    """Record all entries but the last and return the last one with its plan."""
    members = through_tar(*entries)
    tree: dict[str, EntryKind] = {ROOT: EntryKind.DIRECTORY}
    for member in members[:-1]:
        record_plan(tree, plan_member(member, tree))
    return members[-1], plan_member(members[-1], tree)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("./", ""),
        (".", ""),
        ("./usr/bin/a", "usr/bin/a"),
        ("usr//bin/./a", "usr/bin/a"),
        ("etc/", "etc"),
    ],
)
def test_normalize_member_name(name: str, expected: str) -> None:
    assert normalize_member_name(name) == expected


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("/etc/passwd", "absolute name"),
        ("../escape", DOTDOT),
        ("usr/../../escape", DOTDOT),
        ("usr/../etc", DOTDOT),
        ("a\0b", "NUL"),
    ],
)
def test_normalize_member_name_rejects(name: str, message: str) -> None:
    with pytest.raises(UnsafeMemberError, match=message):
        normalize_member_name(name)


def test_plan_escaping_member_rejected() -> None:
    with pytest.raises(UnsafeMemberError, match=DOTDOT):
        plan_all(entry("./", tarfile.DIRTYPE), entry("../escape", size=3))


def test_plan_absolute_member_rejected() -> None:
    with pytest.raises(UnsafeMemberError, match="absolute name"):
        plan_all(entry("/abs", size=3))


def test_plan_hard_link_after_target() -> None:
    _, plan = plan_last(
        entry("usr/bin", tarfile.DIRTYPE),
        entry("usr/bin/a", size=10),
        entry("usr/bin/b", tarfile.LNKTYPE, link="usr/bin/a"),
    )
    assert plan.kind is EntryKind.FILE
    assert plan.link_target == "usr/bin/a"


def test_plan_hard_link_with_dot_slash_target() -> None:
    tree = plan_all(entry("./a", size=1), entry("./b", tarfile.LNKTYPE, link="./a"))
    assert tree["b"] is EntryKind.FILE


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ((entry("b", tarfile.LNKTYPE, link="a"),), "not extracted before it"),
        ((entry("b", tarfile.LNKTYPE, link="/etc/shadow"),), "absolute name"),
        ((entry("b", tarfile.LNKTYPE, link="../outside"),), DOTDOT),
        (
            (entry("d", tarfile.DIRTYPE), entry("b", tarfile.LNKTYPE, link="d")),
            "a directory",
        ),
        (
            (
                entry("s", tarfile.SYMTYPE, link="/etc"),
                entry("b", tarfile.LNKTYPE, link="s"),
            ),
            "a symbolic link",
        ),
        (
            (
                entry("s", tarfile.SYMTYPE, link="/etc"),
                entry("b", tarfile.LNKTYPE, link="s/passwd"),
            ),
            "not extracted before it",
        ),
    ],
)
def test_plan_hard_link_rejected(
    entries: tuple[tarfile.TarInfo, ...], message: str
) -> None:
    with pytest.raises(UnsafeMemberError, match=message):
        plan_all(*entries)


def test_plan_absolute_symlink_kept() -> None:
    member, plan = plan_last(
        entry("etc", tarfile.DIRTYPE),
        entry("etc/localtime", tarfile.SYMTYPE, link="/usr/share/zoneinfo/UTC"),
    )
    assert plan.kind is EntryKind.SYMLINK
    assert member.linkname == "/usr/share/zoneinfo/UTC"


def test_plan_relative_symlink_out_of_root_kept() -> None:
    # The target is only resolved at boot, inside the new root, where ".." at "/"
    # stays at "/".
    tree = plan_all(entry("lib", tarfile.SYMTYPE, link="../../usr/lib"))
    assert tree["lib"] is EntryKind.SYMLINK


def test_plan_setuid_file_owned_by_root() -> None:
    member, plan = plan_last(
        entry("bin", tarfile.DIRTYPE), entry("bin/su", size=100, mode=0o4755, uid=0)
    )
    assert plan.kind is EntryKind.FILE
    assert member.mode == 0o4755
    assert member.uid == 0


def test_plan_character_device() -> None:
    tree = plan_all(
        entry("dev", tarfile.DIRTYPE), entry("dev/console", tarfile.CHRTYPE)
    )
    assert tree["dev/console"] is EntryKind.DEVICE


def test_plan_write_through_symlinked_directory_rejected() -> None:
    with pytest.raises(UnsafeMemberError, match="'evil', which is a symbolic link"):
        plan_all(
            entry("evil", tarfile.SYMTYPE, link="/tmp"),
            entry("evil/pwned", size=5),
        )


def test_plan_directory_over_symlink_rejected() -> None:
    with pytest.raises(UnsafeMemberError, match="would replace the symbolic link"):
        plan_all(entry("lib", tarfile.SYMTYPE, link="/"), entry("lib", tarfile.DIRTYPE))


def test_plan_file_over_symlink_rejected() -> None:
    with pytest.raises(UnsafeMemberError, match="would replace the symbolic link"):
        plan_all(entry("x", tarfile.SYMTYPE, link="/etc/passwd"), entry("x", size=5))


def test_plan_member_below_file_rejected() -> None:
    with pytest.raises(UnsafeMemberError, match="which is a regular file"):
        plan_all(entry("f", size=1), entry("f/g", size=1))


def test_plan_duplicate_file_rejected() -> None:
    with pytest.raises(UnsafeMemberError, match="list each path once"):
        plan_all(entry("f", size=1), entry("f", size=2))


def test_plan_duplicate_directory_allowed() -> None:
    _, plan = plan_last(entry("d", tarfile.DIRTYPE), entry("d/", tarfile.DIRTYPE))
    assert plan.exists


def test_plan_root_entry_is_existing_directory() -> None:
    _, plan = plan_last(entry("./", tarfile.DIRTYPE))
    assert plan.path == ROOT
    assert plan.exists


def test_plan_root_as_file_rejected() -> None:
    with pytest.raises(UnsafeMemberError, match="names the root directory"):
        plan_all(entry(".", size=1))


def test_plan_missing_parents_created() -> None:
    _, plan = plan_last(entry("a/b/c", size=1))
    assert plan.new_parents == ("a", "a/b")


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_SPARSE, b"V", b"Z"])
def test_plan_unsupported_type_rejected(kind: bytes) -> None:
    with pytest.raises(UnsafeMemberError, match="unsupported tar type"):
        plan_member(entry("x", kind), {ROOT: EntryKind.DIRECTORY})


def test_estimate_file_rounds_to_blocks() -> None:
    assert estimate_space([entry("f", size=1)], BLOCK) == (BLOCK, 1)
    assert estimate_space([entry("f", size=BLOCK)], BLOCK) == (BLOCK, 1)
    assert estimate_space([entry("f", size=BLOCK + 1)], BLOCK) == (2 * BLOCK, 1)
    assert estimate_space([entry("f", size=0)], BLOCK) == (0, 1)


def test_estimate_entry_kinds() -> None:
    assert estimate_space([entry("d", tarfile.DIRTYPE)], BLOCK) == (BLOCK, 1)
    assert estimate_space([entry("c", tarfile.CHRTYPE)], BLOCK) == (0, 1)
    assert estimate_space([entry("p", tarfile.FIFOTYPE)], BLOCK) == (0, 1)
    short = entry("s", tarfile.SYMTYPE, link="x" * 59)
    long = entry("s", tarfile.SYMTYPE, link="x" * 60)
    assert estimate_space([short], BLOCK) == (0, 1)
    assert estimate_space([long], BLOCK) == (BLOCK, 1)


def test_estimate_hard_link_is_free() -> None:
    members = [entry("a", size=1), entry("b", tarfile.LNKTYPE, link="a")]
    assert estimate_space(members, BLOCK) == (BLOCK, 1)


def test_estimate_implied_parents() -> None:
    # Two directories for a/ and a/b/, one block for the file.
    assert estimate_space([entry("a/b/c", size=1)], BLOCK) == (3 * BLOCK, 3)


def test_estimate_large_directory_needs_more_blocks() -> None:
    members = [entry("d", tarfile.DIRTYPE)]
    members += [entry(f"d/{index:0100d}", size=0) for index in range(100)]
    used, inodes = estimate_space(members, BLOCK)
    # 100 entries of 8 + 100 bytes do not fit one 4 KiB block.
    assert used > BLOCK
    assert inodes == 101


def test_estimate_large_file_extent_block() -> None:
    four_extents = 2 * 32768 * BLOCK
    assert estimate_space([entry("f", size=four_extents)], BLOCK)[0] == four_extents
    six_extents = four_extents + BLOCK
    assert (
        estimate_space([entry("f", size=six_extents)], BLOCK)[0] == six_extents + BLOCK
    )


def charge_all(budget: SpaceBudget, members: list[tarfile.TarInfo]) -> None:
    tree: dict[str, EntryKind] = {ROOT: EntryKind.DIRECTORY}
    for member in members:
        plan = plan_member(member, tree)
        budget.charge(member, plan)
        record_plan(tree, plan)


def test_budget_exact_fit_accepted() -> None:
    members = [entry("d", tarfile.DIRTYPE), entry("d/f", size=3 * BLOCK)]
    needed, inodes = estimate_space(members, BLOCK, root_entries=())
    assert needed == 4 * BLOCK
    budget = SpaceBudget(block_size=BLOCK, free_bytes=needed, free_inodes=inodes)
    charge_all(budget, members)
    assert budget.used_bytes == needed
    assert budget.used_inodes == inodes


def test_budget_one_byte_over_rejected() -> None:
    members = [entry("d", tarfile.DIRTYPE), entry("d/f", size=3 * BLOCK + 1)]
    budget = SpaceBudget(block_size=BLOCK, free_bytes=4 * BLOCK, free_inodes=10)
    with pytest.raises(InstallError) as excinfo:
        charge_all(budget, members)
    message = str(excinfo.value)
    assert "'d/f'" in message
    assert f"needed to {5 * BLOCK} bytes" in message
    assert f"only {4 * BLOCK} bytes are free" in message
    assert budget.used_bytes == BLOCK


def test_budget_inodes_exhausted() -> None:
    budget = SpaceBudget(block_size=BLOCK, free_bytes=1 << 30, free_inodes=1)
    with pytest.raises(InstallError, match="inodes needed to 2, but only 1"):
        charge_all(budget, [entry("a", size=1), entry("b", size=1)])
    assert budget.used_inodes == 1
