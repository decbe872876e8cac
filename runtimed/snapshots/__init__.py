"""Snapshotters: `open_snapshotters` builds the ones this machine supports, by name."""

from __future__ import annotations

import logging
from pathlib import Path

from runtimed.errors import FailedPrecondition
from runtimed.metadata.db import Database
from runtimed.snapshots.base import EventPublisher, Snapshotter

log = logging.getLogger("runtimed.snapshots")

DEFAULT = "overlayfs"


def exchange_publisher(exchange) -> EventPublisher:
    """Publish snapshot events as containerd's `containerd.events.Snapshot*` messages."""

    def publish(ns: str, topic: str, fields: dict) -> None:
        from runtimed.api.containerd.events import snapshot_pb2

        message = {
            "/snapshot/prepare": snapshot_pb2.SnapshotPrepare,
            "/snapshot/commit": snapshot_pb2.SnapshotCommit,
            "/snapshot/remove": snapshot_pb2.SnapshotRemove,
        }[topic](**fields)
        exchange.publish(ns, topic, message)

    return publish


def open_snapshotters(root: Path, db: Database, exchange=None, leases=None, namespaces=None,
                      gc=None) -> dict[str, Snapshotter]:
    """`overlayfs` (when the kernel supports it) and `native`, stored under
    `<root>/snapshots/<name>`; leftovers of interrupted operations are removed. With `gc`,
    snapshots take part in garbage collection; with `namespaces`, a namespace holding
    snapshots is not deletable."""
    from runtimed.snapshots.native import NativeSnapshotter
    from runtimed.snapshots.overlay import OverlaySnapshotter

    publish = exchange_publisher(exchange) if exchange is not None else None
    found: dict[str, Snapshotter] = {}
    for cls in (OverlaySnapshotter, NativeSnapshotter):
        try:
            snapshotter = cls(Path(root) / "snapshots" / cls.name, db, publish, leases, namespaces)
        except FailedPrecondition as exc:
            log.warning("%s", exc)
            continue
        snapshotter.cleanup()
        snapshotter.gc = gc
        found[cls.name] = snapshotter
    if namespaces is not None:
        namespaces.register_usage("snapshots", "SELECT 1 FROM snapshots WHERE namespace = ? LIMIT 1")
    if gc is not None:
        from runtimed.snapshots.gc import SnapshotKind

        gc.register(SnapshotKind(found))
    return found
