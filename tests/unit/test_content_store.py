"""ContentStore on a real temporary root and sqlite database."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from runtimed.content.store import ContentInfo, ContentStore, OutOfRange
from runtimed.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from runtimed.metadata.db import Database
from runtimed.metadata.leases import LeaseStore


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def stores(tmp_path):
    db = Database(tmp_path / "meta.db")
    leases = LeaseStore(db)
    content = ContentStore(tmp_path, db, leases)
    yield content, leases, db
    db.close()


def test_write_commit_info_read(stores, tmp_path):
    content, _, _ = stores
    data = os.urandom(3 * (1 << 20) + 17)
    w = content.writer("default", "ref-1", total=len(data))
    w.write(data[:1000])
    w.write(data[1000:])
    info = w.commit(len(data), digest_of(data), {"a": "b"})
    assert info.digest == digest_of(data) and info.size == len(data)
    path = tmp_path / "content" / "blobs" / "sha256" / digest_of(data)[7:]
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert content.info("default", info.digest).labels == {"a": "b"}
    assert b"".join(content.read_chunks("default", info.digest)) == data
    assert b"".join(content.read_chunks("default", info.digest, 10, 20)) == data[10:30]
    with pytest.raises(OutOfRange):
        list(content.read_chunks("default", info.digest, len(data) + 1))
    assert list(os.scandir(tmp_path / "content" / "ingest")) == []
    with pytest.raises(NotFound):
        content.status("default", "ref-1")


def test_namespaces_see_only_their_commits(stores):
    content, _, _ = stores
    info = content.write_blob("a", b"hello")
    assert content.exists("a", info.digest)
    with pytest.raises(NotFound):
        content.info("b", info.digest)
    with pytest.raises(NotFound):
        content.blob_path("b", info.digest)
    # committing in b without sending data: the blob is shared on disk
    w = content.writer("b", "r", expected=info.digest)
    assert w.status().offset == 5
    assert w.commit(5, info.digest).digest == info.digest
    assert content.info("b", info.digest).size == 5


def test_digest_mismatch_refused_nothing_visible(stores, tmp_path):
    content, _, _ = stores
    w = content.writer("default", "bad")
    w.write(b"some data")
    wrong = digest_of(b"other")
    with pytest.raises(FailedPrecondition, match="unexpected commit digest"):
        w.commit(0, wrong)
    assert content.list("default") == []
    assert list((tmp_path / "content" / "blobs" / "sha256").iterdir()) == []
    with pytest.raises(FailedPrecondition, match="size"):
        w2 = content.writer("default", "bad")
        w2.commit(3)
    assert content.list("default") == []


def test_one_writer_per_ref(stores):
    content, _, _ = stores
    w = content.writer("default", "busy")
    with pytest.raises(Unavailable, match="ref busy locked"):
        content.writer("default", "busy")
    content.writer("other", "busy").close()  # refs are per namespace
    w.close()
    content.writer("default", "busy").close()


def test_resume_rehashes_existing_data(stores):
    content, _, _ = stores
    data = os.urandom(100_000)
    w = content.writer("default", "resume", total=len(data))
    w.write(data[:40_000])
    w.close()  # the client went away
    st = content.status("default", "resume")
    assert (st.offset, st.total) == (40_000, len(data))
    w = content.writer("default", "resume", total=len(data))
    assert w.status().offset == 40_000
    w.write(data[40_000:])
    assert w.commit(len(data), digest_of(data)).digest == digest_of(data)


def test_bookkeeping_lost_to_a_power_cut_reads_as_unknown(stores):
    """The ingest's status file is not fsynced (as containerd's are not): an emptied one
    must not break status, and restarts the ingest instead of trusting it; one that lost
    all but its ref resumes the data there."""
    content, _, _ = stores
    data = os.urandom(50_000)
    w = content.writer("default", "cut", total=len(data))
    w.write(data[:20_000])
    w.close()
    (w.path / "status").write_text('{"ref": "cut"}')
    st = content.status("default", "cut")
    assert (st.offset, st.total) == (20_000, 0)
    w = content.writer("default", "cut", total=len(data))
    assert (w.status().offset, w.status().total) == (20_000, len(data))
    w.close()
    (w.path / "status").write_text("")
    assert content.status("default", "cut").total == 0
    w = content.writer("default", "cut", total=len(data))
    assert w.status().offset == 0
    w.write(data)
    assert w.commit(len(data), digest_of(data)).digest == digest_of(data)


def test_a_writer_of_the_ref_opened_as_a_commit_ends_keeps_its_ingest(stores, monkeypatch):
    """A commit removes its ingest directory while it still holds the ref: a writer of the
    same ref opened the moment the commit let go of it (here: from inside that removal,
    as another thread could) had its fresh status and data removed under it, and its
    own commit failed (FileNotFoundError: INTERNAL)."""
    from runtimed.content import store as store_module
    from runtimed.errors import Unavailable

    content, _, _ = stores
    first, second = os.urandom(3000), os.urandom(2000)
    remove = store_module._remove_ingest_dir
    opened = []  # the writer opened from inside the commit's removal, or None

    def remove_while_another_opens(directory):
        if not opened:  # once: that writer's own open may remove a stale directory
            opened.append(None)
            try:
                opened[0] = content.writer("default", "same-ref")
            except Unavailable:  # the ref is still the committing writer's
                pass
        remove(directory)

    monkeypatch.setattr(store_module, "_remove_ingest_dir", remove_while_another_opens)
    w = content.writer("default", "same-ref")
    w.write(first)
    assert w.commit(len(first), digest_of(first)).digest == digest_of(first)
    later = opened[0] or content.writer("default", "same-ref")
    assert later.status().offset == 0
    later.write(second)
    assert later.commit(len(second), digest_of(second)).digest == digest_of(second)
    assert content.info("default", digest_of(second)).size == len(second)
    assert not later.path.exists()


def test_an_ingest_from_before_the_status_file_resumes(stores):
    """An ingest written before its bookkeeping became one status file (a file per field,
    as containerd's: ref, startedat, updatedat, total) reports its total and start and
    resumes after an upgrade; its commit removes the old files too."""
    content, _, _ = stores
    data = os.urandom(30_000)
    w = content.writer("default", "old", total=len(data))
    w.write(data[:12_000])
    w.close()
    (w.path / "status").unlink()
    for name, value in (("ref", "old"), ("startedat", "1000"), ("updatedat", "2000"),
                        ("total", str(len(data)))):
        (w.path / name).write_text(value)
    st = content.status("default", "old")
    assert (st.offset, st.total, st.started_at) == (12_000, len(data), 1000)
    w = content.writer("default", "old")
    assert (w.status().offset, w.status().total) == (12_000, len(data))
    w.write(data[12_000:])
    assert w.commit(len(data), digest_of(data)).digest == digest_of(data)
    assert not w.path.exists()


def test_truncate_and_abort(stores):
    content, _, _ = stores
    w = content.writer("default", "t")
    w.write(b"garbage")
    w.truncate(0)
    w.write(b"good")
    assert w.digest() == digest_of(b"good")
    w.close()
    assert [s.ref for s in content.list_statuses("default")] == ["t"]
    assert [s.ref for s in content.list_statuses("default", ['ref=="x"'])] == []
    content.abort("default", "t")
    assert content.list_statuses("default") == []
    with pytest.raises(NotFound):
        content.abort("default", "t")


def test_writeback_starts_behind_the_writes(stores, monkeypatch, tmp_path):
    """Every WRITEBACK_EVERY bytes the data written so far is handed to the disk in the
    background (so the fsync at commit has little left), one range after the other,
    restarting after a truncate; the blob is the data, whatever the order of events."""
    from runtimed.content import store as store_mod

    real = store_mod._start_writeback
    ranges = []

    def recording(fd, offset, length):
        ranges.append((offset, length))
        real(fd, offset, length)

    monkeypatch.setattr(store_mod, "_start_writeback", recording)
    content, _, _ = stores
    every = store_mod.WRITEBACK_EVERY
    chunk = os.urandom(1 << 20)
    w = content.writer("default", "wb")
    for _ in range(every * 2 // len(chunk) + 1):
        w.write(chunk)
    w.truncate(0)
    for _ in range(every // len(chunk) + 2):
        w.write(chunk)
    data = chunk * (every // len(chunk) + 2)
    info = w.commit(len(data), digest_of(data))
    assert ranges == [(0, every), (every, every), (0, every)]
    blob = tmp_path / "content" / "blobs" / "sha256" / info.digest[7:]
    assert blob.read_bytes() == data


def test_already_exists(stores):
    content, _, _ = stores
    info = content.write_blob("default", b"x", labels={"k": "1"})
    with pytest.raises(AlreadyExists):
        content.writer("default", "again", expected=info.digest)
    w = content.writer("default", "again2")
    w.write(b"x")
    with pytest.raises(AlreadyExists):
        w.commit()
    again = content.write_blob("default", b"x", expected_digest=info.digest, labels={"j": "2"})
    assert again.labels == {"k": "1", "j": "2"}


def test_update_labels_and_filters(stores):
    content, _, _ = stores
    info = content.write_blob("default", b"abc", labels={"a": "1", "b": "2"})
    got = content.update("default", ContentInfo(info.digest, 0, 0, 0, {"a": "9", "c": "3"}), ["labels.a"])
    assert got.labels == {"a": "9", "b": "2"}
    got = content.update("default", ContentInfo(info.digest, 0, 0, 0, {}), ["labels.b"])
    assert got.labels == {"a": "9"}
    with pytest.raises(InvalidArgument):
        content.update("default", ContentInfo(info.digest, 0, 0, 0, {}), ["size"])
    other = content.write_blob("default", b"def")
    assert [i.digest for i in content.list("default", ['labels.a==9'])] == [info.digest]
    assert [i.digest for i in content.list("default", [f"digest=={other.digest}"])] == [other.digest]
    assert len(content.list("default")) == 2


def test_invalid_digest(stores):
    content, _, _ = stores
    with pytest.raises(InvalidArgument):
        content.info("default", "sha256:xyz")
    with pytest.raises(NotFound):
        content.info("default", "sha512:" + "a" * 128)


def test_lease_records_written_content(stores):
    content, leases, _ = stores
    leases.create("default", "L")
    w = content.writer("default", "leased", lease="L")
    assert [(r.type, r.id) for r in leases.list_resources("default", "L")] == [("ingests", "leased")]
    w.write(b"data")
    info = w.commit()
    assert [(r.type, r.id) for r in leases.list_resources("default", "L")] == [("content", info.digest)]
    with pytest.raises(NotFound, match="lease"):
        content.writer("default", "x", lease="missing")


def test_write_blob_of_content_another_namespace_holds(stores):
    """The bytes are on disk already: the blob is committed in the second namespace
    without being written twice (a shared writer must not be appended to)."""
    content = stores[0]
    data = b"layer" * 1000
    digest = digest_of(data)
    assert content.write_blob("a", data, expected_digest=digest, expected_size=len(data)).size == len(data)
    info = content.write_blob("b", data, expected_digest=digest, expected_size=len(data), labels={"k": "v"})
    assert (info.size, info.labels) == (len(data), {"k": "v"})
    with content.open_blob("b", digest) as f:
        assert f.read() == data


def test_a_writer_whose_ingest_was_aborted_commits_nothing(stores, tmp_path):
    """Content.Abort does not wait for the ref's writer (as containerd's does not). A shared
    writer's ingest row was all that kept its blob from the GC: once aborted, the blob may
    go, and the commit must not list it (it did: a row with no file). A writer with data
    finds its ingest directory gone (it failed with FileNotFoundError: INTERNAL)."""
    from runtimed.metadata.gc import GarbageCollector
    from runtimed.metadata.images import ImageStore

    content, _, db = stores
    ImageStore(db)
    gc = GarbageCollector(db, content)
    data = b"shared" * 100
    digest = digest_of(data)
    content.write_blob("a", data, expected_digest=digest)
    w = content.writer("b", "r", expected=digest)
    assert w.shared
    content.abort("b", "r")
    content.delete("a", digest)  # nothing holds the blob now
    assert gc.collect().swept == [f"content/{digest}"]
    with pytest.raises(NotFound, match="aborted"):
        w.commit(len(data), digest)
    assert content.list("b") == []

    w = content.writer("b", "r2")
    w.write(b"abc")
    content.abort("b", "r2")
    with pytest.raises(NotFound, match="aborted"):
        w.commit(3)
    assert content.list("b") == [] and content.list_statuses("b") == []
    assert list((tmp_path / "content" / "blobs" / "sha256").iterdir()) == []
    gc.close()


def test_a_shared_blob_gone_from_disk_is_not_committed(stores, tmp_path):
    """The row of a shared commit is written only while the blob is on disk whole."""
    content = stores[0]
    data = b"gone" * 100
    digest = digest_of(data)
    content.write_blob("a", data, expected_digest=digest)
    w = content.writer("b", "r", expected=digest)
    assert w.shared
    path = tmp_path / "content" / "blobs" / "sha256" / digest[7:]
    path.unlink()
    with pytest.raises(NotFound, match="left the disk"):
        w.commit(len(data), digest)
    assert content.list("b") == []
    assert [s.ref for s in content.list_statuses("b")] == []  # its status needs the blob
