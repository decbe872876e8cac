"""The conformance suite (tests/snapshotter_suite.py) against overlayfs and native."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from snapshotter_suite import *  # noqa: E402,F403
from snapshotter_suite import NS, layer  # noqa: E402

from runtimed.metadata.db import Database  # noqa: E402
from runtimed.snapshots.native import NativeSnapshotter  # noqa: E402
from runtimed.snapshots.overlay import OverlaySnapshotter  # noqa: E402

IMPLEMENTATIONS = {"overlayfs": OverlaySnapshotter, "native": NativeSnapshotter}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def snapshotter(request, tmp_path):
    db = Database(tmp_path / "meta.db")
    events = []
    impl = IMPLEMENTATIONS[request.param](tmp_path / "snapshots" / request.param, db,
                                          lambda ns, topic, fields: events.append((ns, topic, fields)))
    impl.events = events
    yield impl
    db.close()


def test_events_are_published(snapshotter, mnt):
    snapshotter.prepare(NS, "a")
    snapshotter.commit(NS, "b", "a")
    snapshotter.remove(NS, "b")
    assert snapshotter.events == [
        (NS, "/snapshot/prepare", {"key": "a", "parent": ""}),
        (NS, "/snapshot/commit", {"key": "a", "name": "b"}),
        (NS, "/snapshot/remove", {"key": "b"}),
    ]


def test_overlay_mount_shapes(tmp_path):
    db = Database(tmp_path / "meta.db")
    s = OverlaySnapshotter(tmp_path / "o", db)
    (m,) = s.prepare(NS, "a")
    assert (m.type, m.options) == ("bind", ["rw", "rbind"])
    s.commit(NS, "c1", "a")
    (m,) = s.view(NS, "v1", "c1")
    assert (m.type, m.options) == ("bind", ["ro", "rbind"])
    s.prepare(NS, "b", "c1")
    s.commit(NS, "c2", "b")
    (m,) = s.prepare(NS, "top", "c2")
    assert m.type == "overlay"
    assert [o.split("=")[0] for o in m.options if "=" in o][-3:] == ["workdir", "upperdir", "lowerdir"]
    lower = m.option("lowerdir").split(":")
    assert lower == [str(s.upper(3)), str(s.upper(1))]  # v1 took id 2
    (m,) = s.view(NS, "v2", "c2")
    assert m.type == "overlay" and m.option("upperdir") is None
    db.close()


def test_native_copies_parent(tmp_path, mnt):
    db = Database(tmp_path / "meta.db")
    s = NativeSnapshotter(tmp_path / "n", db)
    layer(s, mnt, "base", "", {"f": b"1"})
    s.prepare(NS, "child", "base")
    child = s.snapshots_dir / "2" / "fs" / "f"
    assert child.read_bytes() == b"1"
    assert child.stat().st_ino != (s.snapshots_dir / "1" / "fs" / "f").stat().st_ino
    db.close()


def test_overlay_is_refused_where_the_filesystem_cannot_hold_it(tmp_path):
    """An overlay upper directory cannot live on overlayfs itself: the probe mount says so
    and the snapshotter is not offered (containerd falls back the same way)."""
    from runtimed.errors import FailedPrecondition
    from runtimed.snapshots import mount as mountlib
    from runtimed.snapshots.overlay import supported

    assert supported(tmp_path / "ok") is None
    parts = [tmp_path / n for n in ("lo", "up", "wk", "merged")]
    for p in parts:
        p.mkdir()
    mountlib.mount(mountlib.Mount("overlay", "overlay", [
        f"lowerdir={parts[0]}", f"upperdir={parts[1]}", f"workdir={parts[2]}"]), parts[3])
    try:
        nested = parts[3] / "root"
        reason = supported(nested)
        assert reason is not None and "cannot be mounted" in reason
        with pytest.raises(FailedPrecondition):
            OverlaySnapshotter(nested, Database(tmp_path / "meta.db"))
    finally:
        mountlib.unmount_all(parts[3])
    assert not [p for p in mountlib.mountpoints() if p.startswith(str(tmp_path))]
