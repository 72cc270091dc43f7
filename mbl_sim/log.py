"""Logging conventions shared by the host modules.

Each module logs to ``logging.getLogger(__name__)``, and each guest gets a child
of it named after the guest (``mbl_sim.console.guest``). Levels:

- DEBUG: start and end of steps, QMP traffic (``→`` sent, ``←`` received);
- CONSOLE (15): each line received on a guest's serial console;
- INFO: scenario steps;
- WARNING: abnormal QEMU exits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["CONSOLE", "step"]

CONSOLE = 15
"""Level of console lines, between DEBUG (10) and INFO (20)."""

logging.addLevelName(CONSOLE, "CONSOLE")


@contextmanager
def step(logger: logging.Logger, name: str) -> Iterator[None]:
    """Log the start and end of a step at DEBUG, with its duration.

    A step that raises is logged as failed, with the exception's type, and the
    exception propagates.
    """
    logger.debug("%s: start", name)
    started = time.monotonic()
    try:
        yield
    except BaseException as error:
        elapsed = time.monotonic() - started
        logger.debug(
            "%s: failed after %.3f s (%s)", name, elapsed, type(error).__name__
        )
        raise
    elapsed = time.monotonic() - started
    logger.debug("%s: done in %.3f s", name, elapsed)
