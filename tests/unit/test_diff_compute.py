"""write_tree_diff and hard links: which paths share an inode is part of the change."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from runtimed.diff.apply import apply_layer
from runtimed.diff.compute import write_tree_diff


def _tree(root: Path, links: dict[str, str]) -> None:
    (root / "b").mkdir(parents=True)
    for name in ("b/a", "b/b"):
        (root / name).write_bytes(b"x")
        os.utime(root / name, (1_000_000_000, 1_000_000_000))
    for link, target in links.items():
        os.link(root / target, root / link)
    os.utime(root / "b", (1_000_000_000, 1_000_000_000))


def _diff(a: Path, b: Path) -> bytes:
    buf = io.BytesIO()
    write_tree_diff(a, b, buf)
    return buf.getvalue()


def test_a_path_moved_to_another_link_group_is_emitted(tmp_path):
    """h1 keeps its link count, size, mode and mtime but is linked to b/b instead of b/a:
    the diff must re-link it, or applying leaves it on b/a's inode."""
    a, b, target = tmp_path / "a", tmp_path / "b", tmp_path / "target"
    _tree(a, {"h1": "b/a", "h2": "b/b"})
    _tree(b, {"h1": "b/b"})
    layer = _diff(a, b)
    entries = {m.name: m for m in tarfile.open(fileobj=io.BytesIO(layer))}
    assert entries["h1"].islnk() and entries["h1"].linkname == "b/b"
    assert ".wh.h2" in entries

    os.system(f"cp -a {a} {target}")
    apply_layer(io.BytesIO(layer), target)
    assert os.lstat(target / "h1").st_ino == os.lstat(target / "b/b").st_ino
    assert os.lstat(target / "b/a").st_ino != os.lstat(target / "b/b").st_ino
    assert not (target / "h2").exists()


def test_unchanged_link_groups_are_not_emitted(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _tree(a, {"h1": "b/a"})
    _tree(b, {"h1": "b/a"})
    (b / "new").write_bytes(b"n")
    names = [m.name for m in tarfile.open(fileobj=io.BytesIO(_diff(a, b)))]
    assert names == ["new"]


def test_a_link_group_losing_a_member_is_re_emitted(tmp_path):
    """b/a and h1 linked in both trees, h2 joins them in the upper one."""
    a, b, target = tmp_path / "a", tmp_path / "b", tmp_path / "target"
    _tree(a, {"h1": "b/a"})
    _tree(b, {"h1": "b/a"})
    os.link(b / "b/a", b / "h2")
    os.system(f"cp -a {a} {target}")
    apply_layer(io.BytesIO(_diff(a, b)), target)
    inodes = {os.lstat(target / p).st_ino for p in ("b/a", "h1", "h2")}
    assert len(inodes) == 1
