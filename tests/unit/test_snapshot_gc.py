"""Snapshots in the garbage collector: what keeps them (gc.root label, a lease, a live
child, an image config's gc.ref.snapshot label) and what goes, trees included."""

from __future__ import annotations

import os
import time

import pytest

from runtimed.errors import NotFound
from runtimed.metadata.db import Database
from runtimed.metadata.gc import GarbageCollector
from runtimed.metadata.images import ImageStore
from runtimed.metadata.leases import LeaseStore
from runtimed.snapshots import open_snapshotters

NS = "default"


@pytest.fixture
def env(tmp_path):
    db = Database(tmp_path / "meta.db")
    ImageStore(db)  # the collector's image roots need the images table
    gc = GarbageCollector(db)
    leases = LeaseStore(db)
    sns = open_snapshotters(tmp_path, db, leases=leases, gc=gc)
    yield sns["overlayfs"], gc, leases
    gc.close()
    db.close()


def trees(sn) -> list[str]:
    deadline = time.monotonic() + 5
    while any(e.startswith("rm-") for e in os.listdir(sn.snapshots_dir)):
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)  # detached trees are deleted on a background thread
    return sorted(os.listdir(sn.snapshots_dir))


def test_unreferenced_snapshots_go_with_their_trees(env):
    sn, gc, _ = env
    sn.prepare(NS, "a")
    sn.commit(NS, "base", "a")
    sn.prepare(NS, "child", "base")
    sn.prepare(NS, "kept", labels={"containerd.io/gc.root": "now"})
    result = gc.collect()
    assert {str(n) for n in result.removed} >= {"snapshot/default/overlayfs/base",
                                                 "snapshot/default/overlayfs/child"}
    assert [i.name for i in sn.walk(NS)] == ["kept"]
    assert len(trees(sn)) == 1


def test_child_keeps_its_parents_and_leases_keep_snapshots(env):
    sn, gc, leases = env
    lease = leases.create(NS).id
    sn.prepare(NS, "a", lease=lease)
    sn.commit(NS, "l1", "a", lease=lease)
    sn.prepare(NS, "b", "l1")
    sn.commit(NS, "l2", "b")
    sn.prepare(NS, "top", "l2", labels={"containerd.io/gc.root": "x"})
    gc.collect()
    assert {i.name for i in sn.walk(NS)} == {"l1", "l2", "top"}
    sn.remove(NS, "top")
    gc.collect()
    # l2 had only the child; l1 is still leased
    assert {i.name for i in sn.walk(NS)} == {"l1"}
    leases.delete(NS, lease)
    gc.collect()
    assert list(sn.walk(NS)) == []
    assert trees(sn) == []
    with pytest.raises(NotFound):
        sn.stat(NS, "l1")


def test_label_reference_from_another_snapshot(env):
    sn, gc, _ = env
    sn.prepare(NS, "a")
    sn.commit(NS, "target", "a")
    sn.prepare(NS, "holder", labels={"containerd.io/gc.root": "x",
                                     "containerd.io/gc.ref.snapshot.overlayfs": "target"})
    gc.collect()
    assert {i.name for i in sn.walk(NS)} == {"holder", "target"}
