"""Device-side updater for mbl-sim (``mbl-update``): A/B root filesystem updates and
application updates from .ipk packages.

Runs on the device's Debian Python 3.11 and uses the standard library only.
"""
