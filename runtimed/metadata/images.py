"""Image records: a name pointing at a target descriptor (usually an index or manifest).

The record is all an image is in metadata; the blobs it names live in the content store
and stay alive because the garbage collector treats every image target as a root.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field

from runtimed.content import digests
from runtimed.errors import AlreadyExists, InvalidArgument, NotFound
from runtimed.filters import parse
from runtimed.images.manifest import Descriptor
from runtimed.metadata import labels as labelutil
from runtimed.metadata.db import Database, now_ns

MIGRATIONS = [
    """
    CREATE TABLE images (
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        media_type TEXT NOT NULL,
        digest TEXT NOT NULL,
        size INTEGER NOT NULL,
        annotations TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, name)
    );
    """,
]


@dataclass
class Image:
    name: str
    target: Descriptor
    labels: dict[str, str] = field(default_factory=dict)
    created_at: int = 0
    updated_at: int = 0

    def lookup(self, path: tuple[str, ...]) -> str | None:
        """Fields containerd's image filters know: name, target.*, labels.*, annotations.*."""
        if path == ("name",):
            return self.name
        if len(path) == 2 and path[0] == "labels":
            return self.labels.get(path[1])
        if len(path) == 2 and path[0] == "annotations":
            return self.target.annotations.get(path[1])
        if len(path) == 2 and path[0] == "target":
            if path[1] == "digest":
                return self.target.digest
            if path[1] == "mediatype":
                return self.target.media_type
        return None


def validate(image: Image) -> Image:
    """Check the record; empty label and annotation values mean "unset" and are dropped."""
    image.labels = {k: v for k, v in image.labels.items() if v}
    image.target.annotations = {k: v for k, v in image.target.annotations.items() if v}
    if not image.name:
        raise InvalidArgument("image name must not be empty")
    labelutil.validate(image.labels)
    try:
        digests.validate(image.target.digest)
    except InvalidArgument as exc:
        raise InvalidArgument(f"image {image.name!r}: target digest: {exc}") from None
    if image.target.size <= 0:
        raise InvalidArgument(f"image {image.name!r}: target size must be greater than zero")
    if not image.target.media_type:
        raise InvalidArgument(f"image {image.name!r}: target media type must be set")
    return image


def _image(row) -> Image:
    return Image(
        row["name"],
        Descriptor(row["media_type"], row["digest"], row["size"], json.loads(row["annotations"])),
        json.loads(row["labels"]),
        row["created_at"],
        row["updated_at"],
    )


_COLUMNS = "name, labels, media_type, digest, size, annotations, created_at, updated_at"


class ImageStore:
    def __init__(self, db: Database, namespaces=None, exchange=None):
        self.db = db
        self.namespaces = namespaces
        self.exchange = exchange
        self.gc = None  # set by the daemon: deletes schedule a collection
        db.migrate("images", MIGRATIONS)
        if namespaces is not None:
            namespaces.register_usage("images", "SELECT 1 FROM images WHERE namespace = ? LIMIT 1")

    def get(self, ns: str, name: str) -> Image:
        with self.db.read() as conn:
            row = self._row(conn, ns, name)
        if row is None:
            raise NotFound(f"image {name!r} not found in namespace {ns!r}")
        return _image(row)

    @staticmethod
    def _row(conn: sqlite3.Connection, ns: str, name: str):
        return conn.execute(
            f"SELECT {_COLUMNS} FROM images WHERE namespace = ? AND name = ?", (ns, name)
        ).fetchone()

    def list(self, ns: str, filters: list[str] | None = None) -> list[Image]:
        match = parse(filters)
        with self.db.read() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM images WHERE namespace = ? ORDER BY name", (ns,)
            ).fetchall()
        return [image for image in map(_image, rows) if match.match(image.lookup)]

    def create(self, ns: str, image: Image) -> Image:
        validate(image)
        image.created_at = image.updated_at = now_ns()
        with self.db.transaction() as tx:
            if self.namespaces is not None:
                self.namespaces.ensure(tx, ns)
            try:
                self._write(tx, ns, image, insert=True)
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"image {image.name!r} already exists in namespace {ns!r}") from None
        self._publish(ns, "/images/create", "ImageCreate", name=image.name, labels=image.labels)
        return image

    def update(self, ns: str, image: Image, paths: list[str] | None = None) -> Image:
        """Without paths the record is replaced; with them only the named fields change:
        `labels`, `labels.<key>`, `target`, `annotations`, `annotations.<key>`."""
        if not image.name:
            raise InvalidArgument("image name is required for update")
        with self.db.transaction() as tx:
            row = self._row(tx, ns, image.name)
            if row is None:
                raise NotFound(f"image {image.name!r} not found in namespace {ns!r}")
            current = _image(row)
            if paths:
                updated = current
                for path in paths:
                    if path.startswith("labels."):
                        key = path[len("labels."):]
                        _set_or_drop(updated.labels, key, image.labels.get(key, ""))
                    elif path.startswith("annotations."):
                        key = path[len("annotations."):]
                        _set_or_drop(updated.target.annotations, key, image.target.annotations.get(key, ""))
                    elif path == "labels":
                        updated.labels = dict(image.labels)
                    elif path == "target":
                        updated.target = image.target
                    elif path == "annotations":
                        updated.target.annotations = dict(image.target.annotations)
                    else:
                        raise InvalidArgument(f"cannot update {path!r} field on image {image.name!r}")
            else:
                updated = Image(image.name, image.target, dict(image.labels))
            validate(updated)
            updated.created_at = current.created_at
            updated.updated_at = now_ns()
            self._write(tx, ns, updated, insert=False)
        self._publish(ns, "/images/update", "ImageUpdate", name=updated.name, labels=updated.labels)
        if self.gc is not None:
            self.gc.schedule()  # the old target may now be unreferenced
        return updated

    def delete(self, ns: str, name: str) -> None:
        with self.db.transaction() as tx:
            cur = tx.execute("DELETE FROM images WHERE namespace = ? AND name = ?", (ns, name))
            if cur.rowcount == 0:
                raise NotFound(f"image {name!r} not found in namespace {ns!r}")
        self._publish(ns, "/images/delete", "ImageDelete", name=name)
        if self.gc is not None:
            self.gc.schedule()

    @staticmethod
    def _write(tx: sqlite3.Connection, ns: str, image: Image, insert: bool) -> None:
        values = (
            json.dumps(image.labels),
            image.target.media_type,
            image.target.digest,
            image.target.size,
            json.dumps(image.target.annotations),
            image.created_at,
            image.updated_at,
        )
        if insert:
            tx.execute(
                "INSERT INTO images (namespace, name, labels, media_type, digest, size, "
                "annotations, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (ns, image.name, *values),
            )
        else:
            tx.execute(
                "UPDATE images SET labels = ?, media_type = ?, digest = ?, size = ?, "
                "annotations = ?, created_at = ?, updated_at = ? WHERE namespace = ? AND name = ?",
                (*values, ns, image.name),
            )

    def _publish(self, ns: str, topic: str, message: str, **fields) -> None:
        if self.exchange is None:
            return
        from runtimed.api.containerd.events import image_pb2

        self.exchange.publish(ns, topic, getattr(image_pb2, message)(**fields))


def _set_or_drop(mapping: dict[str, str], key: str, value: str) -> None:
    if value:
        mapping[key] = value
    else:
        mapping.pop(key, None)
