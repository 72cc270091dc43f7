"""The ``power-cut`` check of board certification (``mbl-sim certify``): a reduced
campaign over the updater's root filesystem update.

``mbl_sim.certify`` finds `certify_power_cut` by name. The check runs on every
storage the model attaches (virtio disks, and SD cards, which have no write cache)
and with both kinds of boot state (a U-Boot environment or flag files). It is
skipped when the campaign cannot run on the board, and fails when any crash state
is bad.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from mbl_sim.campaign.plan import PlanOptions
from mbl_sim.campaign.run import CampaignOptions, run_campaign
from mbl_sim.errors import ConfigError

if TYPE_CHECKING:
    from mbl_sim.certify.registry import CertifyContext

__all__ = ["CERTIFY_BOOT_SHARE", "CERTIFY_MAX_STATES", "certify_power_cut"]

CERTIFY_MAX_STATES = 16
"""States checked, those around the environment write first."""

CERTIFY_BOOT_SHARE = 0.25


def certify_power_cut(context: CertifyContext) -> str:
    """Run the reduced campaign for the board under certification; return a
    detail line for the report.

    Raises:
        CheckSkipped: the storage model or the host checks do not support the board.
        CheckFailed: a crash state is bad; the message names the first one.
    """
    from mbl_sim.certify.registry import CheckFailed, CheckSkipped

    board = context.board
    options = CampaignOptions(
        workers=os.cpu_count() or 1,
        plan=PlanOptions(max_states=CERTIFY_MAX_STATES, boot_share=CERTIFY_BOOT_SHARE),
    )
    directory = context.workdir / "power-cut"
    try:
        result = run_campaign(
            context.images, "rootfs", directory, options, context.report
        )
    except ConfigError as error:
        raise CheckSkipped(f"not available on board {board.name}: {error}") from error
    states = len(result.results)
    if result.bad or result.errors:
        first = (result.bad or result.errors)[0]
        problem = (first.problems or [first.error or ""])[0].splitlines()[0]
        raise CheckFailed(
            f"{len(result.bad)} of {states} crash states are bad and"
            f" {len(result.errors)} failed to check; first {first.planned.name}:"
            f" {problem}; report {result.report}"
        )
    booted = sum(r.boot is not None for r in result.results)
    return (
        f"{states} crash states of a root filesystem update, {booted} booted, none"
        f" bad, in {result.seconds:.0f} s; report {result.report}"
    )
