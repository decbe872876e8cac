"""Named volumes: directories that outlive containers.

A volume lives at `<root>/volumes/<namespace>/<name>/_data` (volumes are tenant objects
like everything else, so one namespace cannot mount or remove another's). A container
uses a volume by bind-mounting its `_data` directory; "in use" is therefore read from the
container specs themselves, so it holds for any client, ctl or ctr alike.

Creation writes the directory first and the record second; `repair` (run at start)
removes directories without a record, so a kill -9 between the two leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from runtimed import identifiers
from runtimed.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from runtimed.filters import parse
from runtimed.metadata import labels as label_rules
from runtimed.metadata.db import Database, now_ns

SCHEMA = [
    """
    CREATE TABLE volumes (
        namespace TEXT NOT NULL REFERENCES namespaces(name),
        name TEXT NOT NULL,
        driver TEXT NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        anonymous INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, name)
    )
    """,
]

DRIVERS = ("local",)
RESOLVE_IN_ROOT = 0x10  # openat2: absolute symlinks resolve against the image root
SPEC_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/Spec"


@dataclass
class Volume:
    name: str
    driver: str
    mountpoint: Path
    labels: dict[str, str] = field(default_factory=dict)
    anonymous: bool = False
    created_at: int = 0
    used_by: list[str] = field(default_factory=list)
    size: int = 0


def dir_size(path: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames + dirnames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total


class VolumeStore:
    def __init__(self, root: Path, db: Database, namespaces, containers, snapshotters: dict):
        self.root = root / "volumes"
        self.db = db
        self.namespaces = namespaces
        self.containers = containers
        self.snapshotters = snapshotters
        db.migrate("volumes", SCHEMA)
        namespaces.register_usage("volumes", "SELECT 1 FROM volumes WHERE namespace = ? LIMIT 1")

    def path(self, namespace: str, name: str) -> Path:
        return self.root / namespace / name

    def _volume(self, namespace: str, row) -> Volume:
        return Volume(
            name=row["name"], driver=row["driver"],
            mountpoint=self.path(namespace, row["name"]) / "_data",
            labels=json.loads(row["labels"]), anonymous=bool(row["anonymous"]),
            created_at=row["created_at"],
        )

    def usage(self, namespace: str) -> dict[str, list[str]]:
        """volume name -> ids of the containers whose spec mounts it."""
        prefix = str(self.root / namespace) + "/"
        used: dict[str, list[str]] = {}
        for container in self.containers.list(namespace):
            if container.spec.type_url != SPEC_TYPE:
                continue
            try:
                mounts = json.loads(container.spec.value).get("mounts") or []
            except ValueError:
                continue
            for m in mounts:
                source = str(m.get("source", ""))
                if source.startswith(prefix):
                    name = source[len(prefix):].split("/", 1)[0]
                    used.setdefault(name, []).append(container.id)
        return used

    def create(self, namespace: str, name: str = "", driver: str = "", labels: dict | None = None,
               anonymous: bool = False) -> Volume:
        driver = driver or "local"
        if driver not in DRIVERS:
            raise InvalidArgument(f"volume driver {driver!r} is not supported (have: {', '.join(DRIVERS)})")
        labels = label_rules.validate(dict(labels or {}))
        if not name:
            name, anonymous = secrets.token_hex(32), True
        identifiers.validate(name, "volume name")
        with self.db.transaction() as tx:
            self.namespaces.ensure(tx, namespace)
            row = tx.execute(
                "SELECT * FROM volumes WHERE namespace = ? AND name = ?", (namespace, name)
            ).fetchone()
            if row is not None:
                if row["driver"] != driver:
                    raise AlreadyExists(f"volume {name!r} already exists with driver {row['driver']!r}")
                return self._volume(namespace, row)
            data = self.path(namespace, name) / "_data"
            data.mkdir(parents=True, exist_ok=True, mode=0o755)
            tx.execute(
                "INSERT INTO volumes (namespace, name, driver, labels, anonymous, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (namespace, name, driver, json.dumps(labels), int(anonymous), now_ns()),
            )
            row = tx.execute(
                "SELECT * FROM volumes WHERE namespace = ? AND name = ?", (namespace, name)
            ).fetchone()
        return self._volume(namespace, row)

    def get(self, namespace: str, name: str, with_size: bool = True) -> Volume:
        with self.db.read() as conn:
            row = conn.execute(
                "SELECT * FROM volumes WHERE namespace = ? AND name = ?", (namespace, name)
            ).fetchone()
        if row is None:
            raise NotFound(f"volume {name!r} not found in namespace {namespace!r}")
        volume = self._volume(namespace, row)
        volume.used_by = self.usage(namespace).get(name, [])
        if with_size:
            volume.size = dir_size(volume.mountpoint)
        return volume

    def list(self, namespace: str, filters: list[str] | None = None, with_size: bool = False) -> list[Volume]:
        selected = parse(filters)
        with self.db.read() as conn:
            rows = conn.execute(
                "SELECT * FROM volumes WHERE namespace = ? ORDER BY name", (namespace,)
            ).fetchall()
        used = self.usage(namespace)
        found = []
        for row in rows:
            volume = self._volume(namespace, row)
            volume.used_by = used.get(volume.name, [])
            fields = {"name": volume.name, "driver": volume.driver,
                      "anonymous": str(volume.anonymous).lower(),
                      "dangling": str(not volume.used_by).lower()}

            def lookup(path, fields=fields, labels=volume.labels):
                if len(path) == 2 and path[0] == "labels":
                    return labels.get(path[1])
                return fields.get(path[0]) if len(path) == 1 else None

            if selected.match(lookup):
                if with_size:
                    volume.size = dir_size(volume.mountpoint)
                found.append(volume)
        return found

    def remove(self, namespace: str, name: str, force: bool = False) -> int:
        volume = self.get(namespace, name, with_size=True)
        if volume.used_by and not force:
            raise FailedPrecondition(
                f"volume {name!r} is in use by container(s) {', '.join(volume.used_by)}; "
                "remove them first or force"
            )
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM volumes WHERE namespace = ? AND name = ?", (namespace, name))
        shutil.rmtree(self.path(namespace, name), ignore_errors=True)
        return volume.size

    def prune(self, namespace: str, filters: list[str] | None = None, all_volumes: bool = False
              ) -> tuple[list[str], int]:
        removed, reclaimed = [], 0
        for volume in self.list(namespace, filters):
            if volume.used_by or not (volume.anonymous or all_volumes):
                continue
            reclaimed += self.remove(namespace, volume.name)
            removed.append(volume.name)
        return removed, reclaimed

    def populate(self, namespace: str, name: str, snapshotter: str, snapshot_key: str, path: str) -> bool:
        """Copy the snapshot's content at `path` into the volume if the volume is empty."""
        from runtimed.diff.safepath import RESOLVE_NO_MAGICLINKS, Escape, openat2
        from runtimed.snapshots.mount import temp_mount

        volume = self.get(namespace, name, with_size=False)
        if any(volume.mountpoint.iterdir()):
            return False
        snapshotters = self.snapshotters
        if snapshotter not in snapshotters:
            raise NotFound(f"snapshotter {snapshotter!r} not found")
        mounts = snapshotters[snapshotter].mounts(namespace, snapshot_key)
        relative = os.path.normpath("/" + path).lstrip("/")
        with temp_mount(mounts, parent=self.root) as rootfs:
            rootfd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY)
            try:
                try:
                    fd = openat2(rootfd, relative or ".", os.O_PATH | os.O_DIRECTORY,
                                 resolve=RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
                except (FileNotFoundError, NotADirectoryError, Escape):
                    return False
                try:
                    subprocess.run(
                        ["cp", "-a", "--", f"/proc/self/fd/{fd}/.", str(volume.mountpoint)],
                        check=True, capture_output=True, pass_fds=(fd,),
                    )
                finally:
                    os.close(fd)
            finally:
                os.close(rootfd)
        return True

    def repair(self) -> list[str]:
        """Remove volume directories that have no record (a create cut short)."""
        removed = []
        if not self.root.is_dir():
            return removed
        with self.db.read() as conn:
            known = {(r[0], r[1]) for r in conn.execute("SELECT namespace, name FROM volumes")}
        for ns_dir in self.root.iterdir():
            for vol_dir in ns_dir.iterdir() if ns_dir.is_dir() else []:
                if (ns_dir.name, vol_dir.name) not in known:
                    shutil.rmtree(vol_dir, ignore_errors=True)
                    removed.append(f"{ns_dir.name}/{vol_dir.name}")
        return removed

