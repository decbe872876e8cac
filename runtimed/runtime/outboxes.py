"""Following shims' outboxes (`<bundle>/events.jsonl`) with inotify, so runtimed relays
their events without holding a call open to any shim.

One inotify fd for all tasks, read on the event loop; a watch per bundle directory (the
shim appends to the file, and replaces it by temp + rename when it trims it), filtered to
the outbox's name. A notification only says "look again": `OutboxReader` reads what was
appended since its last read. Only closes after a write and renames are watched: every
writer of an outbox closes it after each append (shimd/outbox.py `Outbox.append`,
`write_atomic`; the kernel closes a dead writer's fds), so a line is complete by then,
and a modify per write would only double the wake-ups. When the kernel's queue
overflows (notifications dropped), every callback is called.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import struct
from collections.abc import Callable
from pathlib import Path

from shimd.outbox import parse

OUTBOX = "events.jsonl"

IN_CLOSE_WRITE = 0x8
IN_MOVED_TO = 0x80
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
MASK = IN_CLOSE_WRITE | IN_MOVED_TO
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then the name, NUL-padded)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]


class OutboxWatcher:
    """Calls `callback()` whenever the outbox of a watched bundle may have changed."""

    def __init__(self) -> None:
        self._fd = -1
        self._callbacks: dict[int, Callable[[], None]] = {}  # wd → callback
        self._wds: dict[Path, int] = {}

    def _open(self) -> int:
        if self._fd < 0:
            fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
            if fd < 0:
                raise _oserror("inotify_init1")
            self._fd = fd
            asyncio.get_running_loop().add_reader(fd, self._read)
        return self._fd

    def watch(self, bundle: Path, callback: Callable[[], None]) -> None:
        """Call `callback` on changes to `bundle`'s outbox until `unwatch(bundle)`. Raises
        OSError when the bundle is gone."""
        wd = _libc.inotify_add_watch(self._open(), os.fsencode(bundle), MASK)
        if wd < 0:
            raise _oserror(f"inotify_add_watch {bundle}")
        self._wds[bundle] = wd
        self._callbacks[wd] = callback

    def unwatch(self, bundle: Path) -> None:
        wd = self._wds.pop(bundle, None)
        if wd is None:
            return
        self._callbacks.pop(wd, None)
        _libc.inotify_rm_watch(self._fd, wd)  # EINVAL when the directory went: fine

    def close(self) -> None:
        if self._fd >= 0:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
        self._callbacks.clear()
        self._wds.clear()

    def _read(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        woken = set()
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _, size = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size: offset + _EVENT.size + size].rstrip(b"\0")
            offset += _EVENT.size + size
            if mask & IN_Q_OVERFLOW:  # (wd -1) some were dropped: everyone looks again
                for known, callback in list(self._callbacks.items()):
                    if known not in woken:
                        woken.add(known)
                        callback()
                continue
            if mask & IN_IGNORED:  # the directory was removed (or the watch taken off)
                callback = self._callbacks.pop(wd, None)
                for bundle, known in list(self._wds.items()):
                    if known == wd:
                        del self._wds[bundle]
            else:
                callback = self._callbacks.get(wd) if name == OUTBOX.encode() else None
            if callback is not None and wd not in woken:
                woken.add(wd)
                callback()


class OutboxReader:
    """Reads a live outbox incrementally, without ever changing it: from where the last
    read ended, or from the start when the shim replaced the file (a trim: a new inode,
    or the inode of a file removed since, then told by its first line, the trim's
    `{"acked": N}` with N rising). By path, no fd held between reads; `pin()` before the bundle is moved (Delete retires it to the trash
    while its last events are relayed) and reads go through the directory's fd."""

    def __init__(self, bundle: Path):
        self._path = bundle / OUTBOX
        self._dir = -1
        self._inode = 0
        self._offset = 0
        self._head = b""  # the file's first line, once read

    def pin(self) -> None:
        """Follow the bundle directory wherever it is moved from now on."""
        if self._dir < 0:
            self._dir = os.open(self._path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def read(self) -> list[dict]:
        """The events appended since the last read (a replaced file: all it holds); a last
        line still without its newline is left for the next read."""
        try:
            if self._dir >= 0:
                fd = os.open(OUTBOX, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._dir)
            else:
                fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return []
        try:
            st = os.fstat(fd)
            if (st.st_ino != self._inode or st.st_size < self._offset
                    or (self._head and os.pread(fd, len(self._head), 0) != self._head)):
                self._inode, self._offset, self._head = st.st_ino, 0, b""
            data = b""
            while chunk := os.pread(fd, max(st.st_size - self._offset, 1 << 16),
                                    self._offset + len(data)):
                data += chunk
        finally:
            os.close(fd)
        whole = data.rfind(b"\n") + 1
        if not self._head and self._offset == 0:
            self._head = data[: data.find(b"\n") + 1]
        self._offset += whole
        return parse(data[:whole])[1]

    def close(self) -> None:
        if self._dir >= 0:
            os.close(self._dir)
            self._dir = -1


def _oserror(what: str) -> OSError:
    errno = ctypes.get_errno()
    return OSError(errno, f"{what}: {os.strerror(errno)}")
