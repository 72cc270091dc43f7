"""``python -m mbl_sim.campaign campaign|replay …``: the same commands as
``mbl-sim campaign`` and ``mbl-sim replay``, with the same exit statuses and messages.

The guard matters: campaign workers start with multiprocessing's spawn method, which
imports the main module again in every worker.
"""

from __future__ import annotations

import sys

from mbl_sim.cli import main

if __name__ == "__main__":
    sys.exit(main())
