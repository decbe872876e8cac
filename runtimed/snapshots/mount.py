"""Mount a list of containerd `types.Mount`s at a target and unmount it again.

Shared by the Diff service (temporary mounts to apply or compute layers), the shim and the
task code (container root filesystems). Mounts are described by the plain `Mount` record so
callers need no protobuf; `from_proto`/`to_proto` convert at the service boundary.

Overlay lower directories: the kernel reads all mount options from one page (4096 bytes),
so a long chain of absolute lowerdir paths does not fit. As containerd does, the common
parent directory of the lowerdirs is factored out and the mount is made by a helper process
whose working directory is that parent, with relative lowerdir names; the daemon's own
working directory is never changed (it has threads).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from runtimed.errors import FailedPrecondition, InvalidArgument
from shimd.oci.linux import MNT_DETACH, MS_BIND, MS_RDONLY, MS_REC, MS_REMOUNT
from shimd.oci.rootfs import parse_options  # runc's option table: one for daemon and shim

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

UMOUNT_NOFOLLOW = 0x8

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


@dataclass
class Mount:
    """One entry of containerd's `types.Mount`: what to mount, as `mount(8)` reads it."""

    type: str
    source: str
    options: list[str] = field(default_factory=list)
    target: str = ""

    @classmethod
    def from_proto(cls, m) -> Mount:
        return cls(type=m.type, source=m.source, options=list(m.options), target=m.target)

    def to_proto(self, proto_cls):
        return proto_cls(type=self.type, source=self.source, options=self.options, target=self.target)

    @property
    def readonly(self) -> bool:
        return "ro" in self.options

    def option(self, name: str) -> str | None:
        prefix = name + "="
        for o in self.options:
            if o.startswith(prefix):
                return o[len(prefix):]
        return None


def _sys_mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    rc = _libc.mount(
        source.encode(), target.encode(), fstype.encode() if fstype else None,
        flags, data.encode() if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or 'none'} {source} on {target}: {os.strerror(err)}")


def compact_lowerdirs(options: list[str]) -> tuple[str | None, list[str]]:
    """Factor the common parent out of overlay lowerdirs: (chdir, options with relative
    lowerdirs), or (None, options) when there is nothing to gain."""
    index = next((i for i, o in enumerate(options) if o.startswith("lowerdir=")), -1)
    if index < 0:
        return None, options
    dirs = options[index][len("lowerdir="):].split(":")
    if len(dirs) < 2:
        return None, options
    common = os.path.commonpath(dirs)
    while common in dirs:
        common = os.path.dirname(common)
    if common in ("", "/"):
        return None, options
    prefix = common.rstrip("/") + "/"
    relative = [d[len(prefix):] for d in dirs]
    rest = options[:index] + options[index + 1:]
    return common, rest + ["lowerdir=" + ":".join(relative)]


def mount(m: Mount, target: str | os.PathLike) -> None:
    """Mount one `Mount` at `target` (an existing directory)."""
    target = os.fspath(target)
    flags, propagation, data = parse_options(m.options)
    fstype = m.type
    if fstype == "bind" or flags & MS_BIND:
        fstype = ""
        flags |= MS_BIND
    if m.type == "overlay" and len(data) >= PAGE_SIZE:
        _mount_overlay_compacted(m, target, flags)
        return
    _sys_mount(m.source, target, fstype, flags, data)
    if flags & MS_BIND and flags & MS_RDONLY:
        # a bind mount ignores MS_RDONLY until remounted
        _sys_mount("", target, "", MS_REMOUNT | MS_BIND | (flags & ~MS_REC), "")
    for change in propagation:  # one propagation type per call, as the kernel wants
        _sys_mount("", target, "", change, "")


def _mount_overlay_compacted(m: Mount, target: str, flags: int) -> None:
    chdir, options = compact_lowerdirs(m.options)
    _, _, text = parse_options(options)
    if chdir is None or len(text) >= PAGE_SIZE:
        raise InvalidArgument(
            f"overlay mount options are {len(text)} bytes even with relative lowerdirs, "
            f"over the kernel's {PAGE_SIZE}-byte limit: the layer chain is too deep"
        )
    args = ["mount", "-t", "overlay", "-o", ",".join(options), m.source or "overlay", target]
    done = subprocess.run(args, cwd=chdir, capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(f"mount overlay on {target}: {done.stderr.strip()}")


def mount_all(mounts: list[Mount], target: str | os.PathLike) -> None:
    """Mount each entry in order at `target`; on failure undo what was mounted."""
    target = os.fspath(target)
    done = 0
    try:
        for m in mounts:
            mount(m, target)
            done += 1
    except BaseException:
        for _ in range(done):
            unmount(target)
        raise


def unmount(target: str | os.PathLike, detach: bool = False) -> None:
    """Unmount the top mount at `target`; EBUSY is retried briefly before giving up."""
    path = os.fspath(target).encode()
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if detach else 0)
    for attempt in range(50):
        if _libc.umount2(path, flags) == 0:
            return
        err = ctypes.get_errno()
        if err == 16 and attempt < 49:  # EBUSY
            time.sleep(0.01)
            continue
        raise OSError(err, f"unmount {target}: {os.strerror(err)}")


def mountpoints() -> list[str]:
    """Every mount point of this mount namespace, in mount order."""
    points = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            raw = line.split(b" ")[4].decode()
            points.append(_unescape(raw))
    return points


def _unescape(raw: str) -> str:
    out, i = [], 0
    while i < len(raw):
        if raw[i] == "\\" and i + 3 < len(raw) and raw[i + 1:i + 4].isdigit():
            out.append(chr(int(raw[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return "".join(out)


def unmount_all(target: str | os.PathLike, detach: bool = False) -> None:
    """Unmount everything at or below `target`, deepest first, stacked mounts included."""
    root = os.path.realpath(os.fspath(target))
    prefix = root.rstrip("/") + "/"
    while True:
        below = [p for p in mountpoints() if p == root or p.startswith(prefix)]
        if not below:
            return
        unmount(max(below, key=len), detach=detach)


def is_mountpoint(path: str | os.PathLike) -> bool:
    return os.path.realpath(os.fspath(path)) in mountpoints()


@contextmanager
def temp_mount(mounts: list[Mount], parent: str | os.PathLike | None = None) -> Iterator[Path]:
    """Mount `mounts` at a fresh temporary directory for the duration of the block."""
    import tempfile

    target = tempfile.mkdtemp(prefix="mount-", dir=os.fspath(parent) if parent else None)
    try:
        try:
            mount_all(mounts, target)
        except OSError as exc:
            if exc.errno not in (22, 2, 19, 20):  # EINVAL ENOENT ENODEV ENOTDIR: bad mounts
                raise
            raise InvalidArgument(f"the mounts given cannot be mounted: {exc.strerror}") from exc
        try:
            yield Path(target)
        finally:
            unmount_all(target)
    finally:
        try:
            os.rmdir(target)
        except OSError as exc:
            raise FailedPrecondition(f"temporary mount point {target} not removable: {exc}") from exc
