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


def test_diff_never_reads_through_a_symlink_swapped_in(tmp_path, monkeypatch):
    """A running container swapping a file for a symlink to a host file between the walk
    and the read must not get the host file into the layer."""
    import io

    import pytest

    from runtimed.diff import compute
    from runtimed.errors import FailedPrecondition

    secret = tmp_path / "host-secret"
    secret.write_text("host only")
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    (upper / "f").write_text("container file")
    real_add = compute._TarWriter.add

    def add_after_swap(self, rel, path, st):
        if rel == "f":
            os.unlink(path)
            os.symlink(str(secret), path)
        return real_add(self, rel, path, st)

    monkeypatch.setattr(compute._TarWriter, "add", add_after_swap)
    out = io.BytesIO()
    with pytest.raises(FailedPrecondition):
        compute.write_tree_diff(lower, upper, out)
    assert b"host only" not in out.getvalue()
