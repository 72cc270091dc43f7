"""Crash-state campaigns on real guests: the updater's root filesystem and
application updates have no bad state, and a faulty update that flips the slot
before syncing has some, which its bundle reproduces.

The campaigns are sized for CI: ``MBL_SIM_CAMPAIGN_MAX_STATES`` states (default
16, those around the environment write first) and a boot share of
``MBL_SIM_CAMPAIGN_BOOT_SHARE`` (default 0.125).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from mbl_sim.campaign import CampaignOptions, PlanOptions, replay, run_campaign
from mbl_sim.images.recipe import DeviceImages

pytestmark = pytest.mark.qemu

WORKERS = 2


def ci_options() -> CampaignOptions:
    plan = PlanOptions(
        max_states=int(os.environ.get("MBL_SIM_CAMPAIGN_MAX_STATES", "16")),
        boot_share=float(os.environ.get("MBL_SIM_CAMPAIGN_BOOT_SHARE", "0.125")),
    )
    return CampaignOptions(workers=WORKERS, plan=plan)


def test_campaign_rootfs_update_has_no_bad_state(
    device_images: DeviceImages, tmp_path: Path
) -> None:
    result = run_campaign(device_images, "rootfs", tmp_path / "campaign", ci_options())

    report = result.report.read_text()
    assert result.errors == [], report
    assert result.bad == [], report
    assert any(r.boot is not None for r in result.results)
    assert any(r.host.active_slot == "b" for r in result.results), report
    suite = (
        ElementTree.parse(result.directory / "junit.xml").getroot().find("testsuite")
    )
    assert suite is not None
    assert suite.get("failures") == "0"
    assert (result.directory / "outcome.svg").stat().st_size > 0


def test_campaign_finds_flip_before_sync(
    device_images: DeviceImages, tmp_path: Path
) -> None:
    result = run_campaign(
        device_images, "rootfs-flip-before-sync", tmp_path / "campaign", ci_options()
    )

    assert result.errors == []
    assert result.bad, result.report.read_text()
    first = result.bad[0]
    assert first.host.active_slot == "b"
    assert any("slot b" in problem for problem in first.problems)
    bundle = result.bundles[first.planned.name]
    replayed = replay(bundle, images=device_images)
    assert replayed.host.problems == first.host.problems
    assert replayed.boot is not None
    assert replayed.boot.boots >= 1


def test_campaign_apps_update_has_no_bad_state(
    device_images: DeviceImages, tmp_path: Path
) -> None:
    result = run_campaign(device_images, "apps", tmp_path / "campaign", ci_options())

    report = result.report.read_text()
    assert result.recording.apps_before == {"alpha": "1.0.0", "beta": "1.0.0"}
    assert result.recording.apps_after == {"alpha": "2.0.0", "beta": "2.0.0"}
    assert result.errors == [], report
    assert result.bad == [], report
