"""Hard links, absolute symbolic links, setuid files, owners and device nodes survive
a root filesystem update, and a member that leaves the new root fails the update
before the active slot changes."""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    add_char_device,
    add_directory,
    add_file,
    add_hard_link,
    add_symlink,
    boot_state_digest,
    build_rootfs_payload_with,
    install_without_reboot,
    slot_device,
    wrap_rootfs_tar,
)

from mbl_sim.device import Device
from mbl_sim.images.recipe import DeviceImages
from mbl_sim.payloads import RootfsChange

pytestmark = pytest.mark.qemu

SPECIAL_VERSION = "2.0.0-special"
ZONEINFO = "/usr/share/zoneinfo/UTC"
ZONEINFO_DATA = b"TZif2 placeholder for UTC\n"
MOUNT_POINT = "/tmp/mbl-sim-slot-b"


def add_special_entries(tar: tarfile.TarFile) -> None:
    add_file(tar, "usr/bin/a", b"#!/bin/sh\necho linked\n", mode=0o755)
    add_hard_link(tar, "usr/bin/b", "usr/bin/a")
    add_file(tar, ZONEINFO.lstrip("/"), ZONEINFO_DATA)
    add_symlink(tar, "etc/localtime", ZONEINFO)
    # /bin is a symbolic link to usr/bin in this merged-/usr root filesystem, and
    # the updater rejects members below a symbolic link, so su goes to usr/bin.
    add_file(tar, "usr/bin/su", b"#!/bin/sh\nexit 1\n", mode=0o4755, uid=0, gid=0)
    # A non-root owner shows that the numeric owner is restored, not defaulted.
    add_file(tar, "usr/bin/mbl-sim-setgid", b"data\n", mode=0o2750, uid=1234, gid=4321)
    # The tarball from write_rootfs_tar already has dev/console (5, 1) and dev/null.
    add_char_device(tar, "dev/mbl-sim-tty", 4, 64, mode=0o620)


def test_special_entries_kept(
    device: Device, device_images: DeviceImages, tmp_path: Path
) -> None:
    payload = build_rootfs_payload_with(
        device_images.rootfs,
        tmp_path / "payload.tar",
        add_special_entries,
        RootfsChange(version=SPECIAL_VERSION, remove=("usr/bin/su",)),
    )

    result = install_without_reboot(device, payload)

    assert result.exit_status == 0, result.output
    # devtmpfs covers /dev once slot b runs, so the nodes are checked on the slot
    # mounted read-only from slot a.
    device.check_output(f"mkdir -p {MOUNT_POINT}")
    device.check_output(f"mount -t ext4 -o ro {slot_device(device, 'b')} {MOUNT_POINT}")
    try:
        console = device.check_output(
            f"stat -c '%F %t %T %a %u %g' {MOUNT_POINT}/dev/console"
        )
        tty = device.check_output(
            f"stat -c '%F %t %T %a' {MOUNT_POINT}/dev/mbl-sim-tty"
        )
    finally:
        device.check_output(f"umount {MOUNT_POINT}")
    # BusyBox stat prints major and minor numbers in hexadecimal for %t and %T.
    assert console == "character special file 5 1 600 0 0\n"
    assert tty == "character special file 4 40 620\n"

    device.reboot()

    assert device.running_slot() == "b"
    assert device.version() == SPECIAL_VERSION
    inode_a, links_a = device.check_output("stat -c '%i %h' /usr/bin/a").split()
    inode_b, links_b = device.check_output("stat -c '%i %h' /usr/bin/b").split()
    assert inode_a == inode_b
    assert links_a == "2"
    assert links_b == "2"
    assert device.check_output("/usr/bin/b") == "linked\n"
    assert device.check_output("readlink /etc/localtime") == ZONEINFO + "\n"
    assert device.check_output("cat /etc/localtime") == ZONEINFO_DATA.decode()
    assert (
        device.check_output("stat -c '%a %u %g %F' /bin/su")
        == "4755 0 0 regular file\n"
    )
    setgid = device.check_output("stat -c '%a %u %g' /usr/bin/mbl-sim-setgid")
    assert setgid == "2750 1234 4321\n"


def dot_dot_name(tar: tarfile.TarFile) -> None:
    add_file(tar, "../escape", b"escaped\n")


def absolute_name(tar: tarfile.TarFile) -> None:
    add_file(tar, "/tmp/escape", b"escaped\n")


def below_symlink(tar: tarfile.TarFile) -> None:
    add_symlink(tar, "escape-link", "/tmp")
    add_file(tar, "escape-link/escape", b"escaped\n")


def hard_link_outside(tar: tarfile.TarFile) -> None:
    add_hard_link(tar, "escape", "../../etc/passwd")


# Each case: the escaping members, then the parts of the updater's error that name
# the member and the problem. Each set goes between valid members, so extraction has
# begun.
ESCAPES: dict[str, tuple[Callable[[tarfile.TarFile], None], *tuple[str, ...]]] = {
    "dot-dot-name": (dot_dot_name, "member '../escape' contains a '..' component"),
    "absolute-name": (absolute_name, "member '/tmp/escape' has an absolute name"),
    "below-symlink": (below_symlink, "member ", "which is a symbolic link"),
    "hard-link-outside": (
        hard_link_outside,
        "hard link 'escape' points to '../../etc/passwd'",
        "contains a '..'",
    ),
}


def write_escaping_payload(
    directory: Path, escape: Callable[[tarfile.TarFile], None]
) -> Path:
    rootfs_tar = directory / "rootfs.tar"
    with tarfile.open(rootfs_tar, "w", format=tarfile.GNU_FORMAT) as tar:
        add_directory(tar, "etc")
        add_file(tar, "etc/mbl-version", b"2.0.0-escape\n")
        escape(tar)
        add_directory(tar, "usr")
        add_file(tar, "usr/mbl-sim-after", b"after the escaping member\n")
    return wrap_rootfs_tar(rootfs_tar, directory / "payload.tar")


@pytest.mark.parametrize("case", list(ESCAPES))
def test_escaping_entry_rejected(device: Device, tmp_path: Path, case: str) -> None:
    escape, *expected_messages = ESCAPES[case]
    payload = write_escaping_payload(tmp_path, escape)
    boot_state_before = boot_state_digest(device)
    passwd_before = device.check_output("stat -c '%i %h' /etc/passwd")

    result = install_without_reboot(device, payload)

    assert result.exit_status == 1, result.output
    assert "mbl-update: error: " in result.output
    for expected in expected_messages:
        assert expected in result.output
    assert "active slot is now" not in result.output
    assert boot_state_digest(device) == boot_state_before
    # The updater mounts the new slot on a directory in /tmp, so "../escape" and a
    # link to /tmp would both land in /tmp.
    found = device.check_output("find / /tmp /scratch /run -xdev -name 'escape*'")
    assert found == ""
    assert device.check_output("stat -c '%i %h' /etc/passwd") == passwd_before

    device.reboot()

    assert device.running_slot() == "a"
    assert device.version() == device.images.factory_version
    assert boot_state_digest(device) == boot_state_before
