"""Reading and writing cgroupfs control files, with errors that name the file."""

from __future__ import annotations

import errno
import os


def read(path: str) -> str:
    """A control file's text: open, read, close (a Python file object adds an fstat, an
    ioctl and two lseeks to every read)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode()


def read_int(path: str) -> int:
    """Integer content; "max" (v2) and absent files read as -1 (no limit / unknown)."""
    try:
        value = read(path).strip()
    except FileNotFoundError:
        return -1
    return -1 if value in ("max", "") else int(value)


def read_kv(path: str) -> dict[str, int]:
    """A "key value" per line file (memory.stat, cpu.stat, memory.events)."""
    out: dict[str, int] = {}
    try:
        text = read(path)
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        try:
            out[key] = int(value)
        except ValueError:
            continue
    return out


def write(path: str, value: str | int) -> None:
    with Writer() as writer:
        writer.write(path, value)


class Writer:
    """Writes to control files that take one value per write() (devices.allow), keeping
    each file open between writes; closed when the block ends."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def write(self, path: str, value: str | int) -> None:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = self._fds[path] = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
            except FileNotFoundError:
                raise OSError(2, f"cgroup control file {path} does not exist (controller missing?)") from None
        try:
            os.write(fd, str(value).encode())
        except OSError as e:
            raise OSError(e.errno, f"write {value!r} to {path}: {os.strerror(e.errno)}") from None

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def procs(path: str, recursive: bool = True) -> list[int]:
    """Pids in cgroup.procs of path and, if recursive, of every cgroup below it."""
    pids: list[int] = []
    for dirpath, _dirs, _files in os.walk(path) if recursive else [(path, [], [])]:
        try:
            pids.extend(int(x) for x in read(os.path.join(dirpath, "cgroup.procs")).split())
        except FileNotFoundError:
            continue
    return pids


def rmdir_tree(path: str, wait: bool = True) -> bool:
    """Remove a cgroup and its children, deepest first; a missing one is already gone.
    A cgroup without children (a container's, usually) goes with one rmdir: no walk of a
    directory of control files per hierarchy. Without `wait`, a busy cgroup (children, or
    tasks still leaving) is left as it is: False."""
    try:
        os.rmdir(path)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError as e:
        if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):  # busy: children, or tasks leaving
            raise OSError(e.errno, f"remove cgroup {path}: {os.strerror(e.errno)}") from None
        if not wait:
            return False
    for dirpath, dirs, _files in os.walk(path, topdown=False):
        for d in dirs:
            _rmdir(os.path.join(dirpath, d))
    _rmdir(path)
    return True


def _rmdir(path: str) -> None:
    import time

    for attempt in range(50):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            # EBUSY right after the last task exited: the kernel is still tearing it down.
            if e.errno != 16 or attempt == 49:
                raise OSError(e.errno, f"remove cgroup {path}: {os.strerror(e.errno)}") from None
            time.sleep(0.01)


