"""Device-side updater for mbl-sim: A/B root filesystem updates (``mbl-update``).

Runs on the device's Debian Python 3.11 and uses the standard library only.
"""
