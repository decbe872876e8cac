"""The snapshotter conformance suite: every implementation must pass all of it.

A test module imports these functions (`from snapshotter_suite import *`) and provides a
`snapshotter` fixture yielding a fresh implementation; the `mnt` fixture here mounts
snapshots in a temporary directory and unmounts everything afterwards.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

import pytest

from runtimed.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from runtimed.snapshots import mount as mountlib
from runtimed.snapshots.base import Info, Kind

NS = "default"


@pytest.fixture
def mnt(tmp_path):
    """mnt(mounts) -> a directory where `mounts` are mounted until the test ends."""
    targets: list[Path] = []

    def do(mounts) -> Path:
        target = tmp_path / f"mnt{len(targets)}"
        target.mkdir()
        mountlib.mount_all(mounts, target)
        targets.append(target)
        return target

    yield do
    for target in reversed(targets):
        mountlib.unmount_all(target)
    leftover = [p for p in mountlib.mountpoints() if p.startswith(str(tmp_path))]
    assert not leftover, f"mounts left behind: {leftover}"


def unmount(target: Path) -> None:
    mountlib.unmount_all(target)


def layer(snapshotter, mnt, name, parent, files: dict[str, bytes | None]) -> str:
    """Commit a snapshot `name` on `parent` with files written (None deletes)."""
    key = f"{name}-active"
    target = mnt(snapshotter.prepare(NS, key, parent))
    for rel, data in files.items():
        path = target / rel
        if data is None:
            os.unlink(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    unmount(target)
    snapshotter.commit(NS, name, key)
    return name


def test_prepare_write_commit_view(snapshotter, mnt):
    target = mnt(snapshotter.prepare(NS, "a", labels={"x": "1"}))
    (target / "hello").write_text("world")
    os.mkdir(target / "dir", 0o700)
    unmount(target)
    info = snapshotter.commit(NS, "base", "a", labels={"y": "2"})
    assert info.kind == Kind.COMMITTED and info.labels == {"y": "2"}
    with pytest.raises(NotFound):
        snapshotter.stat(NS, "a")

    view = mnt(snapshotter.view(NS, "v", "base"))
    assert (view / "hello").read_text() == "world"
    assert stat.S_IMODE(os.stat(view / "dir").st_mode) == 0o700
    with pytest.raises(OSError) as err:
        (view / "new").write_text("x")
    assert err.value.errno == errno.EROFS
    assert snapshotter.stat(NS, "v").kind == Kind.VIEW
    assert snapshotter.stat(NS, "v").parent == "base"


def test_layers_stack_and_deletions_hide_lower_files(snapshotter, mnt):
    layer(snapshotter, mnt, "l1", "", {"a": b"1", "d/b": b"2", "keep": b"k"})
    layer(snapshotter, mnt, "l2", "l1", {"a": None, "d/b": b"22", "c": b"3"})
    target = mnt(snapshotter.prepare(NS, "top", "l2"))
    assert sorted(os.listdir(target)) == ["c", "d", "keep"]
    assert (target / "d" / "b").read_bytes() == b"22"
    (target / "keep").write_bytes(b"changed")
    # the committed lower layers are untouched by writes on top
    view = mnt(snapshotter.view(NS, "v1", "l1"))
    assert (view / "keep").read_bytes() == b"k"
    assert (view / "a").read_bytes() == b"1"


def test_keys_are_per_namespace(snapshotter):
    snapshotter.prepare("ns1", "same")
    snapshotter.prepare("ns2", "same")
    with pytest.raises(AlreadyExists):
        snapshotter.prepare("ns1", "same")
    snapshotter.remove("ns1", "same")
    assert snapshotter.stat("ns2", "same").kind == Kind.ACTIVE
    assert [i.name for i in snapshotter.walk("ns1")] == []
    snapshotter.remove("ns2", "same")


def test_parent_rules(snapshotter):
    with pytest.raises(NotFound):
        snapshotter.prepare(NS, "x", "missing")
    snapshotter.prepare(NS, "active")
    with pytest.raises(FailedPrecondition):
        snapshotter.prepare(NS, "child", "active")
    snapshotter.commit(NS, "committed", "active")
    snapshotter.prepare(NS, "other-ns-parent", "committed")
    with pytest.raises(NotFound):
        snapshotter.prepare("elsewhere", "y", "committed")


def test_remove_with_children_is_refused(snapshotter):
    snapshotter.prepare(NS, "p")
    snapshotter.commit(NS, "parent", "p")
    snapshotter.view(NS, "child", "parent")
    with pytest.raises(FailedPrecondition):
        snapshotter.remove(NS, "parent")
    snapshotter.remove(NS, "child")
    snapshotter.remove(NS, "parent")
    with pytest.raises(NotFound):
        snapshotter.remove(NS, "parent")
    assert settled_trees(snapshotter) == []


def settled_trees(snapshotter) -> list[str]:
    """The trees on disk once removed ones (renamed `rm-*` at once, deleted on a background
    thread) are gone; fails if they never go."""
    deadline = time.monotonic() + 10
    while any(e.startswith("rm-") for e in os.listdir(snapshotter.snapshots_dir)):
        assert time.monotonic() < deadline, os.listdir(snapshotter.snapshots_dir)
        time.sleep(0.01)
    return sorted(os.listdir(snapshotter.snapshots_dir))


def test_remove_detaches_the_tree_at_once(snapshotter):
    snapshotter.prepare(NS, "a")
    (id,) = os.listdir(snapshotter.snapshots_dir)
    snapshotter.remove(NS, "a")
    assert not (snapshotter.snapshots_dir / id).exists()  # no half tree under its id
    assert settled_trees(snapshotter) == []


def test_commit_rules(snapshotter):
    snapshotter.prepare(NS, "a")
    snapshotter.commit(NS, "c", "a")
    snapshotter.view(NS, "v", "c")
    with pytest.raises(FailedPrecondition):
        snapshotter.commit(NS, "c2", "v")
    with pytest.raises(FailedPrecondition):
        snapshotter.commit(NS, "c3", "c")
    snapshotter.prepare(NS, "b")
    with pytest.raises(AlreadyExists):
        snapshotter.commit(NS, "c", "b")
    with pytest.raises(NotFound):
        snapshotter.commit(NS, "c4", "missing")
    with pytest.raises(FailedPrecondition):
        snapshotter.mounts(NS, "c")


def test_mounts_survive_commit_of_parent_chain(snapshotter, mnt):
    """Mounts returned at prepare stay the same when asked again later."""
    layer(snapshotter, mnt, "base", "", {"f": b"1"})
    first = snapshotter.prepare(NS, "work", "base")
    assert snapshotter.mounts(NS, "work") == first


def test_stat_update_walk(snapshotter):
    snapshotter.prepare(NS, "a", labels={"one": "1", "two": "2"})
    info = snapshotter.stat(NS, "a")
    assert info.labels == {"one": "1", "two": "2"} and info.kind == Kind.ACTIVE
    assert info.created_at > 0 and info.updated_at >= info.created_at
    updated = snapshotter.update(NS, Info(name="a", kind=Kind.UNKNOWN,
                                          labels={"two": "", "three": "3"}),
                                 ["labels.two", "labels.three"])
    assert updated.labels == {"one": "1", "three": "3"}
    assert snapshotter.stat(NS, "a").labels == {"one": "1", "three": "3"}
    snapshotter.update(NS, Info(name="a", kind=Kind.UNKNOWN, labels={"only": "x"}))
    assert snapshotter.stat(NS, "a").labels == {"only": "x"}
    with pytest.raises(InvalidArgument):
        snapshotter.update(NS, Info(name="a", kind=Kind.UNKNOWN), ["parent"])
    with pytest.raises(NotFound):
        snapshotter.update(NS, Info(name="b", kind=Kind.UNKNOWN), [])
    snapshotter.commit(NS, "c", "a")
    snapshotter.view(NS, "v", "c")
    assert {(i.name, i.kind, i.parent) for i in snapshotter.walk(NS)} == {
        ("c", Kind.COMMITTED, ""), ("v", Kind.VIEW, "c")}


def test_usage_counts_bytes_and_inodes(snapshotter, mnt):
    layer(snapshotter, mnt, "base", "", {"small": b"x"})
    target = mnt(snapshotter.prepare(NS, "a", "base"))
    (target / "big").write_bytes(os.urandom(1 << 20))
    for i in range(10):
        (target / f"f{i}").write_bytes(b"y")
    active = snapshotter.usage(NS, "a")
    assert active.size >= 1 << 20 and active.inodes >= 11
    unmount(target)
    snapshotter.commit(NS, "top", "a")
    committed = snapshotter.usage(NS, "top")
    assert committed.size >= 1 << 20 and committed.inodes >= 11
    assert snapshotter.usage(NS, "base").size < 1 << 20


def test_cleanup_removes_orphaned_trees(snapshotter):
    snapshotter.prepare(NS, "kept")
    orphan = snapshotter.snapshots_dir / "new-crashed"
    (orphan / "fs").mkdir(parents=True)
    (orphan / "fs" / "junk").write_text("x")
    removed = snapshotter.cleanup()
    assert removed == [str(orphan)]
    assert not orphan.exists()
    assert snapshotter.stat(NS, "kept").kind == Kind.ACTIVE
    assert len(os.listdir(snapshotter.snapshots_dir)) == 1


def test_deep_chain_mounts(snapshotter, mnt):
    """Longer than the kernel's one-page limit on mount options with absolute paths."""
    parent = ""
    depth = 70
    for i in range(depth):
        parent = layer(snapshotter, mnt, f"layer-{i:03d}-" + "x" * 20, parent, {f"f{i}": b"%d" % i})
    mounts = snapshotter.prepare(NS, "deep", parent)
    if mounts[0].type == "overlay":
        assert len(",".join(mounts[0].options)) > mountlib.PAGE_SIZE
    target = mnt(mounts)
    assert sorted(os.listdir(target)) == sorted(f"f{i}" for i in range(depth))
    assert (target / "f0").read_bytes() == b"0"
    view = mnt(snapshotter.view(NS, "deep-view", parent))
    assert (view / f"f{depth - 1}").read_bytes() == b"%d" % (depth - 1)


def test_invalid_keys(snapshotter):
    with pytest.raises(InvalidArgument):
        snapshotter.prepare(NS, "")
    with pytest.raises(InvalidArgument):
        snapshotter.stat(NS, "")
