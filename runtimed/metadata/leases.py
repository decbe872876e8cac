"""Leases: client-held references that keep objects alive while a client works with them.

A client pulling an image writes blobs and snapshots before any image record names
them; a lease (metadata key `containerd-lease`) keeps them from the garbage collector
until the client deletes the lease or its `containerd.io/gc.expire` time (RFC 3339) has
passed. Resources are typed as containerd types them: `content` (a digest), `ingests`
(a write ref) and `snapshots/<snapshotter>` (a snapshot key).
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field

from runtimed.content import digests
from runtimed.errors import AlreadyExists, InvalidArgument, NotFound, Unimplemented
from runtimed.filters import labels_lookup, parse
from runtimed.metadata import labels as labelutil
from runtimed.metadata.db import Database, now_ns

EXPIRE_LABEL = "containerd.io/gc.expire"
FLAT_LABEL = "containerd.io/gc.flat"

CONTENT = "content"
INGESTS = "ingests"
SNAPSHOTS = "snapshots"

MIGRATIONS = [
    """
    CREATE TABLE leases (
        namespace TEXT NOT NULL,
        id TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        PRIMARY KEY (namespace, id)
    );
    CREATE TABLE lease_resources (
        namespace TEXT NOT NULL,
        lease TEXT NOT NULL,
        type TEXT NOT NULL,
        id TEXT NOT NULL,
        PRIMARY KEY (namespace, lease, type, id),
        FOREIGN KEY (namespace, lease) REFERENCES leases (namespace, id) ON DELETE CASCADE
    );
    """,
]


@dataclass
class Lease:
    id: str
    created_at: int = 0
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Resource:
    id: str
    type: str


def random_id() -> str:
    """containerd's shape for generated lease ids: `<nanoseconds>-<4 url-safe chars>`."""
    return f"{time.time_ns() % 1_000_000_000}-{base64.urlsafe_b64encode(os.urandom(3)).decode()}"


def normalize_resource(resource: Resource) -> Resource:
    """Check the resource type as containerd does; digests of content are validated."""
    parts = resource.type.split("/")
    if parts[0] in (CONTENT, INGESTS):
        if len(parts) != 1:
            raise InvalidArgument(f"invalid resource type {resource.type!r}")
        if parts[0] == CONTENT:
            digests.validate(resource.id)
    elif parts[0] == SNAPSHOTS:
        if len(parts) != 2 or not parts[1]:
            raise InvalidArgument(
                f"invalid snapshot resource type {resource.type!r}: want snapshots/<snapshotter>"
            )
    else:
        raise Unimplemented(f"resource type {resource.type!r} not supported")
    if not resource.id:
        raise InvalidArgument("resource id must not be empty")
    return resource


class LeaseStore:
    def __init__(self, db: Database, namespaces=None, gc=None):
        self.db = db
        self.namespaces = namespaces
        self.gc = gc  # set by the daemon once the collector exists
        db.migrate("leases", MIGRATIONS)

    def create(self, ns: str, lease_id: str | None = None, labels: dict[str, str] | None = None) -> Lease:
        # containerd takes any non-empty lease id (its clients generate ids like
        # "123-_Xv7" that identifier rules would refuse), so only emptiness is replaced.
        lease = Lease(
            lease_id or random_id(),
            now_ns(),
            labelutil.validate(dict(labels or {})),
        )
        with self.db.transaction() as tx:
            if self.namespaces is not None:
                self.namespaces.ensure(tx, ns)
            try:
                tx.execute(
                    "INSERT INTO leases (namespace, id, created_at, labels) VALUES (?, ?, ?, ?)",
                    (ns, lease.id, lease.created_at, json.dumps(lease.labels)),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"lease {lease.id!r} already exists in namespace {ns!r}") from None
        return lease

    def get(self, ns: str, lease_id: str) -> Lease:
        with self.db.read() as conn:
            row = conn.execute(
                "SELECT id, created_at, labels FROM leases WHERE namespace = ? AND id = ?",
                (ns, lease_id),
            ).fetchone()
        if row is None:
            raise NotFound(f"lease {lease_id!r} not found in namespace {ns!r}")
        return Lease(row["id"], row["created_at"], json.loads(row["labels"]))

    def delete(self, ns: str, lease_id: str) -> None:
        """Drop the lease; what it alone kept alive goes at the next collection."""
        with self.db.transaction() as tx:
            cur = tx.execute("DELETE FROM leases WHERE namespace = ? AND id = ?", (ns, lease_id))
            if cur.rowcount == 0:
                raise NotFound(f"lease {lease_id!r} not found in namespace {ns!r}")
        if self.gc is not None:
            self.gc.schedule()

    def list(self, ns: str, filters: list[str] | None = None) -> list[Lease]:
        match = parse(filters)
        with self.db.read() as conn:
            rows = conn.execute(
                "SELECT id, created_at, labels FROM leases WHERE namespace = ? ORDER BY id", (ns,)
            ).fetchall()
        leases = [Lease(r["id"], r["created_at"], json.loads(r["labels"])) for r in rows]
        return [
            lease for lease in leases if match.match(labels_lookup({"id": lease.id}, lease.labels))
        ]

    def add_resource(self, ns: str, lease_id: str, resource: Resource) -> None:
        resource = normalize_resource(resource)
        with self.db.transaction() as tx:
            self.add_resource_tx(tx, ns, lease_id, resource.type, resource.id)

    def delete_resource(self, ns: str, lease_id: str, resource: Resource) -> None:
        resource = normalize_resource(resource)
        with self.db.transaction() as tx:
            self._require(tx, ns, lease_id)
            self.remove_resource_tx(tx, ns, lease_id, resource.type, resource.id)
        if self.gc is not None:
            self.gc.schedule()

    def list_resources(self, ns: str, lease_id: str) -> list[Resource]:
        with self.db.read() as conn:
            self._require(conn, ns, lease_id)
            rows = conn.execute(
                "SELECT type, id FROM lease_resources WHERE namespace = ? AND lease = ? "
                "ORDER BY type, id",
                (ns, lease_id),
            ).fetchall()
        return [Resource(r["id"], r["type"]) for r in rows]

    # Used by other stores inside their own transactions.

    def add_resource_tx(self, tx: sqlite3.Connection, ns: str, lease_id: str | None, type_: str, id_: str) -> None:
        """Record that `lease_id` protects the resource; no-op without a lease."""
        if not lease_id:
            return
        self._require(tx, ns, lease_id)
        tx.execute(
            "INSERT OR IGNORE INTO lease_resources (namespace, lease, type, id) VALUES (?, ?, ?, ?)",
            (ns, lease_id, type_, id_),
        )

    def remove_resource_tx(self, tx: sqlite3.Connection, ns: str, lease_id: str | None, type_: str, id_: str) -> None:
        if not lease_id:
            return
        tx.execute(
            "DELETE FROM lease_resources WHERE namespace = ? AND lease = ? AND type = ? AND id = ?",
            (ns, lease_id, type_, id_),
        )

    @staticmethod
    def _require(conn: sqlite3.Connection, ns: str, lease_id: str) -> None:
        row = conn.execute(
            "SELECT 1 FROM leases WHERE namespace = ? AND id = ?", (ns, lease_id)
        ).fetchone()
        if row is None:
            raise NotFound(f"lease {lease_id!r} does not exist in namespace {ns!r}")
