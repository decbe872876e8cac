"""Open paths strictly beneath a directory, with the kernel doing the check (openat2).

`openat2(RESOLVE_BENEATH)` fails with EXDEV when any step of the resolution — `..`, an
absolute symlink, a relative symlink climbing out — would leave the directory, and it
closes the race window of checking a path first and using it later. Layer application
therefore holds a directory fd for each parent and does every write with the *at()
system calls relative to it: nothing outside the root can be reached.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import posixpath

from runtimed.errors import InvalidArgument

SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437, "riscv64": 437, "ppc64le": 437, "s390x": 437}
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_NR = SYS_OPENAT2.get(os.uname().machine, 437)


class Escape(InvalidArgument):
    """A path that would resolve outside its root."""


def openat2(dirfd: int, path: str, flags: int, mode: int = 0,
            resolve: int = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    fd = _libc.syscall(_NR, ctypes.c_int(dirfd), os.fsencode(path), ctypes.byref(how),
                       ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        if err == errno.EXDEV:
            raise Escape(f"{path!r} resolves outside the root (through '..' or a symlink)")
        raise OSError(err, os.strerror(err), path)
    return fd


def open_dir(rootfd: int, relpath: str) -> int:
    """An O_PATH fd of directory `relpath` under `rootfd` (\"\" is the root itself)."""
    if not relpath:
        return os.dup(rootfd)
    return openat2(rootfd, relpath, os.O_PATH | os.O_DIRECTORY)


def clean(name: str, what: str = "entry") -> str:
    """A relative, normalized name; absolute names and names climbing above the root are
    refused rather than silently re-rooted, since a well-formed layer never has them."""
    if "\x00" in name:
        raise InvalidArgument(f"{what} {name!r}: contains a NUL byte")
    if name.startswith("/"):
        raise InvalidArgument(f"{what} {name!r}: absolute path in a layer")
    cleaned = posixpath.normpath(name)
    if cleaned == "." or cleaned == "":
        return ""
    if cleaned == ".." or cleaned.startswith("../"):
        raise InvalidArgument(f"{what} {name!r}: path climbs out of the root")
    return cleaned
