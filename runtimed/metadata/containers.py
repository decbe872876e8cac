"""Container records: the metadata a task is created from, nothing that runs.

A container names its runtime, its OCI spec (kept verbatim as type URL + bytes, as
clients sent it), and the snapshot that is its root filesystem. Fields follow
containerd's rules: runtime name and snapshotter are immutable, and an update names the
fields it changes (`labels`, `labels.<key>`, `spec`, `extensions`, `extensions.<key>`,
`image`, `snapshotkey`).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field, replace

from runtimed import identifiers
from runtimed.errors import AlreadyExists, InvalidArgument, NotFound
from runtimed.filters import parse
from runtimed.metadata import labels as label_rules
from runtimed.metadata.db import Database, now_ns

SCHEMA = [
    """
    CREATE TABLE containers (
        namespace TEXT NOT NULL REFERENCES namespaces(name),
        id TEXT NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        image TEXT NOT NULL DEFAULT '',
        runtime_name TEXT NOT NULL,
        runtime_options_type TEXT NOT NULL DEFAULT '',
        runtime_options BLOB NOT NULL DEFAULT x'',
        spec_type TEXT NOT NULL,
        spec BLOB NOT NULL,
        snapshotter TEXT NOT NULL DEFAULT '',
        snapshot_key TEXT NOT NULL DEFAULT '',
        extensions TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, id)
    )
    """,
]


@dataclass(frozen=True)
class AnyValue:
    """A google.protobuf.Any kept as its parts, so no type registry is needed to store it."""

    type_url: str = ""
    value: bytes = b""


@dataclass(frozen=True)
class Container:
    id: str
    runtime_name: str
    spec: AnyValue
    labels: dict[str, str] = field(default_factory=dict)
    image: str = ""
    runtime_options: AnyValue | None = None
    snapshotter: str = ""
    snapshot_key: str = ""
    extensions: dict[str, AnyValue] = field(default_factory=dict)
    created_at: int = 0
    updated_at: int = 0


UPDATABLE = {"labels", "spec", "extensions", "image", "snapshotkey"}


def _validate(c: Container) -> None:
    identifiers.validate(c.id, "container id")
    label_rules.validate(c.labels)
    if "" in c.extensions:
        raise InvalidArgument("container extension keys must not be empty")
    if not c.runtime_name:
        raise InvalidArgument(f"container {c.id!r}: runtime name must be set")
    if not c.spec.type_url:
        raise InvalidArgument(f"container {c.id!r}: spec must be set")
    if c.snapshot_key and not c.snapshotter:
        raise InvalidArgument(f"container {c.id!r}: snapshotter must be set with a snapshot key")


def _row_to_container(row) -> Container:
    options = None
    if row["runtime_options_type"]:
        options = AnyValue(row["runtime_options_type"], bytes(row["runtime_options"]))
    return Container(
        id=row["id"],
        runtime_name=row["runtime_name"],
        spec=AnyValue(row["spec_type"], bytes(row["spec"])),
        labels=json.loads(row["labels"]),
        image=row["image"],
        runtime_options=options,
        snapshotter=row["snapshotter"],
        snapshot_key=row["snapshot_key"],
        extensions={
            k: AnyValue(t, base64.b64decode(v)) for k, (t, v) in json.loads(row["extensions"]).items()
        },
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _lookup(c: Container):
    def lookup(path: tuple[str, ...]) -> str | None:
        match path:
            case ("id",):
                return c.id
            case ("image",):
                return c.image
            case ("runtime",) | ("runtime", "name"):
                return c.runtime_name
            case ("snapshotter",):
                return c.snapshotter
            case ("snapshotkey",) | ("snapshot_key",):
                return c.snapshot_key
            case ("labels", key):
                return c.labels.get(key)
        return None

    return lookup


class ContainerStore:
    def __init__(self, db: Database, namespaces, exchange):
        self.db = db
        self.namespaces = namespaces
        self.exchange = exchange
        db.migrate("containers", SCHEMA)
        namespaces.register_usage("containers", "SELECT 1 FROM containers WHERE namespace = ? LIMIT 1")

    def get(self, namespace: str, container_id: str) -> Container:
        with self.db.read() as conn:
            row = conn.execute(
                "SELECT * FROM containers WHERE namespace = ? AND id = ?", (namespace, container_id)
            ).fetchone()
        if row is None:
            raise NotFound(f"container {container_id!r} in namespace {namespace!r} not found")
        return _row_to_container(row)

    def list(self, namespace: str, filters: list[str] | None = None) -> list[Container]:
        selected = parse(filters)
        with self.db.read() as conn:
            rows = conn.execute(
                "SELECT * FROM containers WHERE namespace = ? ORDER BY id", (namespace,)
            ).fetchall()
        found = (_row_to_container(r) for r in rows)
        return [c for c in found if selected.match(_lookup(c))]

    def stamp(self, namespace: str, container_id: str) -> int:
        """The container's updated_at: enough to tell whether a cached encoding is current."""
        with self.db.read() as conn:
            row = conn.execute(
                "SELECT updated_at FROM containers WHERE namespace = ? AND id = ?",
                (namespace, container_id),
            ).fetchone()
        if row is None:
            raise NotFound(f"container {container_id!r} in namespace {namespace!r} not found")
        return row[0]

    def stamps(self, namespace: str) -> list[tuple[str, int]]:
        """(id, updated_at) of every container in a namespace, in List order: enough to
        tell whether a cached encoding is current without reading whole records."""
        with self.db.read() as conn:
            return conn.execute(
                "SELECT id, updated_at FROM containers WHERE namespace = ? ORDER BY id", (namespace,)
            ).fetchall()

    def references(self, namespace: str) -> list[tuple[str, str]]:
        """(snapshotter, snapshot key) of every container in a namespace: GC roots."""
        with self.db.read() as conn:
            rows = conn.execute(
                "SELECT snapshotter, snapshot_key FROM containers WHERE namespace = ? AND snapshot_key != ''",
                (namespace,),
            ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def create(self, namespace: str, container: Container) -> Container:
        now = now_ns()
        container = replace(container, created_at=now, updated_at=now)
        _validate(container)
        with self.db.transaction() as tx:
            self.namespaces.ensure(tx, namespace)
            if tx.execute(
                "SELECT 1 FROM containers WHERE namespace = ? AND id = ?", (namespace, container.id)
            ).fetchone():
                raise AlreadyExists(f"container {container.id!r} already exists in namespace {namespace!r}")
            self._write(tx, namespace, container, insert=True)
        self._publish_create(namespace, container)
        return container

    def update(self, namespace: str, container: Container, paths: list[str]) -> Container:
        with self.db.transaction() as tx:
            current = self.get(namespace, container.id)
            if not paths:
                if container.snapshotter != current.snapshotter:
                    raise InvalidArgument(f"container {container.id!r}: snapshotter is immutable")
                if container.runtime_name != current.runtime_name:
                    raise InvalidArgument(f"container {container.id!r}: runtime name is immutable")
                paths = sorted(UPDATABLE)
            updated = current
            for path in paths:
                if path.startswith("labels."):
                    key = path[len("labels."):]
                    labels = dict(updated.labels)
                    if container.labels.get(key):
                        labels[key] = container.labels[key]
                    else:
                        labels.pop(key, None)
                    updated = replace(updated, labels=labels)
                elif path.startswith("extensions."):
                    key = path[len("extensions."):]
                    extensions = dict(updated.extensions)
                    if key in container.extensions:
                        extensions[key] = container.extensions[key]
                    else:
                        extensions.pop(key, None)
                    updated = replace(updated, extensions=extensions)
                elif path == "labels":
                    updated = replace(updated, labels=dict(container.labels))
                elif path == "spec":
                    updated = replace(updated, spec=container.spec)
                elif path == "extensions":
                    updated = replace(updated, extensions=dict(container.extensions))
                elif path == "image":
                    updated = replace(updated, image=container.image)
                elif path == "snapshotkey":
                    updated = replace(updated, snapshot_key=container.snapshot_key)
                else:
                    raise InvalidArgument(f"cannot update {path!r} field on container {container.id!r}")
            updated = replace(updated, updated_at=now_ns())
            _validate(updated)
            self._write(tx, namespace, updated, insert=False)
        from runtimed.api.containerd.events import container_pb2

        event = container_pb2.ContainerUpdate(
            id=updated.id, image=updated.image, labels=updated.labels, snapshot_key=updated.snapshot_key
        )
        self.exchange.publish(namespace, "/containers/update", event)
        return updated

    def delete(self, namespace: str, container_id: str) -> None:
        with self.db.transaction() as tx:
            cursor = tx.execute(
                "DELETE FROM containers WHERE namespace = ? AND id = ?", (namespace, container_id)
            )
            if cursor.rowcount == 0:
                raise NotFound(f"container {container_id!r} in namespace {namespace!r} not found")
        from runtimed.api.containerd.events import container_pb2

        self.exchange.publish(namespace, "/containers/delete", container_pb2.ContainerDelete(id=container_id))

    def _write(self, tx, namespace: str, c: Container, insert: bool) -> None:
        options = c.runtime_options or AnyValue()
        values = dict(
            namespace=namespace, id=c.id, labels=json.dumps(c.labels), image=c.image,
            runtime_name=c.runtime_name, runtime_options_type=options.type_url,
            runtime_options=options.value, spec_type=c.spec.type_url, spec=c.spec.value,
            snapshotter=c.snapshotter, snapshot_key=c.snapshot_key,
            extensions=json.dumps(
                {k: [v.type_url, base64.b64encode(v.value).decode()] for k, v in c.extensions.items()}
            ),
            created_at=c.created_at, updated_at=c.updated_at,
        )
        columns = ", ".join(values)
        placeholders = ", ".join(f":{k}" for k in values)
        verb = "INSERT" if insert else "REPLACE"
        tx.execute(f"{verb} INTO containers ({columns}) VALUES ({placeholders})", values)

    def _publish_create(self, namespace: str, c: Container) -> None:
        from runtimed.api.containerd.events import container_pb2

        event = container_pb2.ContainerCreate(id=c.id, image=c.image)
        event.runtime.name = c.runtime_name
        if c.runtime_options:
            event.runtime.options.type_url = c.runtime_options.type_url
            event.runtime.options.value = c.runtime_options.value
        self.exchange.publish(namespace, "/containers/create", event)
