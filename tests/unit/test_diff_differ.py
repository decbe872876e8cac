"""Differ details: crash repair of temporary mounts, which mount lists take the fast paths."""

from __future__ import annotations

import os

from runtimed.diff.differ import Differ, _overlay_upper_on, _readonly
from runtimed.snapshots import mount as mountlib
from runtimed.snapshots.mount import Mount


def test_start_unmounts_and_removes_leftover_temporary_mounts(tmp_path):
    tmp = tmp_path / "tmpmounts"
    tmp.mkdir()
    src = tmp_path / "src"
    src.mkdir()
    (tmp / "mount-left").mkdir()
    mountlib.mount(Mount("bind", str(src), ["ro", "rbind"]), tmp / "mount-left")
    assert mountlib.is_mountpoint(tmp / "mount-left")
    Differ(None, tmp)
    assert os.listdir(tmp) == []
    assert not [p for p in mountlib.mountpoints() if p.startswith(str(tmp_path))]


def test_overlay_upper_is_read_directly_only_over_its_own_lowers():
    right = [Mount("overlay", "overlay", ["workdir=/s/3/work", "upperdir=/s/3/fs",
                                           "lowerdir=/s/2/fs:/s/1/fs"])]
    view = [Mount("overlay", "overlay", ["lowerdir=/s/2/fs:/s/1/fs"])]
    assert _overlay_upper_on(view, right) == "/s/3/fs"
    other = [Mount("overlay", "overlay", ["lowerdir=/s/2/fs"])]
    assert _overlay_upper_on(other, right) is None
    single = [Mount("overlay", "overlay", ["upperdir=/s/2/fs", "workdir=/s/2/w", "lowerdir=/s/1/fs"])]
    assert _overlay_upper_on([Mount("bind", "/s/1/fs", ["ro", "rbind"])], single) == "/s/2/fs"


def test_readonly_turns_an_upperdir_into_the_top_lower():
    (m,) = _readonly([Mount("overlay", "overlay", ["index=off", "workdir=/w", "upperdir=/u",
                                                    "lowerdir=/a:/b"])])
    assert m.options == ["index=off", "lowerdir=/u:/a:/b", "ro"]
    (b,) = _readonly([Mount("bind", "/x", ["rw", "rbind"])])
    assert b.options == ["rbind", "ro"]
