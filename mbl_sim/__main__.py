"""``python3 -m mbl_sim`` runs the mbl-sim command line."""

import sys

from mbl_sim.cli import main

sys.exit(main())
