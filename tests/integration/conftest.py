"""Fixtures of the update tests: payload parts built from the device's own root
filesystem."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest

from mbl_sim.images.cache import default_cache_dir
from mbl_sim.images.recipe import DeviceImages
from mbl_sim.payloads import ROOTFS_MEMBER, RootfsChange, cached_rootfs_payload


@pytest.fixture(scope="session")
def rootfs_xz(
    device_images: DeviceImages, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The ``rootfs.tar.xz`` of the device's own, unchanged root filesystem."""
    payload = cached_rootfs_payload(
        device_images.rootfs, default_cache_dir(), RootfsChange()
    )
    output = tmp_path_factory.mktemp("rootfs-xz") / ROOTFS_MEMBER
    with tarfile.open(payload) as tar:
        source = tar.extractfile(ROOTFS_MEMBER)
        assert source is not None, f"{payload} has no regular {ROOTFS_MEMBER}"
        with source, output.open("wb") as target:
            shutil.copyfileobj(source, target)
    return output
