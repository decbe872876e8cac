"""The spec's linux.seccomp translated into a filter through libseccomp (ctypes).

Matches runc: unknown syscall names are skipped, rules whose action equals the default are
skipped (libseccomp refuses them), several conditions on one argument become one rule per
condition (libseccomp cannot AND two conditions on the same argument), and libseccomp's own
no_new_privs is turned off so the spec's noNewPrivileges alone decides it.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import hashlib
import json
import os

from runtimed.errors import InvalidArgument

SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_KILL_THREAD = 0x00000000
SCMP_ACT_TRAP = 0x00030000
SCMP_ACT_LOG = 0x7FFC0000
SCMP_ACT_ALLOW = 0x7FFF0000
_FLTATR_CTL_NNP = 3

_OPS = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4,
        "SCMP_CMP_GE": 5, "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7}


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]


_lib = None


def _libseccomp():
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        except OSError as e:
            raise OSError(_errno.ENOSYS, f"seccomp requested but libseccomp.so.2 is missing: {e}") from None
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        lib.seccomp_load.argtypes = [ctypes.c_void_p]
        lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
        lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
        lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_version.restype = ctypes.POINTER(_Version)
        lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                               ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
        _lib = lib
    return _lib


def prepare(profile: dict | None = None) -> None:
    """Check the profile's actions and operators and load libseccomp now: errors surface at
    `create`, and the library is mapped before pivot_root hides the host's files."""
    if profile:
        default_errno = profile.get("defaultErrnoRet")
        action(profile.get("defaultAction", "SCMP_ACT_ALLOW"), None, default_errno)
        for rule in profile.get("syscalls") or ():
            action(rule.get("action", ""), rule.get("errnoRet"), default_errno)
            for arg in rule.get("args") or ():
                if arg.get("op") not in _OPS:
                    raise InvalidArgument(f"seccomp: unknown operator {arg.get('op')!r}")
    _libseccomp()


def action(name: str, errno_ret: int | None, default_errno: int | None = None) -> int:
    """The libseccomp action value for a spec action name."""
    if name == "SCMP_ACT_ERRNO":
        code = errno_ret if errno_ret is not None else (default_errno if default_errno is not None else _errno.EPERM)
        return 0x00050000 | (code & 0xFFFF)
    if name == "SCMP_ACT_TRACE":
        code = errno_ret if errno_ret is not None else (default_errno if default_errno is not None else _errno.EPERM)
        return 0x7FF00000 | (code & 0xFFFF)
    if name == "SCMP_ACT_NOTIFY":
        raise InvalidArgument("seccomp: SCMP_ACT_NOTIFY needs a listener (listenerPath), which is not supported")
    fixed = {"SCMP_ACT_KILL": SCMP_ACT_KILL_THREAD, "SCMP_ACT_KILL_THREAD": SCMP_ACT_KILL_THREAD,
             "SCMP_ACT_KILL_PROCESS": SCMP_ACT_KILL_PROCESS, "SCMP_ACT_TRAP": SCMP_ACT_TRAP,
             "SCMP_ACT_ALLOW": SCMP_ACT_ALLOW, "SCMP_ACT_LOG": SCMP_ACT_LOG}
    if name not in fixed:
        raise InvalidArgument(f"seccomp: unknown action {name!r}")
    return fixed[name]


def _check(ret: int, what: str) -> None:
    if ret < 0:
        raise OSError(-ret, f"seccomp {what}: {os.strerror(-ret)}")


# A memfd the runtime command fills with the container's compiled filter while the init
# sets up its mounts (`precompile`); the init, forked before, installs it after `start`.
PRECOMPILED_FD: int | None = None
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def precompile_into(fd: int, profile: dict) -> None:
    """Compile `profile` into `fd` (the `PRECOMPILED_FD` of a process forked earlier).
    The same program seccomp_load would load: libseccomp's own export of it, and loading
    with no flags (no tsync, log or spec-allow attribute is ever set here)."""
    lib = _libseccomp()
    ctx = _build(profile)
    try:
        _check(lib.seccomp_export_bpf(ctx, fd), "export")
    finally:
        lib.seccomp_release(ctx)


# Compiled programs by profile, per boot: the same profile compiles to the same program on
# the same kernel, architecture and libseccomp, and compiling a Docker-like one costs ~10 ms
# of CPU per container. Root-only; "" (the environment variable set empty) turns it off.
CACHE_DIR = os.environ.get("SHIMD_OCI_SECCOMP_CACHE", "/run/shimd-oci/seccomp-cache")
CACHE_MAX_ENTRIES = 256
_MAX_PROGRAM = 4096 * 8  # BPF_MAXINSNS sock_filter instructions


def cache_key(profile: dict) -> str:
    """What the program depends on: the profile, libseccomp's version, the kernel (whose
    features libseccomp probes) and the architecture."""
    v = _libseccomp().seccomp_version().contents
    u = os.uname()
    text = json.dumps(profile, sort_keys=True, separators=(",", ":"))
    meta = f"1 {v.major}.{v.minor}.{v.micro} {u.release} {u.machine}\n"
    return hashlib.sha256(meta.encode() + text.encode()).hexdigest()


def _cache_dir_fd(create: bool) -> int | None:
    """The cache directory, only if it is ours alone (owned by us, writable by no one else)."""
    if not CACHE_DIR:
        return None
    if create:
        try:
            os.makedirs(CACHE_DIR, 0o700, exist_ok=True)
        except OSError:
            return None
    try:
        fd = os.open(CACHE_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        os.close(fd)
        return None
    return fd


def open_cached(key: str) -> int | None:
    """An fd on the program compiled earlier for the profile whose `cache_key` is `key`,
    or None (not cached, or not trusted)."""
    dir_fd = _cache_dir_fd(create=False)
    if dir_fd is None:
        return None
    try:
        fd = os.open(key, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    finally:
        os.close(dir_fd)
    st = os.fstat(fd)
    if (st.st_uid != os.geteuid() or st.st_mode & 0o022 or not 0 < st.st_size <= _MAX_PROGRAM
            or st.st_size % 8):
        os.close(fd)
        return None
    return fd


def cached_program(key: str) -> bytes | None:
    """The program compiled earlier for the profile whose `cache_key` is `key`, or None
    (not cached, or not trusted)."""
    fd = open_cached(key)
    if fd is None:
        return None
    try:
        size = os.fstat(fd).st_size
        program = os.pread(fd, size, 0)
        return program if len(program) == size else None
    finally:
        os.close(fd)


def cache_program(key: str, program: bytes) -> bool:
    """Keep `program` (just compiled for the profile of `key`) for the next container.
    Best effort: whether it is in the cache now."""
    if not program or len(program) > _MAX_PROGRAM or len(program) % 8:
        return False
    dir_fd = _cache_dir_fd(create=True)
    if dir_fd is None:
        return False
    try:
        names = os.listdir(dir_fd)
        if len(names) >= CACHE_MAX_ENTRIES:  # many distinct profiles: start over
            for name in names:
                os.unlink(name, dir_fd=dir_fd)
        tmp = f".{key}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dir_fd)
        try:
            complete = os.write(fd, program) == len(program)
        finally:
            os.close(fd)
        if complete:
            os.rename(tmp, key, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            return True
        os.unlink(tmp, dir_fd=dir_fd)
        return False
    except OSError:
        return False
    finally:
        os.close(dir_fd)


def load(profile: dict) -> None:
    """Load the filter for `profile` (the spec's linux.seccomp) into this process: the
    precompiled one when the runtime command left it in PRECOMPILED_FD, else build it
    here (~10 ms of a container's start for a Docker-like profile)."""
    if PRECOMPILED_FD is not None:
        size = os.fstat(PRECOMPILED_FD).st_size
        program = os.pread(PRECOMPILED_FD, size, 0) if size else b""
        os.close(PRECOMPILED_FD)
        if program:
            _install(program)
            return
    lib = _libseccomp()
    ctx = _build(profile)
    try:
        _check(lib.seccomp_load(ctx), "load")
    finally:
        lib.seccomp_release(ctx)


def _install(program: bytes) -> None:
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buffer))  # sock_filter: 8 bytes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp load: {os.strerror(err)}")


def _build(profile: dict):
    """A libseccomp context with the profile's rules (the caller releases it)."""
    lib = _libseccomp()
    default_errno = profile.get("defaultErrnoRet")
    default = action(profile.get("defaultAction", "SCMP_ACT_ALLOW"), None, default_errno)
    ctx = lib.seccomp_init(default)
    if not ctx:
        raise OSError(_errno.EINVAL, "seccomp_init failed")
    try:
        _check(lib.seccomp_attr_set(ctx, _FLTATR_CTL_NNP, 0), "disable no_new_privs")
        for arch in profile.get("architectures") or ():
            token = lib.seccomp_arch_resolve_name(arch.removeprefix("SCMP_ARCH_").lower().encode())
            if token == 0:
                continue
            ret = lib.seccomp_arch_add(ctx, token)
            if ret < 0 and ret != -_errno.EEXIST:
                _check(ret, f"add architecture {arch}")
        for rule in profile.get("syscalls") or ():
            act = action(rule.get("action", ""), rule.get("errnoRet"), default_errno)
            if act == default:
                continue
            args = rule.get("args") or []
            cmps = [_ArgCmp(a["index"], _OPS[a["op"]], a.get("value", 0), a.get("valueTwo", 0))
                    for a in args]
            indices = [c.arg for c in cmps]
            groups = [[c] for c in cmps] if len(set(indices)) != len(indices) else [cmps]
            for name in rule.get("names") or ():
                nr = lib.seccomp_syscall_resolve_name(name.encode())
                if nr == -1:
                    continue  # unknown to this libseccomp/arch: runc skips it too
                for group in groups:
                    arr = (_ArgCmp * len(group))(*group) if group else None
                    _check(lib.seccomp_rule_add_array(ctx, act, nr, len(group), arr), f"rule {name}")
    except BaseException:
        lib.seccomp_release(ctx)
        raise
    return ctx


try:  # mapped once in the shim zygote, so no create worker loads it again
    _libseccomp()
except OSError:
    pass  # reported by prepare() when a spec asks for seccomp
