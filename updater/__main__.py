"""Run ``mbl-update`` as ``python3 -m updater``."""

import sys

from updater.cli import main

sys.exit(main())
