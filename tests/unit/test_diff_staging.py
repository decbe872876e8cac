"""Layers staged at their commit (diff/staging.py): moved into place by Diff.Apply only
when the tree is the one an apply would write, else extracted again; never left behind."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import types
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from isal import igzip

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_diff_property import build, trees  # noqa: E402
from test_layer_builder import E, d, tar  # noqa: E402

from runtimed.content.store import ContentStore  # noqa: E402
from runtimed.diff import staging  # noqa: E402
from runtimed.diff.apply import adopt_parents, apply_layer  # noqa: E402
from runtimed.diff.differ import Differ  # noqa: E402
from runtimed.diff.stager import Stager  # noqa: E402
from runtimed.diff.staging import STAGED_DIR  # noqa: E402
from runtimed.errors import InvalidArgument, NotFound  # noqa: E402
from runtimed.images.manifest import Descriptor  # noqa: E402
from runtimed.metadata.db import Database  # noqa: E402
from runtimed.metadata.leases import LeaseStore  # noqa: E402
from runtimed.snapshots.mount import Mount  # noqa: E402

GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


@pytest.fixture
def env(tmp_path):
    db = Database(tmp_path / "meta.db")
    content = ContentStore(tmp_path, db, LeaseStore(db))
    differ = Differ(content, tmp_path / "tmpmounts")
    yield content, differ
    differ.staged.close()
    db.close()


def commit(content, data: bytes, ns: str = "default", announce: bool = True) -> Descriptor:
    w = content.writer(ns, f"ref-{os.urandom(4).hex()}", announce=announce)
    w.write(data)
    info = w.commit(len(data))
    return Descriptor(GZIP_LAYER, info.digest, info.size)


def settled(differ) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with differ.staged._lock:
            # the stager answered for all, and those dropped are removed
            if all(e.result is not None for e in differ.staged._entries.values()):
                return
        time.sleep(0.01)
    raise AssertionError(f"staging did not finish: {differ.staged._entries}")


def staged_dirs(differ) -> list[str]:
    path = differ.tmp_dir / STAGED_DIR
    return os.listdir(path) if path.exists() else []


def tree(root: Path, skip_mtime: set[str] = frozenset()) -> dict:
    """Everything an apply decides about a tree (not ctimes; inode numbers as link
    groups)."""
    out, inodes = {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            xattrs = {k: os.getxattr(path, k, follow_symlinks=False)
                      for k in os.listxattr(path, follow_symlinks=False)}
            data = (path.read_bytes() if stat.S_ISREG(st.st_mode)
                    else os.readlink(path) if stat.S_ISLNK(st.st_mode) else None)
            group = inodes.setdefault(st.st_ino, rel) if stat.S_ISREG(st.st_mode) else None
            whiteout = stat.S_ISCHR(st.st_mode) and st.st_rdev == 0  # made "now"
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                        st.st_gid, st.st_rdev, xattrs, data, group,
                        None if rel in skip_mtime or whiteout else st.st_mtime_ns)
    return out


LAYER = tar(
    E("top/file", data=b"content " * 1000, mode=0o640, uid=12, gid=34,
      xattrs={"user.k": b"v"}),
    E("top/hard", tarfile.LNKTYPE, linkname="top/file"),
    E("top/sym", tarfile.SYMTYPE, linkname="file"),
    d("dir", mode=0o750, uid=5, gid=6, mtime=1_500_000_000),
    E("dir/exe", data=b"#!/bin/sh\n", mode=0o4755),
)


def test_staged_layer_over_lowers_is_the_tree_an_apply_writes(env, tmp_path):
    """The layer lacks its `top` directory: over a lower that has one, `top` takes the
    lower's owner, mode and xattrs whether the layer was staged or extracted."""
    content, differ = env
    desc = commit(content, igzip.compress(LAYER))
    lower = tmp_path / "lower"
    (lower / "top").mkdir(parents=True)
    os.chown(lower / "top", 7, 8)
    os.chmod(lower / "top", 0o711)
    os.setxattr(lower / "top", "user.lower", b"1")
    settled(differ)
    assert len(staged_dirs(differ)) == 1
    # a mark no extraction writes: finding it in the target proves the staged tree was moved
    staged_file = differ.tmp_dir / STAGED_DIR / staged_dirs(differ)[0] / "top" / "file"
    os.setxattr(staged_file, "user.test-staged", b"1")
    upper = tmp_path / "upper"
    upper.mkdir()
    os.chmod(upper, 0o755)
    mounts = [Mount("overlay", "overlay", [f"lowerdir={lower}", f"upperdir={upper}",
                                           f"workdir={tmp_path / 'work'}"])]
    applied = differ.apply("default", desc, mounts)
    assert staged_dirs(differ) == []
    assert os.getxattr(upper / "top" / "file", "user.test-staged") == b"1"
    os.removexattr(upper / "top" / "file", "user.test-staged")
    assert applied.digest == "sha256:" + hashlib.sha256(LAYER).hexdigest()
    assert applied.size == len(LAYER)

    expected = tmp_path / "expected"
    expected.mkdir()
    apply_layer(open(content.blob_path("default", desc.digest), "rb"), expected, overlay=True,
                parents=[str(lower)])
    # `top`'s mtime is when the apply created its entries: the one thing that differs
    assert tree(upper, {"top"}) == tree(expected, {"top"})
    top = os.lstat(upper / "top")
    assert (top.st_uid, top.st_gid, stat.S_IMODE(top.st_mode)) == (7, 8, 0o711)
    assert os.getxattr(upper / "top", "user.lower") == b"1"
    assert stat.S_IMODE(os.lstat(upper).st_mode) == 0o755


@pytest.mark.parametrize("layer", [
    # the parent comes after what is in it: its own entry decides, not the lower
    tar(E("a/b/file", data=b"1"), d("a", mode=0o700, uid=9, gid=9)),
    # a parent the layer lacks, then replaced by a file
    tar(E("a/b/file", data=b"1"), E("a/.wh.b"), E("a/b", data=b"now a file")),
    # of two it lacks, the inner one comes later
    tar(E("a/b/c/file", data=b"1"), d("a/b", mode=0o701, uid=2, gid=2)),
], ids=["explicit-later", "replaced", "inner-later"])
def test_missing_parents_end_as_an_extraction_over_lowers_leaves_them(env, tmp_path, layer):
    content, differ = env
    desc = commit(content, igzip.compress(layer))
    lower = tmp_path / "lower"
    (lower / "a" / "b").mkdir(parents=True)
    os.chown(lower / "a", 7, 8)
    os.chmod(lower / "a", 0o711)
    os.chown(lower / "a" / "b", 3, 4)
    os.setxattr(lower / "a" / "b", "user.b", b"x")
    settled(differ)
    upper = tmp_path / "upper"
    upper.mkdir()
    mounts = [Mount("overlay", "overlay", [f"lowerdir={lower}", f"upperdir={upper}",
                                           f"workdir={tmp_path / 'work'}"])]
    differ.apply("default", desc, mounts)
    assert staged_dirs(differ) == []
    expected = tmp_path / "expected"
    expected.mkdir()
    apply_layer(open(content.blob_path("default", desc.digest), "rb"), expected, overlay=True,
                parents=[str(lower)])
    made = {"a", "a/b", "a/b/c"}  # mtimes: when the apply created entries in them
    assert tree(upper, made) == tree(expected, made)


def test_a_plain_directory_gets_the_staged_tree_unless_the_layer_has_whiteouts(env, tmp_path):
    content, differ = env
    plain = commit(content, igzip.compress(LAYER))
    with_whiteout = tar(E("a", data=b"x"), E(".wh.gone"), d("o"), E("o/.wh..wh..opq"))
    whiteouts = commit(content, igzip.compress(with_whiteout))
    settled(differ)
    assert len(staged_dirs(differ)) == 2
    for desc in (plain, whiteouts):
        target = tmp_path / desc.digest[7:15]
        target.mkdir()
        differ.apply("default", desc, [Mount("bind", str(target), ["rw", "rbind"])])
        expected = tmp_path / (desc.digest[7:15] + "-expected")
        expected.mkdir()
        apply_layer(open(content.blob_path("default", desc.digest), "rb"), expected)
        assert tree(target, {"top"}) == tree(expected, {"top"})
    # staged in overlay mode, the whiteout is a 0/0 device there: not what a bind gets
    assert sorted(os.listdir(tmp_path / whiteouts.digest[7:15])) == ["a", "o"]
    assert staged_dirs(differ) == []


def test_a_target_that_is_not_empty_is_applied_onto(env, tmp_path):
    content, differ = env
    desc = commit(content, igzip.compress(LAYER))
    settled(differ)
    target = tmp_path / "target"
    target.mkdir()
    (target / "mine").write_text("kept")
    differ.apply("default", desc, [Mount("bind", str(target), ["rw", "rbind"])])
    assert (target / "mine").read_text() == "kept"
    assert (target / "top" / "file").read_bytes() == b"content " * 1000
    assert staged_dirs(differ) == []


def test_the_namespace_must_hold_the_blob(env, tmp_path):
    content, differ = env
    desc = commit(content, igzip.compress(LAYER), ns="a")
    settled(differ)
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(NotFound):
        differ.apply("b", desc, [Mount("bind", str(target), ["rw", "rbind"])])
    assert os.listdir(target) == []


def test_only_announced_layers_are_staged_and_unused_ones_expire(env):
    content, differ = env
    differ.staged.ttl = 0.2
    commit(content, igzip.compress(LAYER), announce=False)
    commit(content, b'{"schemaVersion": 2}')  # not a layer
    settled(differ)
    assert staged_dirs(differ) == []
    commit(content, igzip.compress(tar(E("other", data=b"1"))))
    settled(differ)
    assert len(staged_dirs(differ)) == 1
    deadline = time.monotonic() + 10
    while staged_dirs(differ) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert staged_dirs(differ) == [] and differ.staged.pending() == 0


def test_a_broken_layer_is_not_staged_and_apply_reports_it(env, tmp_path):
    content, differ = env
    desc = commit(content, igzip.compress(LAYER)[:-40])
    settled(differ)
    assert staged_dirs(differ) == []
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(InvalidArgument):
        differ.apply("default", desc, [Mount("bind", str(target), ["rw", "rbind"])])


def test_start_removes_what_a_crash_left_staged(tmp_path):
    tmp = tmp_path / "tmpmounts"
    (tmp / STAGED_DIR / "half-applied" / "usr").mkdir(parents=True)
    Differ(None, tmp)
    assert os.listdir(tmp) == []


def test_staging_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNTIMED_LAYER_STAGING", "0")
    db = Database(tmp_path / "meta.db")
    content = ContentStore(tmp_path, db, LeaseStore(db))
    differ = Differ(content, tmp_path / "tmpmounts")
    commit(content, igzip.compress(LAYER))
    settled(differ)
    assert staged_dirs(differ) == []
    db.close()


def test_an_ingest_is_staged_as_it_arrives_and_dropped_when_abandoned(env, tmp_path):
    """Written in pieces, restarted at offset 0 once, resumed after a disconnect: only
    what was committed is staged, and nothing of the abandoned attempts stays."""
    content, differ = env
    first = igzip.compress(tar(E("old", data=os.urandom(300_000))))
    blob = igzip.compress(tar(E("top/file", data=os.urandom(200_000))))
    w = content.writer("default", "pieces", announce=True)
    w.write(first[:1000])
    w.write(first[1000:5000])
    w.truncate(0)  # the client starts over: the first staging is dropped
    w.write(blob[:700])
    w.write(blob[700:1500])
    w.close()  # a disconnect: dropped as well
    settled(differ)
    assert staged_dirs(differ) == []
    w = content.writer("default", "pieces", announce=True)  # resumes at 1500
    assert w.offset == 1500
    w.write(blob[1500:])
    info = w.commit(len(blob))  # staged from the committed blob instead
    settled(differ)
    assert len(staged_dirs(differ)) == 1
    w = content.writer("default", "streamed", announce=True)
    other = igzip.compress(tar(E("new", data=b"n" * 5000)))
    for i in range(0, len(other), 100):
        w.write(other[i:i + 100])
    # staged as it arrives, not only at the commit
    assert [e.digest for e in differ.staged._entries.values() if not e.done.is_set()] == [None]
    streamed = w.commit(len(other))
    settled(differ)
    assert len(staged_dirs(differ)) == 2
    for blob_info, name in ((info, "top"), (streamed, "new")):
        target = tmp_path / blob_info.digest[7:15]
        target.mkdir()
        desc = Descriptor(GZIP_LAYER, blob_info.digest, blob_info.size)
        differ.apply("default", desc, [Mount("bind", str(target), ["rw", "rbind"])])
        assert name in os.listdir(target)
    assert staged_dirs(differ) == []
    assert (tmp_path / streamed.digest[7:15] / "new").read_bytes() == b"n" * 5000


def resident(path) -> int:
    """Bytes of the file in the page cache: mincore(2) over a mapping of it."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as f:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
    assert address not in (None, ctypes.c_void_p(-1).value)
    try:
        vector = ctypes.create_string_buffer(pages)
        assert libc.mincore(address, size, vector) == 0, os.strerror(ctypes.get_errno())
        return sum(byte & 1 for byte in vector.raw) * mmap.PAGESIZE
    finally:
        libc.munmap(address, size)


def test_what_the_stager_read_leaves_the_page_cache():
    """A staged blob is seldom read again: the stager drops what it read, DROP_BEHIND
    behind itself, and the rest when it is done."""
    from runtimed.diff.stager import DROP_BEHIND, Growing

    size = 5 * DROP_BEHIND
    buffer = bytearray(1 << 20)
    # on a disk's filesystem, as the content store is: a tmpfs keeps its pages (a tmpfs /tmp)
    with tempfile.NamedTemporaryFile(dir="/var/tmp") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())  # written back: as the daemon's writeback leaves it
        assert resident(f.name) == size
        source = Growing(f.name)
        source.update(limit=size // 2)
        while source.pos < size // 2:
            source.readinto(buffer)
        assert resident(f.name) <= size - (size // 2 - 2 * DROP_BEHIND)  # read, then dropped
        assert resident(f.name) >= size // 2  # not what is still to be read
        source.update(limit=size, final=True)
        while source.readinto(buffer):
            pass
        source.close()
        assert resident(f.name) == 0


# -- property: staged, then adopted over the lowers == extracted over the lowers ----------

_names = st.sampled_from(["a", "b", "c"])
_paths = st.lists(_names, min_size=1, max_size=3).map("/".join)
_entries = st.one_of(
    st.builds(lambda p, m, o: E(p, data=b"f", mode=m, uid=o, gid=o), _paths,
              st.sampled_from([0o644, 0o4755]), st.sampled_from([0, 1000])),
    st.builds(lambda p, m, o: d(p, mode=m, uid=o, gid=o), _paths,
              st.sampled_from([0o755, 0o700, 0o2775]), st.sampled_from([0, 1000])),
    st.builds(lambda p: E(p, tarfile.SYMTYPE, linkname="x"), _paths),
    st.builds(lambda p: E("/".join([*p.split("/")[:-1], ".wh." + p.split("/")[-1]])), _paths),
    st.builds(lambda p: E(p + "/.wh..wh..opq"), _paths),
)


@settings(max_examples=60, deadline=None)
@given(trees, st.lists(_entries, min_size=1, max_size=6))
def test_staged_layers_adopted_over_random_lowers_match_an_extraction(lower_tree, entries):
    layer = tar(*entries)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        base = Path(tmp)
        lower, direct, staged = base / "lower", base / "direct", base / "staged"
        for p in (lower, direct, staged):
            p.mkdir()
        build(lower, (lower_tree, []))
        try:
            expected = apply_layer(io.BytesIO(layer), direct, overlay=True, parents=[str(lower)])
        except InvalidArgument:
            expected = None
        try:
            result = apply_layer(io.BytesIO(layer), staged, overlay=True, parents=[])
        except InvalidArgument:
            return  # not staged: Apply extracts
        usable = not result.rewrote_parent and adopt_parents(staged, result.made_parents,
                                                              [str(lower)])
        if expected is None:
            assert not usable  # what an extraction refuses is never staged instead
            return
        if not usable:
            return  # extracted instead
        assert (result.digest, result.made_parents) == (expected.digest, expected.made_parents)
        made = set(result.made_parents)  # their mtimes: when the apply created entries
        assert tree(staged, made) == tree(direct, made)


def test_a_stager_that_dies_costs_only_its_stagings(env, tmp_path):
    """Killed while it follows an ingest: that staging is lost, and the commit stages the
    blob again in a new stager."""
    content, differ = env
    blob = igzip.compress(tar(E("top/file", data=os.urandom(300_000))))
    w = content.writer("default", "dies", announce=True)
    w.write(blob[:1000])
    helper = differ.staged._helper
    helper.kill()
    helper.wait()
    w.write(blob[1000:])
    info = w.commit(len(blob))
    settled(differ)
    assert len(staged_dirs(differ)) == 1 and differ.staged._helper is not helper
    target = tmp_path / "target"
    target.mkdir()
    desc = Descriptor(GZIP_LAYER, info.digest, info.size)
    differ.apply("default", desc, [Mount("bind", str(target), ["rw", "rbind"])])
    assert staged_dirs(differ) == []
    assert len((target / "top" / "file").read_bytes()) == 300_000


def test_a_stager_that_stops_reading_never_stalls_the_writes(env, tmp_path):
    """Writes tell the stager of their progress through a pipe: once that pipe is full
    the stager is killed, not waited for; the layer is then staged again at its commit."""
    content, differ = env
    blob = igzip.compress(tar(E("top/file", data=os.urandom(400_000))))
    w = content.writer("default", "stalled", announce=True)
    w.write(blob[:512])
    helper = differ.staged._helper
    os.kill(helper.pid, signal.SIGSTOP)
    chunks = [blob[i:i + 64] for i in range(512, len(blob), 64)]  # ~6,000 notices
    writer = threading.Thread(target=lambda: [w.write(c) for c in chunks])
    writer.start()
    writer.join(60)
    assert not writer.is_alive()
    helper.wait(10)
    assert helper.returncode == -signal.SIGKILL
    info = w.commit(len(blob))
    settled(differ)
    assert len(staged_dirs(differ)) == 1
    target = tmp_path / "target"
    target.mkdir()
    desc = Descriptor(GZIP_LAYER, info.digest, info.size)
    differ.apply("default", desc, [Mount("bind", str(target), ["rw", "rbind"])])
    assert len((target / "top" / "file").read_bytes()) == 400_000


def test_an_idle_stager_exits_and_the_next_layer_starts_another(env, monkeypatch):
    content, differ = env
    commit(content, igzip.compress(LAYER))
    settled(differ)
    first = differ.staged._helper
    first.stdin.close()  # as when it exits idle: the next layer finds it gone
    first.wait(10)
    commit(content, igzip.compress(tar(E("next", data=b"n"))))
    settled(differ)
    assert differ.staged._helper is not first
    assert len(staged_dirs(differ)) == 2


def _timers() -> set:
    return {t for t in threading.enumerate() if isinstance(t, threading.Timer)}


def test_a_failed_or_dropped_staging_is_released_at_once(env):
    """Only a finished staging nobody took waits for the TTL: a failed one (a broken
    layer) or a dropped one (an ingest closed before its commit) frees its slot and its
    directory as soon as the stager answers, and leaves no timer behind."""
    content, differ = env
    differ.staged.max_entries = 1
    before = _timers()
    commit(content, igzip.compress(LAYER)[:-40])
    settled(differ)
    assert differ.staged.pending() == 0 and staged_dirs(differ) == []
    w = content.writer("default", "dropped", announce=True)
    w.write(igzip.compress(LAYER)[:1000])
    assert differ.staged.pending() == 1  # the one slot was free again: it is followed
    w.close()
    settled(differ)
    assert differ.staged.pending() == 0 and staged_dirs(differ) == []
    assert _timers() - before == set()
    commit(content, igzip.compress(tar(E("next", data=b"n"))))
    settled(differ)
    assert differ.staged.pending() == 1 and len(staged_dirs(differ)) == 1
    assert len(_timers() - before) == 1  # a finished staging waits for the TTL


def test_the_same_blob_followed_twice_is_staged_once(env, tmp_path):
    content, differ = env
    blob = igzip.compress(LAYER)
    commit(content, blob, ns="a")
    desc = commit(content, blob, ns="b")
    settled(differ)
    assert differ.staged.pending() == 1 and len(staged_dirs(differ)) == 1
    target = tmp_path / "target"
    target.mkdir()
    differ.apply("b", desc, [Mount("bind", str(target), ["rw", "rbind"])])
    assert (target / "top" / "file").read_bytes() == b"content " * 1000
    assert differ.staged.pending() == 0 and staged_dirs(differ) == []


def test_a_dead_stagers_reader_fails_only_what_was_sent_to_it(env):
    """A stager died and the next layer started another before the first one's reader
    came to its end: that reader leaves the new stager's stagings alone."""
    content, differ = env
    commit(content, igzip.compress(LAYER))
    settled(differ)
    first = differ.staged._helper
    first.kill()
    first.wait()
    blob = igzip.compress(tar(E("top/file", data=os.urandom(300_000))))
    w = content.writer("default", "late", announce=True)
    w.write(blob[:1000])
    assert differ.staged._helper is not first
    differ.staged._read(first)  # its reader comes to its end only now
    running = [e for e in differ.staged._entries.values() if not e.done.is_set()]
    assert [e.digest for e in running] == [None] and len(staged_dirs(differ)) == 2
    w.write(blob[1000:])
    w.commit(len(blob))
    settled(differ)
    assert running[0].result is not None and len(staged_dirs(differ)) == 2


def test_a_staging_apply_gave_up_on_is_removed_once_the_stager_is_done(env, tmp_path,
                                                                       monkeypatch):
    """Diff.Apply waits for a running staging at most WAIT_TIMEOUT, then extracts the
    layer itself: the staging is removed when the stager answers (not under it, and not
    left behind)."""
    content, differ = env
    commit(content, igzip.compress(LAYER))
    settled(differ)
    helper = differ.staged._helper
    monkeypatch.setattr(staging, "WAIT_TIMEOUT", 0.1)
    os.kill(helper.pid, signal.SIGSTOP)
    try:
        desc = commit(content, igzip.compress(tar(E("slow", data=b"s" * 1000))))
        target = tmp_path / "target"
        target.mkdir()
        differ.apply("default", desc, [Mount("bind", str(target), ["rw", "rbind"])])
        assert (target / "slow").read_bytes() == b"s" * 1000
        assert len(staged_dirs(differ)) == 2
    finally:
        os.kill(helper.pid, signal.SIGCONT)
    settled(differ)
    assert differ.staged.pending() == 1 and len(staged_dirs(differ)) == 1  # LAYER's


def test_a_stager_whose_daemon_died_removes_what_it_was_staging(tmp_path):
    """Its stdin closes with a layer half applied: it stops, removes that directory
    (the daemon's next start may have emptied `.staged` already) and exits."""
    data = tmp_path / "data"
    layer = tar(E("small", data=b"s"), E("big", data=os.urandom(4 << 20)))
    data.write_bytes(igzip.compress(layer)[:3_000_000])  # its reads go by the MiB
    root = tmp_path / "root"
    root.mkdir()
    stager = subprocess.Popen([sys.executable, "-m", "runtimed.diff.stager"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    for message in ({"op": "start", "id": 1, "path": str(data), "root": str(root)},
                    {"op": "grow", "id": 1, "limit": 3_000_000}):
        stager.stdin.write(json.dumps(message).encode() + b"\n")
    stager.stdin.flush()
    deadline = time.monotonic() + 20
    while not os.listdir(root) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "small" in os.listdir(root)  # it is applying, waiting for more of the blob
    stager.stdin.close()
    assert stager.wait(30) == 0
    assert not root.exists()
    assert stager.stdout.read() == b""  # nobody to answer
    stager.stdout.close()


def test_a_stager_that_cannot_answer_removes_what_it_staged(tmp_path):
    """The daemon died after a staging finished but before the stager saw its stdin
    close: the answer fails (EPIPE), and the stager removes that directory itself
    (nobody else will: the daemon's next start may have emptied `.staged` already)."""
    data = tmp_path / "data"
    blob = igzip.compress(LAYER)
    data.write_bytes(blob)
    root = tmp_path / "root"
    root.mkdir()
    stager = subprocess.Popen([sys.executable, "-m", "runtimed.diff.stager"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    stager.stdout.close()  # the daemon's end of the answers is gone; its stdin not yet
    try:
        stager.stdin.write(json.dumps({"op": "start", "id": 1, "path": str(data),
                                       "root": str(root), "limit": len(blob),
                                       "final": True}).encode() + b"\n")
        stager.stdin.flush()
        deadline = time.monotonic() + 20
        while root.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not root.exists()
    finally:
        stager.stdin.close()
        assert stager.wait(30) == 0
    assert not root.exists()


def test_a_dropped_staging_being_removed_is_not_the_blobs_staging(env, tmp_path,
                                                                   monkeypatch):
    """While the directory of a dropped staging (here: the stager did not take it) is
    being removed, the blob is offered again (committed in another namespace): it is
    staged anew, not refused as a duplicate of the one going away."""
    content, differ = env
    staged = differ.staged
    desc = commit(content, igzip.compress(LAYER), announce=False)  # not staged
    path = content.blob_path("default", desc.digest)
    write, refused, again = staged._write, [], []
    # (an instance attribute: called as a plain function, like the static method)
    monkeypatch.setattr(staged, "_write", lambda helper, message: (
        False if message["op"] == "start" and not refused and not refused.append(1)
        else write(helper, message)))
    real_rmtree = shutil.rmtree

    def rmtree(directory, ignore_errors=False):
        if refused and not again:  # the dropped one's: offer the blob again meanwhile
            again.append(staged._find(desc.digest))
            staged.offer(desc.digest, path)
        real_rmtree(directory, ignore_errors=ignore_errors)

    monkeypatch.setattr(staging, "shutil", types.SimpleNamespace(rmtree=rmtree))
    staged.offer(desc.digest, path)
    assert refused and again  # (the offer ran while the directory was being removed)
    settled(differ)
    assert staged.pending() == 1 and len(staged_dirs(differ)) == 1
    target = tmp_path / "target"
    target.mkdir()
    differ.apply("default", desc, [Mount("bind", str(target), ["rw", "rbind"])])
    assert (target / "top" / "file").read_bytes() == b"content " * 1000
    assert staged.pending() == 0 and staged_dirs(differ) == []


def _frames(thread: threading.Thread) -> list[str]:
    frame, names = sys._current_frames().get(thread.ident), []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    return names


def test_stop_waits_for_a_staging_still_answering(tmp_path):
    """A job leaves the stager's table only once it answered or removed its directory:
    stop() (the daemon is gone) waits for one still writing its answer into a full pipe,
    which then fails and removes the directory; the stager exits only after."""
    data = tmp_path / "data"
    blob = igzip.compress(LAYER)
    data.write_bytes(blob)
    root = tmp_path / "root"
    root.mkdir()
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b"x" * 65536)  # the daemon reads no answers
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    stager = Stager(w)
    stopper = threading.Thread(target=stager.stop)
    try:
        stager.handle({"op": "start", "id": 1, "path": str(data), "root": str(root),
                       "limit": len(blob), "final": True})
        job = stager.jobs[1][1]
        deadline = time.monotonic() + 20
        while "answer" not in _frames(job) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "answer" in _frames(job)  # its answer waits for room in the pipe
        stopper.start()
        while (stopper.is_alive() and "join" not in _frames(stopper)
               and time.monotonic() < deadline):
            time.sleep(0.01)
        waited = stopper.is_alive()  # (or it returned with the job still running)
    finally:
        os.close(r)  # the daemon's end goes: the answer fails
        if stopper.ident is not None:
            stopper.join(30)
        os.close(w)
    assert waited
    assert not job.is_alive() and not root.exists()
