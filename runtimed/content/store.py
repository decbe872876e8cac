"""The content store: immutable blobs addressed by digest, and resumable ingests.

Blobs live once on disk (`<root>/content/blobs/sha256/<hex>`) but exist per containerd
namespace: a blob is visible in a namespace only once it was committed there (a row in
`content_blobs`), and its labels are per namespace, as in containerd. A blob file that no
namespace references is removed by the garbage collector.

An ingest is an unfinished write, named by a client-chosen ref. Its directory
(`<root>/content/ingest/<sha256 of namespace/ref>/`) holds `ref`, `data`, `total`,
`startedat` and `updatedat`, so a write interrupted by a client going away or a kill -9 of
the daemon resumes: the writer re-hashes the data already there and reports its length as
the offset. A blob becomes visible only after its size and digest are verified, the data
fsynced and renamed into place, and the metadata row committed.

One writer per ref at a time: the lock is in memory (the root lock already guarantees one
daemon per root, and a restarted daemon starts with no writer holding anything).

Core methods block on disk I/O; services call them through `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from runtimed.content import digests
from runtimed.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RuntimedError,
    Unavailable,
)
from runtimed.filters import parse
from runtimed.metadata import labels as labelutil
from runtimed.metadata.db import Database, now_ns
from runtimed.metadata.leases import CONTENT, INGESTS, LeaseStore

log = logging.getLogger("runtimed.content")

CHUNK = 1 << 20
WRITEBACK_EVERY = 8 << 20  # ingest data handed to the disk in the background this often
INGEST_EXPIRY_NS = 24 * 3600 * 10**9  # unleased ingests are kept a day, as containerd does

MIGRATIONS = [
    """
    CREATE TABLE content_blobs (
        namespace TEXT NOT NULL,
        digest TEXT NOT NULL,
        size INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        PRIMARY KEY (namespace, digest)
    );
    CREATE INDEX content_blobs_digest ON content_blobs (digest);
    CREATE TABLE content_ingests (
        namespace TEXT NOT NULL,
        ref TEXT NOT NULL,
        bref TEXT NOT NULL,
        expected TEXT NOT NULL DEFAULT '',
        expires_at INTEGER,
        PRIMARY KEY (namespace, ref)
    );
    """,
]


class OutOfRange(RuntimedError):
    """A read or write offset outside what the blob or ingest holds."""

    code = "OUT_OF_RANGE"


@dataclass
class ContentInfo:
    digest: str
    size: int
    created_at: int  # nanoseconds since the epoch
    updated_at: int
    labels: dict[str, str] = field(default_factory=dict)

    def lookup(self, path: tuple[str, ...]) -> str | None:
        if path == ("digest",):
            return self.digest
        if path == ("size",):
            return str(self.size)
        if len(path) == 2 and path[0] == "labels":
            return self.labels.get(path[1])
        return None


@dataclass
class Status:
    ref: str
    offset: int
    total: int
    started_at: int
    updated_at: int
    expected: str = ""


def _sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


STATUS = "status"  # an ingest's bookkeeping, beside its `data`


def _write_status(directory: Path, status: dict, fresh: bool = False) -> None:
    """An ingest's bookkeeping (`ref`, `startedat`, `updatedat`, `total`), one JSON file
    replaced whole, so a kill -9 never leaves half of it; a fresh ingest's is written in
    place (half of one reads as none, and the ingest starts again). One file, not
    containerd's four through temp files: 2 files made per blob instead of 5, and no
    renames (no import here got measurably faster for it). Not fsynced, as
    containerd's aren't: the `data` it describes is only fsynced at commit, and after a
    power loss a missing or empty status restarts the ingest."""
    target = directory / STATUS if fresh else directory / (STATUS + ".tmp")
    with open(target, "w") as f:
        f.write(json.dumps(status))
    if not fresh:
        os.replace(target, directory / STATUS)


def _remove_ingest_dir(directory: Path) -> None:
    """Remove an ingest's directory, if there. What a writer leaves in it is known (its
    status and data): removing those by name is a tenth of rmtree's cost, which a small
    blob's commit paid twice (~0.3 ms each); anything else there falls back to rmtree."""
    for name in (STATUS, STATUS + ".tmp", "data"):
        try:
            os.unlink(directory / name)
        except FileNotFoundError:
            pass
        except OSError:
            break
    try:
        os.rmdir(directory)
    except FileNotFoundError:
        pass
    except OSError:
        shutil.rmtree(directory, ignore_errors=True)


def _read_status(directory: Path) -> dict:
    """The ingest's bookkeeping; {} when missing or unreadable."""
    try:
        status = json.loads((directory / STATUS).read_bytes())
    except FileNotFoundError:
        return _read_old_status(directory)
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


_OLD_STATUS = ("ref", "startedat", "updatedat", "total")


def _read_old_status(directory: Path) -> dict:
    """The bookkeeping of an ingest written before the status file (one file per field,
    as containerd's), so that it still resumes; {} when it is not one."""
    status: dict = {}
    for name in _OLD_STATUS:
        try:
            text = (directory / name).read_text().strip()
        except (OSError, ValueError):
            continue
        if name == "ref":
            status[name] = text
        else:
            with contextlib.suppress(ValueError):
                status[name] = int(text)
    return status if "ref" in status else {}


_writeback_pool = None
_writeback_pool_lock = threading.Lock()


def _writeback_thread():
    global _writeback_pool
    if _writeback_pool is None:
        with _writeback_pool_lock:
            if _writeback_pool is None:
                from concurrent.futures import ThreadPoolExecutor

                _writeback_pool = ThreadPoolExecutor(max_workers=1,
                                                     thread_name_prefix="content-writeback")
    return _writeback_pool


_sync_file_range = None


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """sync_file_range(SYNC_FILE_RANGE_WRITE): start writing these dirty pages out without
    waiting, so the fsync at commit finds little left to write. Advisory (its result is
    ignored): an I/O error shows again at that fsync."""
    global _sync_file_range
    if _sync_file_range is None:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        _sync_file_range = fn
    _sync_file_range(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ContentStore:
    def __init__(self, root: Path, db: Database, leases: LeaseStore, namespaces=None, exchange=None):
        self.root = Path(root) / "content"
        self.blobs = self.root / "blobs"
        self.ingests = self.root / "ingest"
        (self.blobs / "sha256").mkdir(parents=True, exist_ok=True)
        self.ingests.mkdir(parents=True, exist_ok=True)
        self.db = db
        self.leases = leases
        self.namespaces = namespaces
        self.exchange = exchange
        self.gc = None  # set by the daemon: content deletes schedule a collection
        self._commit_hooks: list = []
        self._ingest_hooks: list = []
        self._locks: dict[str, float] = {}
        self._locks_guard = threading.Lock()
        db.migrate("content", MIGRATIONS)
        if namespaces is not None:
            namespaces.register_usage(
                "blobs", "SELECT 1 FROM content_blobs WHERE namespace = ? LIMIT 1"
            )

    # Paths

    def _disk_path(self, digest: str) -> Path:
        algorithm, _, encoded = digests.validate(digest).partition(":")
        return self.blobs / algorithm / encoded

    def _ingest_dir(self, bref: str) -> Path:
        return self.ingests / _sha256_hex(bref)

    # Reading

    def info(self, ns: str, digest: str) -> ContentInfo:
        digests.validate(digest)
        with self.db.read() as conn:
            row = self._row(conn, ns, digest)
        if row is None:
            raise NotFound(f"content {digest} not found in namespace {ns!r}")
        return self._info(row)

    @staticmethod
    def _row(conn: sqlite3.Connection, ns: str, digest: str):
        return conn.execute(
            "SELECT digest, size, created_at, updated_at, labels FROM content_blobs "
            "WHERE namespace = ? AND digest = ?",
            (ns, digest),
        ).fetchone()

    @staticmethod
    def _info(row) -> ContentInfo:
        return ContentInfo(
            row["digest"], row["size"], row["created_at"], row["updated_at"], json.loads(row["labels"])
        )

    def exists(self, ns: str, digest: str) -> bool:
        try:
            self.info(ns, digest)
        except NotFound:
            return False
        return True

    def blob_path(self, ns: str, digest: str) -> Path:
        """The blob's file, for readers that want it without a copy (unpack, export).
        The file is read-only and never changes; it may vanish once nothing references it."""
        self.info(ns, digest)
        path = self._disk_path(digest)
        if not path.exists():
            raise NotFound(f"content {digest}: blob missing on disk at {path}")
        return path

    def open_blob(self, ns: str, digest: str) -> BinaryIO:
        return open(self.blob_path(ns, digest), "rb")

    def read_chunks(self, ns: str, digest: str, offset: int = 0, size: int = 0) -> Iterator[bytes]:
        """`size` bytes from `offset` (all the rest when size <= 0), in chunks of 1 MiB."""
        info = self.info(ns, digest)
        offset = max(offset, 0)
        if offset > info.size:
            raise OutOfRange(f"read at offset {offset} past the length of {digest} ({info.size} bytes)")
        if size <= 0 or offset + size > info.size:
            size = info.size - offset
        with self.open_blob(ns, digest) as f:
            f.seek(offset)
            while size > 0:
                chunk = f.read(min(CHUNK, size))
                if not chunk:
                    break
                size -= len(chunk)
                yield chunk

    def list(self, ns: str, filters: list[str] | None = None) -> list[ContentInfo]:
        match = parse(filters)
        with self.db.read() as conn:
            rows = conn.execute(
                "SELECT digest, size, created_at, updated_at, labels FROM content_blobs "
                "WHERE namespace = ? ORDER BY digest",
                (ns,),
            ).fetchall()
        infos = [self._info(r) for r in rows]
        return [info for info in infos if match.match(info.lookup)]

    # Changing

    def update(self, ns: str, info: ContentInfo, paths: list[str] | None = None) -> ContentInfo:
        """Labels are the only mutable field: `labels` replaces them, `labels.<key>` sets
        or (when empty) deletes one key, no paths replaces all."""
        digests.validate(info.digest)
        for path in paths or ():
            if path != "labels" and not path.startswith("labels."):
                raise InvalidArgument(f"cannot update {path!r} field on content {info.digest}")
        with self.db.transaction() as tx:
            row = self._row(tx, ns, info.digest)
            if row is None:
                raise NotFound(f"content {info.digest} not found in namespace {ns!r}")
            current = self._info(row)
            current.labels = labelutil.apply_update(current.labels, info.labels, list(paths or ()))
            current.updated_at = now_ns()
            tx.execute(
                "UPDATE content_blobs SET labels = ?, updated_at = ? WHERE namespace = ? AND digest = ?",
                (json.dumps(current.labels), current.updated_at, ns, info.digest),
            )
        return current

    def delete(self, ns: str, digest: str, lease: str | None = None) -> None:
        """Remove the blob from the namespace; the file goes at the next collection when no
        other namespace holds it."""
        digests.validate(digest)
        with self.db.transaction() as tx:
            cur = tx.execute(
                "DELETE FROM content_blobs WHERE namespace = ? AND digest = ?", (ns, digest)
            )
            if cur.rowcount == 0:
                raise NotFound(f"content {digest} not found in namespace {ns!r}")
            self.leases.remove_resource_tx(tx, ns, lease, CONTENT, digest)
        if self.exchange is not None:
            from runtimed.api.containerd.events import content_pb2

            self.exchange.publish(ns, "/content/delete", content_pb2.ContentDelete(digest=digest))
        if self.gc is not None:
            self.gc.schedule()

    # Ingests

    def add_commit_hook(self, hook) -> None:
        """`hook(digest, path)` runs after a writer opened with `announce` committed a blob
        it wrote (the differ stages layers with it). It must be quick and never raise."""
        self._commit_hooks.append(hook)

    def add_ingest_hook(self, hook) -> None:
        """`hook(data_path, head)` runs when a writer opened with `announce` writes the first
        bytes (`head`, up to 512) of a fresh ingest; it may return a follower, which then
        hears `grow(offset)` after every write, `committed(digest)` once the blob is
        visible, or `abandon()` when the ingest restarts, fails or is closed. Quick, and
        never raising."""
        self._ingest_hooks.append(hook)

    def writer(
        self,
        ns: str,
        ref: str,
        *,
        total: int = 0,
        expected: str = "",
        lease: str | None = None,
        announce: bool = False,
    ) -> Writer:
        """Open (or resume) the ingest `ref`. AlreadyExists when `expected` is already in
        the namespace; Unavailable while another writer holds the ref. With `announce`,
        the commit hooks hear of the blob once committed."""
        if not ref:
            raise InvalidArgument("ref must not be empty")
        if expected:
            digests.validate(expected)
        bref = f"{ns}/{ref}"
        self._lock(ref, bref)
        try:
            writer = self._open_writer(ns, ref, bref, total, expected, lease)
        except BaseException:
            self._unlock(bref)
            raise
        writer.announce = announce
        return writer

    def _open_writer(self, ns, ref, bref, total, expected, lease) -> Writer:
        shared_size = None
        with self.db.transaction() as tx:
            if expected:
                if self._row(tx, ns, expected) is not None:
                    self.leases.add_resource_tx(tx, ns, lease, CONTENT, expected)
                    exists = True
                else:
                    exists = False
                    path = self._disk_path(expected)
                    if path.exists():
                        size = path.stat().st_size
                        if total in (0, size):
                            shared_size = size  # committed in another namespace
            else:
                exists = False
            if not exists:
                if self.namespaces is not None:
                    self.namespaces.ensure(tx, ns)
                self.leases.add_resource_tx(tx, ns, lease, INGESTS, ref)
                expires = None if lease else now_ns() + INGEST_EXPIRY_NS
                tx.execute(
                    "INSERT INTO content_ingests (namespace, ref, bref, expected, expires_at) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (namespace, ref) DO UPDATE SET "
                    "expected = excluded.expected, expires_at = CASE WHEN ? THEN "
                    "content_ingests.expires_at ELSE excluded.expires_at END",
                    (ns, ref, bref, expected if shared_size is not None else "", expires, bool(lease)),
                )
        if exists:
            raise AlreadyExists(f"content {expected} already exists in namespace {ns!r}")
        if shared_size is not None:
            return Writer(self, ns, ref, bref, lease, shared=(expected, shared_size))
        writer = Writer(self, ns, ref, bref, lease)
        writer._open(total)  # outside the transaction: resuming re-hashes the data
        return writer

    def _lock(self, ref: str, bref: str) -> None:
        for attempt in range(6):
            with self._locks_guard:
                since = self._locks.get(bref)
                if since is None:
                    self._locks[bref] = time.time()
                    return
            time.sleep(0.001 * (1 << attempt))
        held = time.time() - since
        raise Unavailable(
            f"ref {ref} locked for {held:.3f}s (since "
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(since))}): another writer holds it"
        )

    def is_locked(self, bref: str) -> bool:
        with self._locks_guard:
            return bref in self._locks

    def _unlock(self, bref: str) -> None:
        with self._locks_guard:
            self._locks.pop(bref, None)

    def status(self, ns: str, ref: str) -> Status:
        with self.db.read() as conn:
            row = conn.execute(
                "SELECT bref, expected FROM content_ingests WHERE namespace = ? AND ref = ?",
                (ns, ref),
            ).fetchone()
        if row is None:
            raise NotFound(f"no ingest with ref {ref!r} in namespace {ns!r}")
        return self._disk_status(ref, row["bref"], row["expected"])

    def _disk_status(self, ref: str, bref: str, expected: str) -> Status:
        if expected:
            path = self._disk_path(expected)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise NotFound(f"no ingest with ref {ref!r}") from None
            now = now_ns()
            return Status(ref, size, size, now, now, expected)
        ingest = self._ingest_dir(bref)
        try:
            st = (ingest / "data").stat()
        except FileNotFoundError:
            raise NotFound(f"no ingest data for ref {ref!r}") from None
        status = _read_status(ingest)
        updated = max(int(status.get("updatedat", 0)), st.st_mtime_ns)
        return Status(ref, st.st_size, int(status.get("total", 0)),
                      int(status.get("startedat", 0)), updated)

    def list_statuses(self, ns: str, filters: list[str] | None = None) -> list[Status]:
        match = parse(filters)
        with self.db.read() as conn:
            rows = conn.execute(
                "SELECT ref, bref, expected FROM content_ingests WHERE namespace = ? ORDER BY ref",
                (ns,),
            ).fetchall()
        statuses = []
        for row in rows:
            try:
                status = self._disk_status(row["ref"], row["bref"], row["expected"])
            except NotFound:
                continue
            if match.match(lambda path, s=status: s.ref if path == ("ref",) else None):
                statuses.append(status)
        return statuses

    def abort(self, ns: str, ref: str, lease: str | None = None) -> None:
        with self.db.transaction() as tx:
            row = tx.execute(
                "SELECT bref, expected FROM content_ingests WHERE namespace = ? AND ref = ?",
                (ns, ref),
            ).fetchone()
            if row is None:
                raise NotFound(f"no ingest with ref {ref!r} in namespace {ns!r}")
            tx.execute("DELETE FROM content_ingests WHERE namespace = ? AND ref = ?", (ns, ref))
            self.leases.remove_resource_tx(tx, ns, lease, INGESTS, ref)
            if not row["expected"]:
                shutil.rmtree(self._ingest_dir(row["bref"]), ignore_errors=True)

    def write_blob(
        self,
        ns: str,
        data: Iterable[bytes] | BinaryIO | bytes,
        *,
        expected_digest: str | None = None,
        expected_size: int | None = None,
        labels: dict[str, str] | None = None,
        lease: str | None = None,
    ) -> ContentInfo:
        """One-shot ingest, verified. A blob already in the namespace is not an error: its
        info comes back with `labels` merged in."""
        ref = f"write-blob-{os.urandom(8).hex()}"
        try:
            w = self.writer(ns, ref, total=expected_size or 0, expected=expected_digest or "", lease=lease)
        except AlreadyExists:
            return self._merge_labels(ns, expected_digest, labels)
        try:
            if w.shared:  # committed in another namespace: no bytes to send, as with Write
                return w.commit(expected_size or 0, expected_digest or "", labels)
            if isinstance(data, bytes):
                w.write(data)
            elif hasattr(data, "read"):
                while chunk := data.read(CHUNK):
                    w.write(chunk)
            else:
                for chunk in data:
                    w.write(chunk)
            try:
                return w.commit(expected_size or 0, expected_digest or "", labels)
            except AlreadyExists:
                return self._merge_labels(ns, w.digest(), labels)
        except BaseException:
            w.close()
            try:
                self.abort(ns, ref)
            except NotFound:
                pass
            raise

    def _merge_labels(self, ns: str, digest: str, labels: dict[str, str] | None) -> ContentInfo:
        if not labels:
            return self.info(ns, digest)
        return self.update(
            ns, ContentInfo(digest, 0, 0, 0, labels), [f"labels.{key}" for key in labels]
        )

    # Garbage collection support (called by runtimed.metadata.gc inside its transaction)

    def sweep_disk(self, tx: sqlite3.Connection) -> list[str]:
        """Remove blob files no namespace references and ingest directories no ingest row
        names (except ones a live writer holds). Returns what was removed."""
        removed: list[str] = []
        live = {r[0] for r in tx.execute("SELECT DISTINCT digest FROM content_blobs")}
        live |= {r[0] for r in tx.execute("SELECT expected FROM content_ingests WHERE expected != ''")}
        for algorithm_dir in self.blobs.iterdir():
            if not algorithm_dir.is_dir():
                continue
            for path in algorithm_dir.iterdir():
                digest = f"{algorithm_dir.name}:{path.name}"
                if digest in live:
                    continue
                try:
                    path.unlink()
                    removed.append(f"content/{digest}")
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("could not remove blob %s: %s", path, exc)
        brefs = {r[0] for r in tx.execute("SELECT bref FROM content_ingests")}
        with self._locks_guard:
            brefs |= set(self._locks)
        keep = {_sha256_hex(b) for b in brefs}
        for path in self.ingests.iterdir():
            if path.name in keep:
                continue
            ref = _read_status(path).get("ref") or path.name
            try:
                shutil.rmtree(path)
                removed.append(f"ingest/{ref}")
            except OSError as exc:
                log.warning("could not remove ingest %s: %s", path, exc)
        return removed


def _serialized(method):
    """Run under the writer's mutex: a cancelled RPC may close the writer while a worker
    thread is still inside `write`; the close then waits for it instead of racing it."""

    def locked(self, *args, **kwargs):
        with self._mutex:
            return method(self, *args, **kwargs)

    locked.__name__ = method.__name__
    locked.__doc__ = method.__doc__
    return locked


class Writer:
    """A locked, open ingest, driven by one session at a time."""

    def __init__(self, store: ContentStore, ns: str, ref: str, bref: str, lease: str | None,
                 shared: tuple[str, int] | None = None):
        self.store = store
        self.ns = ns
        self.ref = ref
        self.bref = bref
        self.lease = lease
        self.path = store._ingest_dir(bref)
        self._shared = shared  # (digest, size) of a blob another namespace committed
        self._fp: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self.offset = 0
        self.total = 0
        self.started_at = self.updated_at = now_ns()
        self._closed = False
        self._mutex = threading.RLock()
        self.announce = False  # tell the store's hooks about this ingest and its blob
        self._follower = None  # what an ingest hook returned for this ingest
        self._written_back = 0  # data before this offset has had its writeback started
        self._writeback = None  # the Future of a writeback start still running

    def _open(self, total: int) -> None:
        path = self.path
        data = path / "data"
        resumed = False
        saved = _read_status(path) if path.is_dir() else {}
        if saved.get("ref") == self.ref and data.exists():
            saved_total = int(saved.get("total", 0))
            if not (total > 0 and saved_total > 0 and total != saved_total):
                resumed = True
                self.total = saved_total or total
                self.started_at = int(saved.get("startedat") or now_ns())
                self.updated_at = int(saved.get("updatedat") or self.started_at)
                with open(data, "rb") as f:
                    while chunk := f.read(CHUNK):
                        self._hash.update(chunk)
                        self.offset += len(chunk)
                if self.total == 0 and total > 0:
                    self.total = total
                    self._save_status()
        if not resumed:
            try:
                path.mkdir(parents=True)
            except FileExistsError:  # a stale or mismatched ingest: start it again
                _remove_ingest_dir(path)
                path.mkdir()
            self.total = total
            self._save_status(fresh=True)
        # unbuffered: a WRITE's bytes are the kernel's before the stream's next message is
        # read, so a kill -9 of the daemon takes back at most the last answered message
        # (the client's resume asks the offset again: it is the file's size)
        self._fp = open(os.open(data, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644), "r+b",
                        buffering=0)
        self._fp.seek(self.offset)

    def _save_status(self, fresh: bool = False) -> None:
        _write_status(self.path, {"ref": self.ref, "startedat": self.started_at,
                                  "updatedat": self.updated_at, "total": self.total}, fresh)

    def _materialize(self, keep: int) -> None:
        """Turn a shared (data-less) writer into a real ingest holding the first `keep`
        bytes of the shared blob, as containerd does when such a client writes anyway."""
        digest, size = self._shared
        self._shared = None
        self._open(0)
        self.truncate(0)
        if keep:
            with open(self.store._disk_path(digest), "rb") as f:
                remaining = keep
                while remaining > 0 and (chunk := f.read(min(CHUNK, remaining))):
                    self.write(chunk)
                    remaining -= len(chunk)

    @property
    def shared(self) -> bool:
        """The blob is committed in another namespace already: commit needs no bytes."""
        return self._shared is not None

    def status(self) -> Status:
        if self._shared:
            digest, size = self._shared
            return Status(self.ref, size, size, self.started_at, self.started_at, digest)
        return Status(self.ref, self.offset, self.total, self.started_at, self.updated_at)

    def digest(self) -> str:
        if self._shared:
            return self._shared[0]
        return "sha256:" + self._hash.hexdigest()

    def set_total(self, total: int) -> None:
        if total > 0 and total != self.total and not self._shared:
            self.total = total
            self._save_status()

    def write_is_plain(self, size: int) -> bool:
        """A write of `size` bytes now would only write and hash: no shared blob to copy
        in first (`_materialize`), no ingest hook to run (the blob's first bytes: the layer
        stager may start a process), no writeback start still running to wait for. What
        Content.Write may run on the event loop."""
        if self._shared is not None or self.offset == 0 or self._closed:
            return False
        if self.offset + size - self._written_back >= WRITEBACK_EVERY:
            return self._writeback is None or self._writeback.done()
        return True

    @_serialized
    def write(self, data: bytes) -> int:
        """Append `data`; returns its length, as a file's write does (`offset` is the new
        end)."""
        if self._closed:
            raise FailedPrecondition(f"writer for ref {self.ref!r} is closed")
        if not data:
            return 0
        if self._shared:
            self._materialize(self._shared[1])
        view = memoryview(data)
        while view:
            view = view[self._fp.write(view):]
        self._hash.update(data)
        self.offset += len(data)
        self.updated_at = now_ns()
        if self._follower is not None:
            self._follower.grow(self.offset)
        elif self.announce and self.offset == len(data):  # the first bytes of the blob
            for hook in self.store._ingest_hooks:
                self._follower = hook(self.path / "data", bytes(memoryview(data)[:512]))
                if self._follower is not None:
                    self._follower.grow(self.offset)
                    break
        if self.offset - self._written_back >= WRITEBACK_EVERY:
            self._settle()
            start, self._written_back = self._written_back, self.offset
            self._writeback = _writeback_thread().submit(
                _start_writeback, self._fp.fileno(), start, self.offset - start)
        return len(data)

    def _abandon(self) -> None:
        if self._follower is not None:
            self._follower.abandon()
            self._follower = None

    def _settle(self) -> None:
        """Wait for a writeback start still using the file (before it is truncated or
        closed)."""
        if self._writeback is not None:
            self._writeback.result()
            self._writeback = None

    @_serialized
    def truncate(self, size: int = 0) -> None:
        if size != 0:
            raise InvalidArgument("an ingest can only be truncated to 0")
        if self._shared:
            self._materialize(0)
            return
        self._settle()
        self._abandon()
        self._written_back = 0
        self._fp.seek(0)
        self._fp.truncate(0)
        self._hash = hashlib.sha256()
        self.offset = 0
        self.updated_at = now_ns()

    @_serialized
    def commit(self, size: int = 0, expected: str = "", labels: dict[str, str] | None = None) -> ContentInfo:
        """Verify size and digest, make the blob visible, drop the ingest. Mismatches are
        FailedPrecondition and leave the ingest in place (nothing becomes visible)."""
        if self._closed:
            raise FailedPrecondition(f"writer for ref {self.ref!r} is closed")
        labels = labelutil.validate(dict(labels or {}))
        if expected:
            digests.validate(expected)
        store = self.store
        try:
            if self._shared:
                actual, actual_size = self._shared
                if size and size != actual_size:
                    raise FailedPrecondition(
                        f"ref {self.ref!r}: commit size {size} differs from {actual_size} bytes written"
                    )
                if expected and expected != actual:
                    raise FailedPrecondition(
                        f"ref {self.ref!r}: unexpected commit digest {actual}, expected {expected}"
                    )
            else:
                self._settle()
                self._fp.flush()
                os.fsync(self._fp.fileno())
                actual_size = self.offset
                if size and size != actual_size:
                    raise FailedPrecondition(
                        f"ref {self.ref!r}: unexpected commit size {actual_size}, expected {size}"
                    )
                actual = self.digest()
                if expected and expected != actual:
                    raise FailedPrecondition(
                        f"ref {self.ref!r}: unexpected commit digest {actual}, expected {expected}"
                    )
                self._fp.close()
                self._fp = None
            target = store._disk_path(actual)
            with store.db.transaction() as tx:
                aborted = tx.execute(
                    "DELETE FROM content_ingests WHERE namespace = ? AND ref = ?", (self.ns, self.ref)
                ).rowcount == 0
                if aborted:  # its row kept a shared blob from the GC; its data dir is gone
                    raise NotFound(f"ingest {self.ref!r} was aborted while being written: "
                                   "write it again")
                if self._shared and not _has_size(target, actual_size):
                    raise NotFound(f"content {actual} left the disk before ref {self.ref!r} "
                                   "committed it: write it again")
                store.leases.remove_resource_tx(tx, self.ns, self.lease, INGESTS, self.ref)
                store.leases.add_resource_tx(tx, self.ns, self.lease, CONTENT, actual)
                now = now_ns()
                exists = store._row(tx, self.ns, actual) is not None
                if not exists:
                    if store.namespaces is not None:
                        store.namespaces.ensure(tx, self.ns)
                    tx.execute(
                        "INSERT INTO content_blobs (namespace, digest, size, created_at, updated_at, labels) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (self.ns, actual, actual_size, now, now, json.dumps(labels)),
                    )
                # Last step before COMMIT, so a failing statement above leaves the ingest
                # whole; a crash between rename and COMMIT leaves an unreferenced verified
                # blob, which a writer of the same digest adopts or the GC removes.
                if not self._shared and not target.exists():
                    os.chmod(self.path / "data", 0o444)
                    os.rename(self.path / "data", target)
                    _fsync_dir(target.parent)
            if not self._shared:
                # while the ref is locked: a writer of the same ref opened once close()
                # unlocks it would have its fresh status and data removed here (a crash
                # first: the GC sweeps the directory)
                _remove_ingest_dir(self.path)
            if self._follower is not None:
                self._follower.committed(actual)
                self._follower = None
        finally:
            self.close()
        if exists:
            raise AlreadyExists(f"content {actual} already exists in namespace {self.ns!r}")
        if self.announce and not self._shared:
            for hook in store._commit_hooks:
                hook(actual, target)
        return ContentInfo(actual, actual_size, now, now, labels)

    @_serialized
    def close(self) -> None:
        """Release the ref; the ingest stays on disk for a later resume."""
        if self._closed:
            return
        self._closed = True
        self._settle()
        self._abandon()
        if self._fp is not None:
            try:
                self._fp.flush()
                self._fp.close()
                self._save_status()
            except OSError as exc:
                log.warning("closing ingest %s: %s", self.ref, exc)
            self._fp = None
        self.store._unlock(self.bref)
