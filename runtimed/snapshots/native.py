"""The native snapshotter: every snapshot is a full copy of its parent's tree.

It works on any filesystem and needs no mount beyond a bind, at the price of disk space and
a copy per prepare. Layers are applied with whiteouts turned into deletions.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from runtimed.snapshots.base import Kind, Snapshotter, Usage, disk_usage
from runtimed.snapshots.mount import Mount


def copy_tree(src: Path, dst: Path) -> None:
    """Copy a tree keeping owners, modes, times, xattrs, hard links and special files.

    `cp -a` does all of this in C; Python's shutil.copytree loses hard links and devices.
    """
    done = subprocess.run(
        ["cp", "-a", "--reflink=auto", "--no-target-directory", str(src), str(dst)],
        capture_output=True, text=True,
    )
    if done.returncode != 0:
        raise OSError(f"copying {src} to {dst}: {done.stderr.strip()}")


class NativeSnapshotter(Snapshotter):
    name = "native"

    def fs(self, id: int) -> Path:
        return self.path(id) / "fs"

    def _build(self, tmp: Path, parent_ids: list[int], kind: Kind) -> None:
        if parent_ids:
            copy_tree(self.fs(parent_ids[0]), tmp / "fs")
        else:
            os.mkdir(tmp / "fs", 0o755)

    def _mounts(self, id: int, parent_ids: list[int], kind: Kind) -> list[Mount]:
        flag = "ro" if kind == Kind.VIEW else "rw"
        return [Mount(type="bind", source=str(self.fs(id)), options=[flag, "rbind"])]

    def _usage(self, id: int) -> Usage:
        return disk_usage(self.fs(id))
