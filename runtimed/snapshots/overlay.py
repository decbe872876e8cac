"""The overlayfs snapshotter: each snapshot is an upper directory (`fs`) and a `work`
directory; lower layers are the parents' `fs` directories, nearest first.

Mounts follow containerd's overlay snapshotter exactly, since clients (ctr, the Go client)
read them: a snapshot without parents is a bind mount of its `fs`; a view of one parent is
a read-only bind of the parent; otherwise an `overlay` mount with lowerdir (and
upperdir/workdir for active snapshots). Layers are applied straight into the upper
directory with overlay whiteouts (see runtimed.diff.apply), so no mount is needed to unpack.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from runtimed.errors import FailedPrecondition
from runtimed.snapshots import mount as mountlib
from runtimed.snapshots.base import Kind, Snapshotter, Usage, disk_usage
from runtimed.snapshots.mount import Mount

INDEX_PARAMETER = Path("/sys/module/overlay/parameters/index")


def supported(root: Path) -> str | None:
    """None when overlayfs can be used under `root`, else the reason it cannot.

    Like containerd, this mounts a two-layer overlay once: the kernel may know overlayfs
    while the filesystem under `root` cannot hold upper directories (overlay on overlay,
    no d_type, no trusted xattrs)."""
    try:
        with open("/proc/filesystems") as f:
            if not any(line.split()[-1] == "overlay" for line in f if line.strip()):
                return "the kernel has no overlay filesystem (modprobe overlay?)"
    except OSError as exc:
        return f"cannot read /proc/filesystems: {exc}"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with tempfile.TemporaryDirectory(prefix="check-", dir=root) as tmp:
        dirs = [Path(tmp) / n for n in ("l1", "l2", "upper", "work", "merged")]
        for d in dirs:
            d.mkdir()
        l1, l2, upper, work, merged = dirs
        probe = Mount("overlay", "overlay", [f"lowerdir={l1}:{l2}", f"upperdir={upper}",
                                             f"workdir={work}"])
        try:
            mountlib.mount(probe, merged)
        except OSError as exc:
            return f"overlay cannot be mounted on the filesystem of {root}: {exc}"
        mountlib.unmount(merged)
    return None


class OverlaySnapshotter(Snapshotter):
    name = "overlayfs"

    def __init__(self, root, db, *args, **kwargs):
        reason = supported(Path(root))
        if reason:
            raise FailedPrecondition(f"overlayfs snapshotter unavailable: {reason}")
        super().__init__(root, db, *args, **kwargs)
        # containerd sets index=off where the kernel knows the option: with the index on,
        # mounting the same lower directories in a second overlay can fail
        self._options = ["index=off"] if INDEX_PARAMETER.exists() else []

    def upper(self, id: int) -> Path:
        return self.path(id) / "fs"

    def work(self, id: int) -> Path:
        return self.path(id) / "work"

    def _build(self, tmp: Path, parent_ids: list[int], kind: Kind) -> None:
        os.mkdir(tmp / "fs", 0o755)
        if kind == Kind.ACTIVE:
            os.mkdir(tmp / "work", 0o711)

    def _mounts(self, id: int, parent_ids: list[int], kind: Kind) -> list[Mount]:
        if not parent_ids:
            flag = "ro" if kind == Kind.VIEW else "rw"
            return [Mount(type="bind", source=str(self.upper(id)), options=[flag, "rbind"])]
        options = list(self._options)
        if kind == Kind.ACTIVE:
            options += [f"workdir={self.work(id)}", f"upperdir={self.upper(id)}"]
        elif len(parent_ids) == 1:
            return [Mount(type="bind", source=str(self.upper(parent_ids[0])),
                          options=["ro", "rbind"])]
        options.append("lowerdir=" + ":".join(str(self.upper(p)) for p in parent_ids))
        return [Mount(type="overlay", source="overlay", options=options)]

    def _usage(self, id: int) -> Usage:
        return disk_usage(self.upper(id))

    def upper_and_lowers(self, ns: str, key: str) -> tuple[Path, list[Path]]:
        """The upper directory of an active snapshot and its lowers, nearest first."""
        with self.db.read() as conn:
            row = self._get(conn, ns, key)
            parents = self._parent_ids(conn, row.parent_id)
        return self.upper(row.id), [self.upper(p) for p in parents]
