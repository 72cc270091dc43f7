"""Application payloads from the field on a booted device: a database with a broken
stanza, a package larger than the free space, malformed payload tars, the same
package in three builds, and an HTML page saved as an .ipk."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import boot_state_digest

from mbl_sim.device import Device
from mbl_sim.ipk import IpkFormat, ShellApp
from mbl_sim.payloads import wrap_payload

pytestmark = pytest.mark.qemu

AppPayload = Callable[..., Path]

LOOP = 'echo "$MBL_APP_NAME $MBL_APP_VERSION started"; while :; do sleep 10; done'
# Every entry below /home with its size, modification time and inode: a rejected
# payload must leave all of them as they were.
SNAPSHOT = "find /home | sort | xargs stat -c '%n %s %Y %i'"


def shell_app(name: str, version: str, **options: object) -> ShellApp:
    options.setdefault("health_window", 1.0)
    return ShellApp(name, version, LOOP, **options)  # type: ignore[arg-type]


def install(device: Device, payload: Path) -> str:
    result = device.install_apps(payload)
    assert result.exit_status == 0, result.output
    return result.output


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def raw_payload(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            add_member(tar, name, data)
    return path


def test_status_database_with_broken_stanza(
    device: Device, app_payload: AppPayload
) -> None:
    install(device, app_payload(shell_app("hello", "1.0.0")))
    device.run("printf '\\nPackage:\\n' >> /home/app/.opkg/status", check=True)
    line = int(device.check_output("wc -l < /home/app/.opkg/status"))

    text = device.run("mbl-update status")
    assert text.exit_status == 0, text.output
    assert "  hello 1.0.0 running (pid " in text.output
    assert f"line {line}: field Package is empty; stanza ignored" in text.output
    document = json.loads(device.check_output("mbl-update status --json"))
    assert [app["name"] for app in document["apps"]] == ["hello"]
    assert document["app_database_issues"] == [
        {
            "line": line,
            "message": f"line {line}: field Package is empty; stanza ignored",
        }
    ]
    assert device.run("mbl-update app stop hello").exit_status == 0
    assert device.run("mbl-update app start hello").exit_status == 0

    device.reboot()
    assert device.app_state("hello") == "running"

    output = install(device, app_payload(shell_app("hello", "2.0.0")))
    assert f"line {line}: field Package is empty" in output
    database = device.check_output("cat /home/app/.opkg/status")
    assert database.startswith("Package: hello\nVersion: 2.0.0\n")
    assert "Package:\n" not in database
    assert device.status()["app_database_issues"] == []


def test_package_larger_than_free_space(
    device: Device, app_payload: AppPayload
) -> None:
    install(device, app_payload(shell_app("hello", "1.0.0")))
    pid = device.apps()["hello"]["pid"]
    snapshot = device.check_output(SNAPSHOT)
    free = int(device.check_output("df -k /home | tail -1").split()[3]) * 1024
    # Zeros compress to almost nothing, so the payload is small but unpacks to more
    # than the partition holds.
    big = shell_app("hello", "2.0.0", files={"share/big.bin": bytes(free + (4 << 20))})

    result = device.install_apps(app_payload(big))

    assert result.exit_status == 1
    assert "not enough free space in /home/app for package hello 2.0.0" in result.output
    assert "(hello_2.0.0_all.ipk)" in result.output
    assert "bytes are free; nothing was changed" in result.output
    needed = int(result.output.split("it needs ")[1].split()[0])
    free_reported = int(result.output.split("but only ")[1].split()[0])
    assert needed > free + (4 << 20)
    assert free_reported >= free - (1 << 20)
    assert device.apps()["hello"]["pid"] == pid
    assert device.check_output(SNAPSHOT) == snapshot


def test_malformed_payloads_change_nothing(
    device: Device, app_payload: AppPayload, tmp_path: Path
) -> None:
    install(device, app_payload(shell_app("hello", "1.0.0")))
    valid = shell_app("hello", "2.0.0").build(tmp_path / "packages")
    world = shell_app("world", "1.0.0").build(tmp_path / "packages")
    cases = {
        "non-ipk-beside-ipks": (
            {
                valid.name: valid.read_bytes(),
                world.name: world.read_bytes(),
                "notes.txt": b"release notes\n",
            },
            "'notes.txt' is not expected",
        ),
        "ipk-in-subdirectory": (
            {world.name: world.read_bytes(), f"apps/{valid.name}": valid.read_bytes()},
            "is in a subdirectory",
        ),
        "ipk-and-rootfs": (
            {valid.name: valid.read_bytes(), "rootfs.tar.xz": b"\xfd7zXZ\x00"},
            "contains both rootfs.tar.xz and application packages",
        ),
    }
    pid = device.apps()["hello"]["pid"]
    snapshot = device.check_output(SNAPSHOT)
    boot_state = boot_state_digest(device)
    for name, (members, message) in cases.items():
        payload = raw_payload(tmp_path / f"{name}.tar", members)

        result = device.install_apps(payload)

        assert result.exit_status == 1, name
        assert message in result.output, name
        assert device.apps()["hello"]["pid"] == pid, name
        assert device.check_output(SNAPSHOT) == snapshot, name
        assert boot_state_digest(device) == boot_state, name
        assert device.app_state("world") == "not installed", name


def test_three_builds_install_identical_files(
    device: Device, app_payload: AppPayload, tmp_path: Path
) -> None:
    app = ShellApp(
        "hello",
        "1.0.0",
        LOOP,
        health_window=1.0,
        files={
            "share/hello/greeting.txt": b"hello\n" * 1000,
            "etc/hello.conf": b"interval=10\n",
        },
    )
    builds = {
        "ar with gzip members": IpkFormat(),
        "ar with xz data.tar": IpkFormat(data_compression="xz"),
        "gzip tar with ./ names": IpkFormat(wrapper="tar", dot_slash=True),
    }
    listings = {}
    for label, package_format in builds.items():
        output = install(device, app_payload(app, package_format=package_format))
        assert "installed hello 1.0.0; all running" in output, label
        listings[label] = device.check_output(
            "cd /home/app/hello/current/data && find . | sort"
            " | xargs stat -c '%n %A %s' && find . -type f | sort | xargs sha256sum"
        )
    reference = listings.pop("ar with gzip members")
    assert "./share/hello/greeting.txt -rw-r--r-- 6000" in reference
    assert "./bin/hello -rwxr-xr-x" in reference
    for label, listing in listings.items():
        assert listing == reference, label
    # A reinstall of the running version stages next to it as 1.0.0_2, and the
    # third install takes the name 1.0.0 again, free after the second one.
    assert device.check_output("ls /home/app/hello").split() == ["1.0.0", "current"]

    pid = device.apps()["hello"]["pid"]
    snapshot = device.check_output(SNAPSHOT)
    boot_state = boot_state_digest(device)
    page = (
        b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head></html>\n"
    )
    html = wrap_payload(
        {"hello_1.1.0_all.ipk": _write(tmp_path / "page.html", page)},
        tmp_path / "html.tar",
    )

    result = device.install_apps(html)

    assert result.exit_status == 1
    assert "hello_1.1.0_all.ipk is not a valid .ipk" in result.output
    assert "it is an HTML page" in result.output
    assert device.apps()["hello"]["pid"] == pid
    assert device.check_output(SNAPSHOT) == snapshot
    assert boot_state_digest(device) == boot_state


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
