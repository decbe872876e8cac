"""Snapshots in the garbage collector (see runtimed.metadata.gc for the hooks).

A snapshot is kept alive by a root (a container, a lease, an image config's
`containerd.io/gc.ref.snapshot.<snapshotter>` label, its own `containerd.io/gc.root`
label) or by a live child; it keeps its parent and its label references alive. An
unreachable snapshot is removed with all its descendants, which are unreachable too (a
reachable child would have kept it alive). Trees are detached under the metadata lock and
deleted on a background thread, so a collection stays quick however large the layers.
"""

from __future__ import annotations

import json
import logging
import threading

from runtimed.metadata.gc import ROOT_LABEL, Node, ResourceKind, label_refs

log = logging.getLogger("runtimed.snapshots.gc")


class SnapshotKind(ResourceKind):
    kind = "snapshot"

    def __init__(self, snapshotters: dict):
        self.snapshotters = snapshotters

    def roots(self, tx, now):
        rows = tx.execute(
            "SELECT snapshotter, namespace, key FROM snapshots WHERE labels LIKE ?",
            (f'%"{ROOT_LABEL}"%',),
        ).fetchall()
        for r in rows:
            yield Node("snapshot", r["namespace"], f"{r['snapshotter']}/{r['key']}")

    def references(self, tx, node):
        snapshotter, _, key = node.key.partition("/")
        r = tx.execute(
            "SELECT s.labels, p.key AS parent FROM snapshots s "
            "LEFT JOIN snapshots p ON s.parent_id = p.id "
            "WHERE s.snapshotter = ? AND s.namespace = ? AND s.key = ?",
            (snapshotter, node.namespace, key),
        ).fetchone()
        if r is None:
            return
        if r["parent"]:
            yield Node("snapshot", node.namespace, f"{snapshotter}/{r['parent']}")
        yield from label_refs(node.namespace, json.loads(r["labels"]))

    def candidates(self, tx):
        for r in tx.execute("SELECT snapshotter, namespace, key FROM snapshots").fetchall():
            yield Node("snapshot", r["namespace"], f"{r['snapshotter']}/{r['key']}")

    def remove(self, tx, node):
        snapshotter, _, key = node.key.partition("/")
        r = tx.execute(
            "SELECT id FROM snapshots WHERE snapshotter = ? AND namespace = ? AND key = ?",
            (snapshotter, node.namespace, key),
        ).fetchone()
        if r is None:
            return  # removed with an unreachable ancestor already
        doomed, frontier = [], [r["id"]]
        while frontier:
            doomed.extend(frontier)
            marks = ",".join("?" * len(frontier))
            frontier = [c[0] for c in tx.execute(
                f"SELECT id FROM snapshots WHERE parent_id IN ({marks})", frontier)]
        for id in reversed(doomed):  # children before parents
            tx.execute("DELETE FROM snapshots WHERE id = ?", (id,))

    def sweep(self, tx):
        detached = []
        for snapshotter in list(self.snapshotters.values()):
            detached.extend(snapshotter.detach_orphans())
        if detached:
            threading.Thread(target=self._purge, name="snapshot-purge", daemon=True).start()
        return detached

    def _purge(self) -> None:
        for snapshotter in list(self.snapshotters.values()):
            try:
                snapshotter.purge()
            except OSError:
                log.exception("removing detached trees of %s", snapshotter.name)
