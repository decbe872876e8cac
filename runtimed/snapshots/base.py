"""The snapshotter interface and the metadata every implementation shares.

A snapshot is a directory tree identified, per containerd namespace, by a key. Active
snapshots are writable and become committed snapshots (named, for image layers, by chain
ID) with `commit`; views are read-only. A snapshot's parent must be committed, so the
committed snapshots of a namespace form a forest.

Metadata lives in the daemon's sqlite database (one `snapshots` table for every
snapshotter, keyed by snapshotter, namespace and key); the file trees live in
`<root>/snapshots/<snapshotter>/snapshots/<id>/`, named by a numeric id that never
changes across commit, so mounts handed out for an active snapshot stay valid after it is
committed. An implementation only creates, mounts, measures and removes those trees.

Crash safety: a tree is built under a temporary name, then renamed to its id inside the
metadata transaction that records it; removal deletes the record first, renames the tree
to `rm-<id>` and deletes it on a background thread (the caller does not wait for a large
tree to go). Trees without a record are what `cleanup` (and start-up) removes.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from runtimed.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from runtimed.metadata import labels as labelutil
from runtimed.metadata.db import Database, now_ns
from runtimed.snapshots.mount import Mount

MIGRATIONS = [
    """
    CREATE TABLE snapshots (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        snapshotter TEXT NOT NULL,
        namespace TEXT NOT NULL,
        key TEXT NOT NULL,
        kind INTEGER NOT NULL,
        parent_id INTEGER REFERENCES snapshots(id),
        labels TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        size INTEGER NOT NULL DEFAULT 0,
        inodes INTEGER NOT NULL DEFAULT 0,
        UNIQUE (snapshotter, namespace, key)
    );
    CREATE INDEX snapshots_parent ON snapshots(parent_id)
    """,
]

log = logging.getLogger("runtimed.snapshots")

# a label clients set on snapshots to find them by content (containerd's snapshot.ref)
SNAPSHOT_REF_LABEL = "containerd.io/snapshot.ref"


class Kind(enum.IntEnum):
    """containerd's snapshot kinds, with the wire enum values."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass
class Info:
    name: str
    kind: Kind
    parent: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    created_at: int = 0
    updated_at: int = 0


@dataclass
class Usage:
    size: int = 0
    inodes: int = 0


@dataclass
class _Row:
    id: int
    info: Info
    parent_id: int | None
    usage: Usage


def disk_usage(path: str | os.PathLike) -> Usage:
    """Bytes allocated and inodes under `path`, each hard-linked inode counted once."""
    seen: set[tuple[int, int]] = set()
    size = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames, None]:
            full = dirpath if name is None else os.path.join(dirpath, name)
            if name is not None and name in dirnames:
                continue  # counted when walked into
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            ident = (st.st_dev, st.st_ino)
            if ident in seen:
                continue
            seen.add(ident)
            size += st.st_blocks * 512
    return Usage(size=size, inodes=len(seen))


EventPublisher = Callable[[str, str, dict], None]


class Snapshotter(ABC):
    """Metadata and lifecycle shared by the implementations; subclasses manage trees."""

    name: str = ""

    def __init__(self, root: str | os.PathLike, db: Database,
                 publish: EventPublisher | None = None, leases=None, namespaces=None):
        """`leases` (a LeaseStore) records snapshots made under a lease; `namespaces`
        (a NamespaceStore) creates the namespace implicitly; `gc` (set later by the daemon)
        is scheduled after removals, as containerd collects after deletes."""
        self.root = Path(root)
        self.db = db
        self.publish = publish
        self.leases = leases
        self.namespaces = namespaces
        self.gc = None
        self.snapshots_dir = self.root / "snapshots"
        self.snapshots_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        db.migrate("snapshots", MIGRATIONS)
        self._lock = threading.Lock()
        self._building: set[str] = set()
        self._purger: threading.Thread | None = None
        self._purge_again = False

    # -- what an implementation provides ------------------------------------------------

    @abstractmethod
    def _build(self, tmp: Path, parent_ids: list[int], kind: Kind) -> None:
        """Create the tree of a new snapshot in `tmp` (parents are nearest first)."""

    @abstractmethod
    def _mounts(self, id: int, parent_ids: list[int], kind: Kind) -> list[Mount]:
        """How to mount snapshot `id` (an active or view snapshot)."""

    @abstractmethod
    def _usage(self, id: int) -> Usage:
        """What snapshot `id` adds on top of its parent."""

    def path(self, id: int) -> Path:
        return self.snapshots_dir / str(id)

    # -- the interface ------------------------------------------------------------------

    def prepare(self, ns: str, key: str, parent: str = "",
                labels: dict[str, str] | None = None, lease: str | None = None) -> list[Mount]:
        return self._create(ns, key, parent, labels or {}, Kind.ACTIVE, lease)

    def view(self, ns: str, key: str, parent: str = "",
             labels: dict[str, str] | None = None, lease: str | None = None) -> list[Mount]:
        return self._create(ns, key, parent, labels or {}, Kind.VIEW, lease)

    def mounts(self, ns: str, key: str) -> list[Mount]:
        with self.db.read() as conn:
            row = self._get(conn, ns, key)
            if row.info.kind == Kind.COMMITTED:
                raise FailedPrecondition(
                    f"snapshot {key!r} is committed: mount it through a view or an active "
                    "snapshot on top of it"
                )
            parents = self._parent_ids(conn, row.parent_id)
        return self._mounts(row.id, parents, row.info.kind)

    def commit(self, ns: str, name: str, key: str,
               labels: dict[str, str] | None = None, lease: str | None = None) -> Info:
        _check_key(name, "snapshot name")
        with self.db.read() as conn:
            row = self._get(conn, ns, key)
        if row.info.kind != Kind.ACTIVE:
            raise FailedPrecondition(
                f"snapshot {key!r} is a {row.info.kind.name.lower()} snapshot: only active "
                "snapshots can be committed"
            )
        usage = self._usage(row.id)
        now = now_ns()
        new_labels = labelutil.validate(dict(labels or {}))
        with self.db.transaction() as tx:
            current = self._get(tx, ns, key)
            if current.id != row.id or current.info.kind != Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {key!r} changed while being committed")
            if self._find(tx, ns, name) is not None:
                raise AlreadyExists(f"snapshot {name!r} already exists")
            tx.execute(
                "UPDATE snapshots SET key = ?, kind = ?, labels = ?, created_at = ?, "
                "updated_at = ?, size = ?, inodes = ? WHERE id = ?",
                (name, int(Kind.COMMITTED), json.dumps(new_labels), now, now,
                 usage.size, usage.inodes, row.id),
            )
            self._lease(tx, ns, lease, name)
        self._event(ns, "/snapshot/commit", key=key, name=name)
        return Info(name=name, kind=Kind.COMMITTED, parent=row.info.parent,
                    labels=new_labels, created_at=now, updated_at=now)

    def remove(self, ns: str, key: str) -> None:
        with self.db.transaction() as tx:
            row = self._get(tx, ns, key)
            child = tx.execute(
                "SELECT key, namespace FROM snapshots WHERE parent_id = ? LIMIT 1", (row.id,)
            ).fetchone()
            if child is not None:
                raise FailedPrecondition(
                    f"snapshot {key!r} has children (e.g. {child['key']!r}): remove them first"
                )
            tx.execute("DELETE FROM snapshots WHERE id = ?", (row.id,))
        self._detach(self.path(row.id))
        self._event(ns, "/snapshot/remove", key=key)
        if self.gc is not None:
            self.gc.schedule()

    def stat(self, ns: str, key: str) -> Info:
        with self.db.read() as conn:
            return self._get(conn, ns, key).info

    def update(self, ns: str, info: Info, fieldpaths: list[str] | None = None) -> Info:
        """Update labels (the only mutable field); `labels.<key>` paths merge one key.
        The kind and parent in `info` are ignored, as containerd does: its Go client sends
        an unset kind as "committed"."""
        paths = list(fieldpaths or [])
        for p in paths:
            if p != "labels" and not p.startswith("labels."):
                raise InvalidArgument(f"cannot update {p!r} of snapshot {info.name!r}: only labels")
        with self.db.transaction() as tx:
            row = self._get(tx, ns, info.name)
            new = labelutil.apply_update(row.info.labels, dict(info.labels), paths)
            now = now_ns()
            tx.execute(
                "UPDATE snapshots SET labels = ?, updated_at = ? WHERE id = ?",
                (json.dumps(new), now, row.id),
            )
        row.info.labels = new
        row.info.updated_at = now
        return row.info

    def walk(self, ns: str) -> Iterator[Info]:
        """Every snapshot of the namespace (a snapshot list, taken at call time)."""
        with self.db.read() as conn:
            rows = conn.execute(
                "SELECT s.*, p.key AS parent_key FROM snapshots s "
                "LEFT JOIN snapshots p ON s.parent_id = p.id "
                "WHERE s.snapshotter = ? AND s.namespace = ? ORDER BY s.key",
                (self.name, ns),
            ).fetchall()
        for r in rows:
            yield _row(r).info

    def usage(self, ns: str, key: str) -> Usage:
        with self.db.read() as conn:
            row = self._get(conn, ns, key)
        if row.info.kind == Kind.COMMITTED:
            return row.usage
        return self._usage(row.id)

    def cleanup(self) -> list[str]:
        """Remove trees that no snapshot record names (left by crashes or removals)."""
        removed = self.detach_orphans()
        self.purge()
        return removed

    def detach_orphans(self) -> list[str]:
        """Rename trees without a record to `rm-*` (quick: the garbage collector calls
        this under the metadata lock); `purge` deletes them afterwards."""
        # the database lock is held across a create's rename and commit, so a listing
        # taken under it never sees a tree whose record is not yet visible
        with self.db.read() as conn:
            entries = sorted(os.listdir(self.snapshots_dir))
            ids = {str(r[0]) for r in conn.execute(
                "SELECT id FROM snapshots WHERE snapshotter = ?", (self.name,))}
            with self._lock:
                busy = set(self._building)
        removed = []
        for entry in entries:
            if entry in ids or entry in busy or entry.startswith("rm-"):
                continue
            path = self.snapshots_dir / entry
            try:
                os.rename(path, self.snapshots_dir / f"rm-{entry}")
            except FileNotFoundError:
                continue
            removed.append(str(path))
        return removed

    def purge(self) -> None:
        for entry in os.listdir(self.snapshots_dir):
            if entry.startswith("rm-"):
                self._discard(self.snapshots_dir / entry)

    def _detach(self, path: Path) -> None:
        """Rename a tree whose record is gone to `rm-*` and have it deleted soon."""
        try:
            os.rename(path, path.with_name("rm-" + path.name))
        except FileNotFoundError:
            return  # detached by a concurrent cleanup
        with self._lock:
            self._purge_again = True
            if self._purger is None:
                self._purger = threading.Thread(target=self._purge_loop, daemon=True,
                                                name=f"{self.name}-purge")
                self._purger.start()

    def _purge_loop(self) -> None:
        while True:
            with self._lock:
                if not self._purge_again:
                    self._purger = None
                    return
                self._purge_again = False
            try:
                self.purge()
            except OSError:
                log.exception("removing detached trees of %s", self.name)

    def namespaces_keys(self) -> list[tuple[str, str, int]]:
        """(namespace, key, id) of every snapshot: for the garbage collector."""
        with self.db.read() as conn:
            return [(r[0], r[1], r[2]) for r in conn.execute(
                "SELECT namespace, key, id FROM snapshots WHERE snapshotter = ?", (self.name,))]

    # -- internals ----------------------------------------------------------------------

    def _create(self, ns: str, key: str, parent: str, labels: dict[str, str],
                kind: Kind, lease: str | None = None) -> list[Mount]:
        _check_key(key, "snapshot key")
        labelutil.validate(labels)
        with self.db.read() as conn:
            if self._find(conn, ns, key) is not None:
                raise AlreadyExists(f"snapshot {key!r} already exists")
            parent_row = None
            if parent:
                parent_row = self._get(conn, ns, parent, what="parent snapshot")
                if parent_row.info.kind != Kind.COMMITTED:
                    raise FailedPrecondition(
                        f"parent {parent!r} is not committed: only committed snapshots "
                        "can be parents"
                    )
            parent_ids = self._parent_ids(conn, parent_row.id if parent_row else None)
        with self._lock:
            tmp = Path(tempfile.mkdtemp(prefix="new-", dir=self.snapshots_dir))
            self._building.add(tmp.name)
        try:
            self._build(tmp, parent_ids, kind)
            now = now_ns()
            with self.db.transaction() as tx:
                if self._find(tx, ns, key) is not None:
                    raise AlreadyExists(f"snapshot {key!r} already exists")
                if parent_row is not None:
                    again = self._find(tx, ns, parent)
                    if again is None or again.id != parent_row.id:
                        raise NotFound(f"parent snapshot {parent!r} was removed")
                cur = tx.execute(
                    "INSERT INTO snapshots (snapshotter, namespace, key, kind, parent_id, labels, "
                    "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (self.name, ns, key, int(kind), parent_row.id if parent_row else None,
                     json.dumps(labels), now, now),
                )
                id = cur.lastrowid
                self._lease(tx, ns, lease, key)
                if self.namespaces is not None:
                    self.namespaces.ensure(tx, ns)
                os.rename(tmp, self.path(id))
        except BaseException:
            self._discard(tmp)
            raise
        finally:
            with self._lock:
                self._building.discard(tmp.name)
        self._event(ns, "/snapshot/prepare", key=key, parent=parent)
        return self._mounts(id, parent_ids, kind)

    def _lease(self, tx: sqlite3.Connection, ns: str, lease: str | None, key: str) -> None:
        if lease and self.leases is not None:
            self.leases.add_resource_tx(tx, ns, lease, f"snapshots/{self.name}", key)

    def _find(self, conn: sqlite3.Connection, ns: str, key: str) -> _Row | None:
        r = conn.execute(
            "SELECT s.*, p.key AS parent_key FROM snapshots s "
            "LEFT JOIN snapshots p ON s.parent_id = p.id "
            "WHERE s.snapshotter = ? AND s.namespace = ? AND s.key = ?",
            (self.name, ns, key),
        ).fetchone()
        return _row(r) if r else None

    def _get(self, conn: sqlite3.Connection, ns: str, key: str, what: str = "snapshot") -> _Row:
        if not key:
            raise InvalidArgument(f"{what} key must not be empty")
        row = self._find(conn, ns, key)
        if row is None:
            raise NotFound(f"{what} {key!r} does not exist in namespace {ns!r} "
                           f"(snapshotter {self.name})")
        return row

    def _parent_ids(self, conn: sqlite3.Connection, id: int | None) -> list[int]:
        ids = []
        while id is not None:
            ids.append(id)
            r = conn.execute("SELECT parent_id FROM snapshots WHERE id = ?", (id,)).fetchone()
            id = r[0] if r else None
        return ids

    def _discard(self, path: Path) -> None:
        """Remove a tree, first renaming it so a crash midway leaves no half snapshot."""
        doomed = path
        try:
            if not path.name.startswith("rm-"):
                doomed = path.with_name("rm-" + path.name)
                os.rename(path, doomed)
            shutil.rmtree(doomed)
        except FileNotFoundError:
            pass  # removed concurrently (cleanup racing a remove)

    def _event(self, ns: str, topic: str, **fields: str) -> None:
        if self.publish is not None:
            self.publish(ns, topic, fields)


def _check_key(key: str, what: str) -> None:
    if not key:
        raise InvalidArgument(f"{what} must not be empty")
    if len(key) > 4096 or "\x00" in key:
        raise InvalidArgument(f"{what} {key[:64]!r}...: too long or contains a NUL byte")


def _row(r: sqlite3.Row) -> _Row:
    info = Info(
        name=r["key"],
        kind=Kind(r["kind"]),
        parent=r["parent_key"] or "",
        labels=json.loads(r["labels"]),
        created_at=r["created_at"],
        updated_at=r["updated_at"],
    )
    return _Row(id=r["id"], info=info, parent_id=r["parent_id"],
                usage=Usage(size=r["size"], inodes=r["inodes"]))
