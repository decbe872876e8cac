"""containerd namespaces: tenants that every other object lives in.

A namespace exists once created explicitly or once the first object is created in it
(`ensure`, inside that object's transaction). It can be deleted only when empty: each
store that keeps objects per namespace registers a query that finds one of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from runtimed import identifiers
from runtimed.errors import AlreadyExists, FailedPrecondition, NotFound
from runtimed.metadata import labels as label_rules
from runtimed.metadata.db import Database, now_ns

SCHEMA = [
    """
    CREATE TABLE namespaces (
        name TEXT PRIMARY KEY,
        labels TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    )
    """,
]


@dataclass
class Namespace:
    name: str
    labels: dict[str, str] = field(default_factory=dict)


class NamespaceStore:
    def __init__(self, db: Database, exchange):
        self.db = db
        self.exchange = exchange
        self._usage: dict[str, str] = {}
        db.migrate("namespaces", SCHEMA)

    def register_usage(self, kind: str, query: str) -> None:
        """`query` takes the namespace as its one parameter and returns a row when any
        object of `kind` still lives there (used to refuse deleting a non-empty one)."""
        self._usage[kind] = query

    def ensure(self, tx, name: str) -> None:
        identifiers.validate(name, "namespace")
        now = now_ns()
        tx.execute(
            "INSERT OR IGNORE INTO namespaces (name, created_at, updated_at) VALUES (?, ?, ?)",
            (name, now, now),
        )

    def get(self, name: str) -> Namespace:
        with self.db.read() as conn:
            row = conn.execute("SELECT * FROM namespaces WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"namespace {name!r} not found")
        return Namespace(row["name"], json.loads(row["labels"]))

    def list(self) -> list[Namespace]:
        with self.db.read() as conn:
            rows = conn.execute("SELECT * FROM namespaces ORDER BY name").fetchall()
        return [Namespace(r["name"], json.loads(r["labels"])) for r in rows]

    def create(self, name: str, labels: dict[str, str]) -> Namespace:
        identifiers.validate(name, "namespace")
        label_rules.validate(labels)
        now = now_ns()
        with self.db.transaction() as tx:
            if tx.execute("SELECT 1 FROM namespaces WHERE name = ?", (name,)).fetchone():
                raise AlreadyExists(f"namespace {name!r} already exists")
            tx.execute(
                "INSERT INTO namespaces (name, labels, created_at, updated_at) VALUES (?, ?, ?, ?)",
                (name, json.dumps(labels), now, now),
            )
        self._publish("/namespaces/create", "NamespaceCreate", name, labels)
        return Namespace(name, labels)

    def update(self, name: str, labels: dict[str, str], paths: list[str]) -> Namespace:
        for path in paths:
            if path != "labels" and not path.startswith("labels."):
                raise FailedPrecondition(f"cannot update {path!r} field on namespace {name!r}")
        with self.db.transaction() as tx:
            current = self.get(name)
            merged = label_rules.apply_update(current.labels, labels, paths)
            tx.execute(
                "UPDATE namespaces SET labels = ?, updated_at = ? WHERE name = ?",
                (json.dumps(merged), now_ns(), name),
            )
        self._publish("/namespaces/update", "NamespaceUpdate", name, merged)
        return Namespace(name, merged)

    def delete(self, name: str) -> None:
        with self.db.transaction() as tx:
            if not tx.execute("SELECT 1 FROM namespaces WHERE name = ?", (name,)).fetchone():
                raise NotFound(f"namespace {name!r} not found")
            used = [kind for kind, query in sorted(self._usage.items())
                    if tx.execute(query, (name,)).fetchone()]
            if used:
                raise FailedPrecondition(
                    f"namespace {name!r} must be empty, but it still has {', '.join(used)}"
                )
            tx.execute("DELETE FROM namespaces WHERE name = ?", (name,))
        self._publish("/namespaces/delete", "NamespaceDelete", name, None)

    def _publish(self, topic: str, message: str, name: str, labels: dict | None) -> None:
        from runtimed.api.containerd.events import namespace_pb2

        event = getattr(namespace_pb2, message)(name=name)
        if labels is not None:
            event.labels.update(labels)
        self.exchange.publish(name, topic, event)
