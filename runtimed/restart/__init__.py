"""Restart policies and autoremove, applied by the daemon when tasks exit."""
