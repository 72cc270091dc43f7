"""Skip markers for unit tests that need a host tool or root.

``@pytest.mark.needs_libubootenv``: runs only when ``fw_printenv`` and ``fw_setenv``
(Debian package libubootenv-tool) are on PATH.
``@pytest.mark.needs_root``: runs only as root, for mknod and chown.
``@pytest.mark.needs_loop_mount``: runs only as root with loop devices, mke2fs, e2fsck
and mount, to install into an ext4 image file.
"""

from __future__ import annotations

import os
import shutil

import pytest

_SKIP_REASONS = {
    "needs_libubootenv": (
        "fw_printenv/fw_setenv not found; install Debian's libubootenv-tool"
    ),
    "needs_root": "needs root to create device nodes and set owners",
    "needs_loop_mount": (
        "needs root, /dev/loop-control, mke2fs, e2fsck and mount to mount ext4 images"
    ),
}
_LOOP_MOUNT_TOOLS = ("mke2fs", "e2fsck", "mount", "umount")


def _missing(marker: str) -> bool:
    if marker == "needs_libubootenv":
        return shutil.which("fw_printenv") is None or shutil.which("fw_setenv") is None
    if marker == "needs_loop_mount":
        tools_missing = any(shutil.which(tool) is None for tool in _LOOP_MOUNT_TOOLS)
        no_loop = not os.path.exists("/dev/loop-control")
        return tools_missing or no_loop or os.geteuid() != 0
    return os.geteuid() != 0


def pytest_configure(config: pytest.Config) -> None:
    for marker, reason in _SKIP_REASONS.items():
        config.addinivalue_line(
            "markers", f"{marker}: skipped unless present ({reason})"
        )


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker, reason in _SKIP_REASONS.items():
        if item.get_closest_marker(marker) is not None and _missing(marker):
            pytest.skip(reason)
