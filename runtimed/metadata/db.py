"""One sqlite database (WAL) for all metadata, with per-component versioned schemas.

Each store (namespaces, images, leases, ...) owns its tables and declares its migrations
as an ordered list of SQL scripts; `Database.migrate` applies the ones not yet applied, in
one transaction each, and records the component's version. Components thus evolve their
schemas independently and a database written by an older runtimed is upgraded on start.

All access goes through one connection guarded by a re-entrant lock: mutations are short,
and one writer at a time is what sqlite allows anyway. `run` executes a short operation
on the event loop itself when the lock is free (see there).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def now_ns() -> int:
    return time.time_ns()


class Database:
    def __init__(self, path: Path | str):
        self.path = str(path)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_versions (component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
        )
        self._depth = 0

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def migrate(self, component: str, migrations: list[str]) -> None:
        """Apply `migrations[version:]` for `component`, each in its own transaction."""
        with self._lock:
            row = self._conn.execute(
                "SELECT version FROM schema_versions WHERE component = ?", (component,)
            ).fetchone()
            version = row[0] if row else 0
            for index in range(version, len(migrations)):
                with self.transaction() as tx:
                    for statement in _statements(migrations[index]):
                        tx.execute(statement)
                    tx.execute(
                        "INSERT INTO schema_versions (component, version) VALUES (?, ?) "
                        "ON CONFLICT(component) DO UPDATE SET version = excluded.version",
                        (component, index + 1),
                    )

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE); nested calls join the outer one."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self._conn
                finally:
                    self._depth -= 1
                return
            self._conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")
            finally:
                self._depth = 0

    async def run(self, fn: Callable[..., T], /, *args) -> T:
        """`fn(*args)`, a short metadata operation (a point read, a one-row write), run on
        the calling event loop while the database is free: a query costs tens of
        microseconds, a hop to a worker thread and back ~0.1 ms of CPU and seven context
        switches. While another thread holds the database (a long transaction: GC,
        unpack, a big list) it runs in a worker thread, so the loop never waits."""
        if self._lock.acquire(blocking=False):
            try:
                return fn(*args)
            finally:
                self._lock.release()
        return await asyncio.to_thread(fn, *args)

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """Reads share the connection; the lock keeps them off a concurrent write."""
        with self._lock:
            yield self._conn


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
