"""Thin ctypes wrappers for the Linux calls Python 3.11's os module lacks.

Every wrapper raises OSError with errno and a message naming what was attempted, so the
runtime can report "mount proc on /proc: EPERM" rather than a bare errno.
"""

from __future__ import annotations

import ctypes
import os

# bound once, in the shims' zygote: a CDLL made in each shim would copy ~0.4 MB of pages
_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

#: OCI namespace type → (clone flag, /proc/PID/ns entry)
NAMESPACES: dict[str, tuple[int, str]] = {
    "user": (CLONE_NEWUSER, "user"),
    "ipc": (CLONE_NEWIPC, "ipc"),
    "uts": (CLONE_NEWUTS, "uts"),
    "network": (CLONE_NEWNET, "net"),
    "pid": (CLONE_NEWPID, "pid"),
    "mount": (CLONE_NEWNS, "mnt"),
    "cgroup": (CLONE_NEWCGROUP, "cgroup"),
}

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_SET_NAME = 15
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4

_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long
CLOSE_RANGE_CLOEXEC = 4
_close_range = getattr(_libc, "close_range", None)  # glibc >= 2.34
if _close_range is not None:
    _close_range.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_int]


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), f"unshare({flags:#x})")


def setns(fd: int, nstype: int = 0, what: str = "") -> None:
    _check(_libc.setns(fd, nstype), f"setns {what}")


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
    ret = _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data or None))
    _check(ret, f"mount {source or fstype or ''} on {target} (flags {flags:#x}, data {data!r})")


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    # SYS_pivot_root is 155 on x86_64 and 41 on aarch64; glibc has no wrapper.
    nr = 41 if os.uname().machine == "aarch64" else 155
    _check(_libc.syscall(nr, _b(new_root), _b(put_old)), f"pivot_root {new_root}")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), f"sethostname {name!r}")


def setdomainname(name: str) -> None:
    raw = name.encode()
    _check(_libc.setdomainname(raw, len(raw)), f"setdomainname {name!r}")


def prctl(option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int:
    return _check(_libc.prctl(option, a2, a3, a4, a5), f"prctl({option})")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def capset(effective: int, permitted: int, inheritable: int) -> None:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        shift = 32 * i
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    _check(_libc.capset(ctypes.byref(header), data), "capset")


_PERSONALITY_DOMAINS = {"LINUX": 0x0000, "LINUX32": 0x0008}


def set_personality(spec: dict) -> None:
    """The spec's linux.personality (execution domain; the flags are reserved and unused)."""
    domain = spec.get("domain", "LINUX")
    if domain not in _PERSONALITY_DOMAINS:
        raise OSError(22, f"unknown personality domain {domain!r} (LINUX or LINUX32)")
    _libc.personality.argtypes = [ctypes.c_ulong]
    _check(_libc.personality(_PERSONALITY_DOMAINS[domain]), f"personality {domain}")


def cloexec_from(first: int, keep: range = range(0)) -> None:
    """Mark every fd >= first close-on-exec except those in keep (--preserve-fds): one
    close_range(CLOSE_RANGE_CLOEXEC) per run of fds (Linux 5.11), else fd by fd from
    /proc/self/fd (a forked shim has ~35 open: as many ioctls)."""
    if _close_range is not None and keep.step == 1:
        runs = [(first, keep.start - 1), (max(first, keep.stop), 0xFFFFFFFF)] if keep else \
            [(first, 0xFFFFFFFF)]
        if all(_close_range(lo, hi, CLOSE_RANGE_CLOEXEC) == 0 for lo, hi in runs if lo <= hi):
            return
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd >= first and fd not in keep:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass
