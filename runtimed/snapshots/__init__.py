"""Snapshotters: `open_snapshotters` builds the ones this machine supports, by name."""

from __future__ import annotations

import logging
from pathlib import Path

from runtimed.errors import FailedPrecondition
from runtimed.metadata.db import Database
from runtimed.snapshots.base import EventPublisher, Snapshotter

log = logging.getLogger("runtimed.snapshots")

DEFAULT = "overlayfs"


def open_snapshotters(root: Path, db: Database,
                      publish: EventPublisher | None = None) -> dict[str, Snapshotter]:
    """`overlayfs` (when the kernel supports it) and `native`, stored under
    `<root>/snapshots/<name>`; leftovers of interrupted operations are removed."""
    from runtimed.snapshots.native import NativeSnapshotter
    from runtimed.snapshots.overlay import OverlaySnapshotter

    found: dict[str, Snapshotter] = {}
    for cls in (OverlaySnapshotter, NativeSnapshotter):
        try:
            snapshotter = cls(Path(root) / "snapshots" / cls.name, db, publish)
        except FailedPrecondition as exc:
            log.warning("%s", exc)
            continue
        snapshotter.cleanup()
        found[cls.name] = snapshotter
    return found
