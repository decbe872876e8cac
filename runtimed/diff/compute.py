"""Compute the changes between two directory trees as an OCI layer tar.

Two ways, as containerd does:

- `write_tree_diff(lower, upper, out)` walks both trees in name order and emits what
  `upper` adds or changes (with the parent directories of each change, so a fresh target
  gets their attributes) and a `.wh.<name>` whiteout for what it no longer has.
- `write_overlay_diff(upperdir, out)` reads an overlayfs upper directory directly, when the
  lower side is exactly the overlay's lower layers: everything in it is a change, a 0/0
  character device is a deletion and `trusted.overlay.opaque=y` an opaque directory.

Files are compared by type, mode, owner, size, mtime, link count, link target, device
number and xattrs; when an mtime has no sub-second part (copied trees, old filesystems) equal
metadata is confirmed by comparing contents. Hard links inside the change set are emitted
as tar hard links to the first path written, so applying keeps them linked.
"""

from __future__ import annotations

import os
import stat
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO

from runtimed.diff.apply import OPAQUE_XATTR, WHITEOUT_OPAQUE, WHITEOUT_PREFIX, XATTR_PAX_PREFIX
from runtimed.diff.safepath import (
    RESOLVE_BENEATH,
    RESOLVE_NO_MAGICLINKS,
    RESOLVE_NO_SYMLINKS,
    openat2,
)
from runtimed.errors import FailedPrecondition, InvalidArgument

CHUNK = 1 << 20


@dataclass
class _Entry:
    rel: str
    path: str
    st: os.stat_result
    children: list[str] = field(default_factory=list)


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for name in names:
        if name.startswith("trusted.overlay."):
            continue
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
    return out


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _same_contents(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ca, cb = fa.read(CHUNK), fb.read(CHUNK)
            if ca != cb:
                return False
            if not ca:
                return True


def _same(a_path: str, a: os.stat_result, b_path: str, b: os.stat_result) -> bool:
    if (a.st_mode, a.st_uid, a.st_gid) != (b.st_mode, b.st_uid, b.st_gid):
        return False
    if stat.S_ISDIR(a.st_mode):
        return a.st_mtime_ns == b.st_mtime_ns and _xattrs(a_path) == _xattrs(b_path)
    if a.st_size != b.st_size or a.st_mtime_ns != b.st_mtime_ns:
        return False
    if stat.S_ISREG(a.st_mode) and a.st_nlink != b.st_nlink:
        return False  # hard links were made or broken: re-emit the whole link group
    if stat.S_ISLNK(a.st_mode):
        return os.readlink(a_path) == os.readlink(b_path)
    if stat.S_ISCHR(a.st_mode) or stat.S_ISBLK(a.st_mode):
        return a.st_rdev == b.st_rdev and _xattrs(a_path) == _xattrs(b_path)
    if _xattrs(a_path) != _xattrs(b_path):
        return False
    if stat.S_ISREG(a.st_mode) and a.st_mtime_ns % 1_000_000_000 == 0:
        return _same_contents(a_path, b_path)
    return True


class _TarWriter:
    """Writes PAX tar entries for paths of a tree, linking repeated inodes."""

    def __init__(self, out: BinaryIO, root: str):
        self.tar = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT,
                                bufsize=CHUNK)
        self.root = root
        self.rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.links: dict[tuple[int, int], str] = {}
        self.written: set[str] = set()

    def add(self, rel: str, path: str, st: os.stat_result) -> None:
        if rel in self.written:
            return
        self.written.add(rel)
        info = tarfile.TarInfo(rel + "/" if stat.S_ISDIR(st.st_mode) else rel)
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.uname = info.gname = ""
        info.mtime = st.st_mtime_ns // 1_000_000_000 if st.st_mtime_ns % 1_000_000_000 == 0 \
            else st.st_mtime_ns / 1e9
        pax = {}
        for key, value in _xattrs(path).items():
            pax[XATTR_PAX_PREFIX + key] = value.decode("utf-8", "surrogateescape")
        data = None
        mode = st.st_mode
        if stat.S_ISREG(mode):
            ident = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and ident in self.links:
                info.type = tarfile.LNKTYPE
                info.linkname = self.links[ident]
            else:
                if st.st_nlink > 1:
                    self.links[ident] = rel
                info.type = tarfile.REGTYPE
                info.size = st.st_size
                data = path
        elif stat.S_ISDIR(mode):
            info.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(mode):
            info.type = tarfile.SYMTYPE
            fd = self._open(rel, os.O_PATH | os.O_NOFOLLOW, st)
            try:
                info.linkname = os.readlink("", dir_fd=fd)
            finally:
                os.close(fd)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISFIFO(mode):
            info.type = tarfile.FIFOTYPE
        else:
            return  # sockets are not carried in layers
        info.pax_headers = pax
        if data is None:
            self.tar.addfile(info)
        else:
            with os.fdopen(self._open(rel, os.O_RDONLY | os.O_NOFOLLOW, st), "rb") as f:
                self.tar.addfile(info, f)

    def _open(self, rel: str, flags: int, st: os.stat_result) -> int:
        """Open `rel` with no symlink anywhere on its path, and check it is still the
        inode that was compared: a running container may swap a file for a symlink to a
        host file between the walk and the read, and that must not end up in the layer."""
        try:
            fd = openat2(self.rootfd, rel, flags,
                         resolve=RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
        except (OSError, InvalidArgument) as exc:
            raise FailedPrecondition(f"{rel!r} changed while the diff was being computed: "
                                     f"{exc}") from exc
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            os.close(fd)
            raise FailedPrecondition(f"{rel!r} changed while the diff was being computed")
        return fd

    def whiteout(self, rel: str) -> None:
        parent, _, base = rel.rpartition("/")
        name = f"{parent}/{WHITEOUT_PREFIX}{base}" if parent else WHITEOUT_PREFIX + base
        if name in self.written:
            return
        self.written.add(name)
        info = tarfile.TarInfo(name)
        info.mode = 0o644
        info.mtime = 0
        self.tar.addfile(info)

    def opaque(self, rel: str) -> None:
        info = tarfile.TarInfo(f"{rel}/{WHITEOUT_OPAQUE}")
        info.mode = 0o644
        self.tar.addfile(info)

    def close(self) -> None:
        try:
            self.tar.close()
        finally:
            os.close(self.rootfd)


def _add_parents(w: _TarWriter, upper: str, rel: str) -> None:
    parts = rel.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        sub = "/".join(parts[:i])
        if sub not in w.written:
            path = os.path.join(upper, sub)
            w.add(sub, path, os.lstat(path))


def write_tree_diff(lower: str | os.PathLike, upper: str | os.PathLike, out: BinaryIO) -> None:
    """Write to `out` the tar that turns tree `lower` into tree `upper`."""
    lower, upper = os.fspath(lower), os.fspath(upper)
    w = _TarWriter(out, upper)
    changed: list[tuple[str, str, os.stat_result]] = []
    unchanged_links: dict[tuple[int, int], list[tuple[str, str, os.stat_result]]] = {}
    # paths of each multiply linked inode, on both sides: a path can keep its link count
    # and metadata while the paths it is linked with change
    a_groups: dict[tuple[int, int], set[str]] = {}
    b_groups: dict[tuple[int, int], set[str]] = {}
    a_inode: dict[str, tuple[int, int]] = {}

    def walk(rel: str, lower_is_dir: bool) -> None:
        a_dir = os.path.join(lower, rel) if rel else lower
        b_dir = os.path.join(upper, rel) if rel else upper
        # never list through a symlink: where lower has no directory, all below is new
        a_names = set(_listdir(a_dir)) if lower_is_dir else set()
        for name in _listdir(b_dir):
            child = f"{rel}/{name}" if rel else name
            b_path = os.path.join(b_dir, name)
            b_st = os.lstat(b_path)
            a_path = os.path.join(a_dir, name)
            a_st = None
            if name in a_names:
                a_names.discard(name)
                a_st = os.lstat(a_path)
                if stat.S_ISREG(a_st.st_mode) and a_st.st_nlink > 1:
                    a_inode[child] = (a_st.st_dev, a_st.st_ino)
                    a_groups.setdefault(a_inode[child], set()).add(child)
            if stat.S_ISREG(b_st.st_mode) and b_st.st_nlink > 1:
                b_groups.setdefault((b_st.st_dev, b_st.st_ino), set()).add(child)
            if a_st is None or not _same(a_path, a_st, b_path, b_st):
                changed.append((child, b_path, b_st))
            elif stat.S_ISREG(b_st.st_mode) and b_st.st_nlink > 1:
                unchanged_links.setdefault((b_st.st_dev, b_st.st_ino), []).append(
                    (child, b_path, b_st))
            if stat.S_ISDIR(b_st.st_mode):
                walk(child, a_st is not None and stat.S_ISDIR(a_st.st_mode))
        for gone in sorted(a_names):
            changed.append((f"{rel}/{gone}" if rel else gone, "", None))

    walk("", os.path.isdir(lower) and not os.path.islink(lower))
    # a link group is re-emitted whole (the first path as a file, the others as links to
    # it) when any of its paths changed, or when its paths were linked differently in
    # `lower`: after applying, an unchanged path keeps its lower inode and so the links
    # that inode has there (paths that `upper` no longer has are deleted by whiteouts)
    for key, members in list(unchanged_links.items()):
        group = b_groups[key]
        if len(members) != len(group) or any(a_groups.get(a_inode.get(rel)) != group
                                             for rel, _, _ in members):
            changed.extend(unchanged_links.pop(key))
    changed.sort(key=lambda c: c[0].split("/"))
    try:
        for rel, path, st in changed:
            _add_parents(w, upper, rel)
            if st is None:
                w.whiteout(rel)
            else:
                w.add(rel, path, st)
    finally:
        w.close()


def write_overlay_diff(upperdir: str | os.PathLike, out: BinaryIO) -> None:
    """Write to `out` the layer an overlayfs upper directory holds."""
    upperdir = os.fspath(upperdir)
    w = _TarWriter(out, upperdir)

    def walk(rel: str, path: str) -> None:
        for name in _listdir(path):
            child = f"{rel}/{name}" if rel else name
            child_path = os.path.join(path, name)
            st = os.lstat(child_path)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                w.whiteout(child)
                continue
            w.add(child, child_path, st)
            if stat.S_ISDIR(st.st_mode):
                try:
                    opaque = os.getxattr(child_path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
                except OSError:
                    opaque = False
                if opaque:
                    w.opaque(child)
                walk(child, child_path)

    try:
        walk("", upperdir)
    finally:
        w.close()
