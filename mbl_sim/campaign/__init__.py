"""Crash-state campaigns: every power-cut point of an update, checked.

A campaign runs an update once on a device whose eMMC sits behind the storage
model (`mbl_sim.storage`), recording every write and flush. It then plans crash
states along the update's write log: every flush, plus seeded variants in which
part of the cached writes survived or one write was torn. Parallel worker
processes check each state from the host (environment, slot filesystem, slot
content, applications) and boot a share of them. The campaign writes a Markdown
report, an SVG chart, JUnit XML and a bundle for every bad state, which `replay`
reproduces.

Modules: ``updates`` (what is recorded), ``record``, ``plan``, ``checks`` (host
checks), ``boot`` (boot checks), ``runner`` (worker processes), ``report``,
``bundle`` (bundles and replay), ``apps`` (the application check), ``ext4``,
``run`` (the whole campaign), ``certify`` (the check of ``mbl-sim certify``) and
``cli``.
"""

from mbl_sim.campaign.bundle import ReplayResult, replay, write_bundle
from mbl_sim.campaign.certify import certify_power_cut
from mbl_sim.campaign.checks import HostCheck, StateView, register_host_check
from mbl_sim.campaign.plan import PlannedState, PlanOptions, plan_states
from mbl_sim.campaign.record import Recording, record
from mbl_sim.campaign.run import (
    CampaignOptions,
    CampaignResult,
    check_recording,
    run_campaign,
)
from mbl_sim.campaign.updates import UPDATES, UpdateScenario, update_names

__all__ = [
    "UPDATES",
    "CampaignOptions",
    "CampaignResult",
    "HostCheck",
    "PlanOptions",
    "PlannedState",
    "Recording",
    "ReplayResult",
    "StateView",
    "UpdateScenario",
    "certify_power_cut",
    "check_recording",
    "plan_states",
    "record",
    "register_host_check",
    "replay",
    "run_campaign",
    "update_names",
    "write_bundle",
]
