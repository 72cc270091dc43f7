"""``python3 -m mbl_sim`` runs the mbl-sim command line.

The guard matters: campaign workers start with multiprocessing's spawn method, which
imports the main module again in every worker.
"""

import sys

from mbl_sim.cli import main

if __name__ == "__main__":
    sys.exit(main())
