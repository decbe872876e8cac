"""Database.run: short operations run on the event loop while the database is free, and in
a worker thread while another thread holds it (the loop never waits on the lock)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from runtimed.errors import NotFound
from runtimed.metadata.db import Database


def _query_thread(db: Database) -> int:
    with db.read():
        return threading.get_ident()


@pytest.fixture
def db(tmp_path):
    database = Database(tmp_path / "meta.db")
    yield database
    database.close()


def test_run_inline_while_free(db):
    async def main():
        return await db.run(_query_thread, db)

    assert asyncio.run(main()) == threading.get_ident()


def test_run_in_worker_while_another_thread_holds_the_database(db):
    held, release = threading.Event(), threading.Event()

    def long_transaction():
        with db.transaction():
            held.set()
            release.wait(10)

    holder = threading.Thread(target=long_transaction)
    holder.start()
    held.wait(10)

    async def main():
        task = asyncio.create_task(db.run(_query_thread, db))
        await asyncio.sleep(0.05)
        loop_free = not task.done()  # the loop kept running while the query waited
        release.set()
        return loop_free, await task

    try:
        loop_free, ran_on = asyncio.run(main())
    finally:
        release.set()
        holder.join()
    assert loop_free
    assert ran_on not in (threading.get_ident(), holder.ident)


def test_run_raises_what_the_operation_raises_and_releases_the_lock(db):
    def missing():
        raise NotFound("lease 'x' not found")

    async def main():
        with pytest.raises(NotFound):
            await db.run(missing)

    asyncio.run(main())
    acquired = []

    def other_thread():
        acquired.append(db._lock.acquire(timeout=5))
        if acquired[0]:
            db._lock.release()

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert acquired == [True]
