"""Daemon side of running containers: `ShimManager` starts and finds shims, `TaskManager`
keeps the task table and relays shim events (see docs/shim.md)."""
