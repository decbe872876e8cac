"""Garbage collection: mark from roots, sweep what no root reaches.

Every collectable object is a `Node(kind, namespace, key)`. Roots are image targets,
unexpired leases and what they hold, unexpired ingests, objects labelled
`containerd.io/gc.root`, and whatever a registered kind declares (containers: their
snapshot and label references). From a node, references are followed through labels
(`containerd.io/gc.ref.content[.<x>|/<x>]` → content digest,
`containerd.io/gc.ref.snapshot.<snapshotter>[/<x>]` → snapshot key) and, for content,
through the descriptors inside index and manifest JSON when the blob carries no content
ref labels. containerd follows only the labels, which its clients set (ctr import and
pull label every child); when a client set any, its labels rule, so removing them (`ctr
content prune references` drops the layer labels) lets those children go as in
containerd. Reading the JSON of unlabelled blobs means content written by clients that
set no labels (a plain `ctr content ingest` of a manifest, label-less importers) is still
kept while its image stays and collected as a whole when it goes.

Plugging in another kind (the snapshots and containers stores do this):

    gc.register(kind)   # kind: a ResourceKind subclass instance

with these hooks, all called inside the collector's single metadata transaction `tx`:

- `roots(tx, now_ns)`: nodes (of any kind) that are live regardless of references, e.g.
  every container yields `Node("snapshot", ns, f"{snapshotter}/{key}")` plus
  `label_refs(ns, labels)`.
- `references(tx, node)`: for a node of this kind, the nodes it keeps alive (a snapshot:
  its parent and its label refs).
- `candidates(tx)`: every node of this kind that may be collected (empty for containers).
- `remove(tx, node)`: delete the node's metadata row(s). Run in a savepoint: an exception
  is logged, rolled back for that node only, and the sweep goes on.
- `sweep(tx)`: after metadata removal, release backing storage nothing references any
  more (blob files, snapshot directories); returns descriptions of what it removed.
  Runs under the metadata lock, so writers cannot race it; keep it quick.

Snapshot keys in nodes are `<snapshotter>/<key>`, as containerd spells them.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from runtimed.metadata.db import Database, now_ns
from runtimed.metadata.leases import CONTENT, EXPIRE_LABEL, FLAT_LABEL, INGESTS, SNAPSHOTS

log = logging.getLogger("runtimed.gc")

ROOT_LABEL = "containerd.io/gc.root"
CONTENT_REF = "containerd.io/gc.ref.content"
SNAPSHOT_REF = "containerd.io/gc.ref.snapshot."
MAX_JSON = 4 << 20  # index and manifest JSON larger than this is not parsed for children

SCHEDULE_DELAY = 0.1


@dataclass(frozen=True)
class Node:
    kind: str  # "content", "ingest", "lease", "snapshot", ...
    namespace: str
    key: str
    flat: bool = False  # reached through a `containerd.io/gc.flat` lease: not followed

    def __str__(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.key}"


@dataclass
class CollectResult:
    removed: list[Node] = field(default_factory=list)
    swept: list[str] = field(default_factory=list)  # backing storage released
    errors: list[str] = field(default_factory=list)
    duration: float = 0.0


def label_refs(ns: str, labels: dict[str, str]) -> Iterator[Node]:
    """Nodes referenced by `containerd.io/gc.ref.*` labels."""
    for key, value in labels.items():
        if key == CONTENT_REF or (
            key.startswith(CONTENT_REF) and key[len(CONTENT_REF)] in "./"
        ):
            yield Node("content", ns, value)
        elif key.startswith(SNAPSHOT_REF):
            snapshotter = key[len(SNAPSHOT_REF):].split("/", 1)[0]
            if snapshotter:
                yield Node("snapshot", ns, f"{snapshotter}/{value}")


def _expired(labels: dict[str, str], now: float) -> bool:
    value = labels.get(EXPIRE_LABEL)
    if not value:
        return False
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        log.info("ignoring invalid %s value %r", EXPIRE_LABEL, value)
        return False
    return when.timestamp() < now


class ResourceKind:
    """A kind of object the collector knows; override the hooks that apply."""

    kind = ""

    def roots(self, tx: sqlite3.Connection, now: int) -> Iterable[Node]:
        return ()

    def references(self, tx: sqlite3.Connection, node: Node) -> Iterable[Node]:
        return ()

    def candidates(self, tx: sqlite3.Connection) -> Iterable[Node]:
        return ()

    def remove(self, tx: sqlite3.Connection, node: Node) -> None:
        pass

    def sweep(self, tx: sqlite3.Connection) -> list[str]:
        return []


class LeaseKind(ResourceKind):
    kind = "lease"

    def roots(self, tx, now):
        rows = tx.execute("SELECT namespace, id, labels FROM leases").fetchall()
        for row in rows:
            labels = json.loads(row["labels"])
            if _expired(labels, now / 1e9):
                continue
            ns, flat = row["namespace"], FLAT_LABEL in labels
            yield Node("lease", ns, row["id"])
            resources = tx.execute(
                "SELECT type, id FROM lease_resources WHERE namespace = ? AND lease = ?",
                (ns, row["id"]),
            ).fetchall()
            for res in resources:
                if res["type"] == CONTENT:
                    yield Node("content", ns, res["id"], flat)
                elif res["type"] == INGESTS:
                    yield Node("ingest", ns, res["id"])
                elif res["type"].startswith(SNAPSHOTS + "/"):
                    snapshotter = res["type"].split("/", 1)[1]
                    yield Node("snapshot", ns, f"{snapshotter}/{res['id']}", flat)

    def candidates(self, tx):
        for row in tx.execute("SELECT namespace, id FROM leases").fetchall():
            yield Node("lease", row["namespace"], row["id"])

    def remove(self, tx, node):
        tx.execute("DELETE FROM leases WHERE namespace = ? AND id = ?", (node.namespace, node.key))


class ImageKind(ResourceKind):
    kind = "image"

    def roots(self, tx, now):
        for row in tx.execute("SELECT namespace, digest, labels FROM images").fetchall():
            yield Node("content", row["namespace"], row["digest"])
            yield from label_refs(row["namespace"], json.loads(row["labels"]))


class ContainerKind(ResourceKind):
    """Containers are never collected; each keeps its snapshot and label refs alive."""

    kind = "container"

    def roots(self, tx, now):
        exists = tx.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'containers'"
        ).fetchone()
        if not exists:
            return
        rows = tx.execute(
            "SELECT namespace, id, labels, snapshotter, snapshot_key FROM containers"
        ).fetchall()
        for row in rows:
            ns = row["namespace"]
            if row["snapshotter"] and row["snapshot_key"]:
                yield Node("snapshot", ns, f"{row['snapshotter']}/{row['snapshot_key']}")
            yield from label_refs(ns, json.loads(row["labels"]))


class ContentKind(ResourceKind):
    kind = "content"

    def __init__(self, store):
        self.store = store
        self._children: dict[str, tuple[str, ...]] = {}  # blobs are immutable: cache forever

    def roots(self, tx, now):
        rows = tx.execute(
            "SELECT namespace, digest FROM content_blobs WHERE labels LIKE ?",
            (f'%"{ROOT_LABEL}"%',),
        ).fetchall()
        for row in rows:
            yield Node("content", row["namespace"], row["digest"])

    def references(self, tx, node):
        row = tx.execute(
            "SELECT size, labels FROM content_blobs WHERE namespace = ? AND digest = ?",
            (node.namespace, node.key),
        ).fetchone()
        if row is None:
            return
        refs = list(label_refs(node.namespace, json.loads(row["labels"])))
        yield from refs
        if any(ref.kind == "content" for ref in refs):
            return  # the client labelled the children: its labels rule, as in containerd
        for digest in self._json_children(node.key, row["size"]):
            yield Node("content", node.namespace, digest)

    def _json_children(self, digest: str, size: int) -> tuple[str, ...]:
        cached = self._children.get(digest)
        if cached is not None:
            return cached
        children: tuple[str, ...] = ()
        if size <= MAX_JSON:
            try:
                with open(self.store._disk_path(digest), "rb") as f:
                    data = f.read(MAX_JSON + 1)
                if data[:1] == b"{":
                    children = _descriptor_digests(json.loads(data))
            except (OSError, ValueError, UnicodeDecodeError):
                children = ()
        self._children[digest] = children
        return children

    def candidates(self, tx):
        for row in tx.execute("SELECT namespace, digest FROM content_blobs").fetchall():
            yield Node("content", row["namespace"], row["digest"])

    def remove(self, tx, node):
        tx.execute(
            "DELETE FROM content_blobs WHERE namespace = ? AND digest = ?", (node.namespace, node.key)
        )

    def sweep(self, tx):
        return self.store.sweep_disk(tx)


def _descriptor_digests(doc) -> tuple[str, ...]:
    """Digests of the descriptors an OCI/Docker index or manifest names."""
    if not isinstance(doc, dict):
        return ()
    found: list[str] = []
    candidates = []
    for key in ("manifests", "layers", "blobs"):
        if isinstance(doc.get(key), list):
            candidates.extend(doc[key])
    for key in ("config", "subject"):
        candidates.append(doc.get(key))
    for desc in candidates:
        if isinstance(desc, dict) and isinstance(desc.get("digest"), str):
            found.append(desc["digest"])
    return tuple(found)


class IngestKind(ResourceKind):
    kind = "ingest"

    def __init__(self, store):
        self.store = store

    def roots(self, tx, now):
        """Unleased ingests live until they expire; leased ones (no expiry) only through
        their lease; one a writer holds open always lives."""
        rows = tx.execute("SELECT namespace, ref, bref, expires_at FROM content_ingests").fetchall()
        for row in rows:
            expires = row["expires_at"]
            if (expires is not None and expires > now) or self.store.is_locked(row["bref"]):
                yield Node("ingest", row["namespace"], row["ref"])

    def references(self, tx, node):
        row = tx.execute(
            "SELECT expected FROM content_ingests WHERE namespace = ? AND ref = ?",
            (node.namespace, node.key),
        ).fetchone()
        if row is not None and row["expected"]:
            yield Node("content", node.namespace, row["expected"])

    def candidates(self, tx):
        for row in tx.execute("SELECT namespace, ref FROM content_ingests").fetchall():
            yield Node("ingest", row["namespace"], row["ref"])

    def remove(self, tx, node):
        tx.execute(
            "DELETE FROM content_ingests WHERE namespace = ? AND ref = ?", (node.namespace, node.key)
        )


class GarbageCollector:
    """Runs collections on demand (`collect`) and soon after deletions (`schedule`)."""

    def __init__(self, db: Database, content=None):
        self.db = db
        self.kinds: dict[str, ResourceKind] = {}
        self._run_lock = threading.Lock()
        self._wake = threading.Condition()
        self._pending = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self.last: CollectResult | None = None
        self.register(LeaseKind())
        self.register(ImageKind())
        self.register(ContainerKind())
        if content is not None:
            self.register(ContentKind(content))
            self.register(IngestKind(content))

    def register(self, kind: ResourceKind) -> None:
        """Add a kind of root source or collectable object; see the module docstring."""
        self.kinds[kind.kind] = kind

    def collect(self) -> CollectResult:
        """One full mark and sweep, in one metadata transaction. Returns what went."""
        with self._run_lock:
            started = time.monotonic()
            result = CollectResult()
            with self.db.transaction() as tx:
                live = self._mark(tx)
                for kind in list(self.kinds.values()):
                    self._sweep_kind(tx, kind, live, result)
                for kind in list(self.kinds.values()):
                    try:
                        result.swept.extend(kind.sweep(tx))
                    except Exception as exc:  # noqa: BLE001 - one failure must not stop GC
                        log.exception("gc: sweeping %s storage failed", kind.kind)
                        result.errors.append(f"{kind.kind} sweep: {exc}")
            result.duration = time.monotonic() - started
            if result.removed or result.swept:
                log.info(
                    "gc: removed %d objects, released %d files in %.3fs",
                    len(result.removed), len(result.swept), result.duration,
                )
            self.last = result
            return result

    def _mark(self, tx: sqlite3.Connection) -> set[Node]:
        now = now_ns()
        pending: list[Node] = []
        for kind in list(self.kinds.values()):
            try:
                pending.extend(kind.roots(tx, now))
            except Exception as exc:  # noqa: BLE001
                # Without a complete root set nothing may be swept: fail the whole run.
                raise RuntimeError(f"gc: scanning {kind.kind} roots failed: {exc}") from exc
        seen: set[Node] = set()
        while pending:
            node = pending.pop()
            if node in seen:
                continue
            seen.add(node)
            if node.flat:
                continue
            kind = self.kinds.get(node.kind)
            if kind is not None:
                pending.extend(kind.references(tx, node))
        return {Node(n.kind, n.namespace, n.key) for n in seen}

    def _sweep_kind(self, tx, kind: ResourceKind, live: set[Node], result: CollectResult) -> None:
        for node in list(kind.candidates(tx)):
            if node in live:
                continue
            tx.execute("SAVEPOINT gc_remove")
            try:
                kind.remove(tx, node)
            except Exception as exc:  # noqa: BLE001
                tx.execute("ROLLBACK TO gc_remove")
                log.warning("gc: removing %s failed: %s", node, exc)
                result.errors.append(f"{node}: {exc}")
            else:
                result.removed.append(node)
            finally:
                tx.execute("RELEASE gc_remove")

    async def collect_async(self) -> CollectResult:
        import asyncio

        return await asyncio.to_thread(self.collect)

    async def start(self) -> None:
        """A first collection before the daemon serves: repairs what a crash left behind
        (unreferenced blob files, ingest directories, expired leases). Done before serving
        so it cannot race a client's first unleased write."""
        try:
            await self.collect_async()
        except Exception:  # noqa: BLE001 - a failed repair must not keep the daemon down
            log.exception("gc: collection at start failed")

    def schedule(self) -> None:
        """Ask for a collection soon (after a short delay that coalesces bursts of
        deletes); returns at once. Safe from any thread."""
        with self._wake:
            if self._closed:
                return
            self._pending = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="runtimed-gc", daemon=True)
                self._thread.start()
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
            time.sleep(SCHEDULE_DELAY)
            with self._wake:
                self._pending = False
            try:
                self.collect()
            except Exception:  # noqa: BLE001
                log.exception("gc: scheduled collection failed")

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
