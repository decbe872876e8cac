"""What runs in the forked container process between fork and execve (create and exec).

The process does its namespace and mount setup first and joins the container's cgroup
late, just before pivot_root: the Python interpreter's pages were charged to the
caller's cgroup when they were first touched and stay there (v1 without
move_charge_at_immigrate, and always on v2), so only what is touched after the join counts
against the container's limit; a 6 MiB memory limit is enough for `busybox true`.
With a new cgroup namespace the join comes before the mounts instead, so that the
namespace's root is the container's cgroup.

Every failure is reported to the parent through the sync pipe as "error <message>"; the
child then exits without running any of the parent's cleanup code.
"""

from __future__ import annotations

import os
import resource
import signal

from shimd.oci import caps, hooks, linux, rootfs, seccomp

_TIOCSCTTY = 0x540E
_TIOCGPTN = 0x80045430
_TIOCSPTLCK = 0x40045431
_TIOCSWINSZ = 0x5414


# what the Python runtime ignores at start-up; the container's processes get the defaults
_PYTHON_IGNORES = (signal.SIGPIPE, signal.SIGXFSZ)


class ContainerError(Exception):
    """A setup step failed; the message says which, for the person reading `runtime create`."""


def send(fd: int, message: str) -> None:
    os.write(fd, (message.replace("\n", " ") + "\n").encode())


def child_main(fn, sync_w: int, *args) -> None:
    """Run fn in a forked child; never return into the parent's stack. The garbage
    collector stays off: a full collection would write to every object's header, copying
    (and charging to the container's cgroup) pages the child shares with its parent."""
    import gc

    gc.disable()
    code = 1
    try:
        fn(sync_w, *args)
        code = 0
    except BaseException as e:  # noqa: BLE001 - everything must reach the parent
        try:
            send(sync_w, f"error {e}")
        except OSError:
            pass
    finally:
        os._exit(code)


def set_oom_score_adj(value: int) -> None:
    """Lowering needs CAP_SYS_RESOURCE; without it keep the current value (containerd's
    restrict_oom_score_adj does the same) instead of failing the container."""
    fd = os.open("/proc/self/oom_score_adj", os.O_RDWR | os.O_CLOEXEC)
    try:
        current = int(os.read(fd, 32))
        try:
            os.pwrite(fd, str(value).encode(), 0)
        except PermissionError:
            if value >= current:
                raise
    finally:
        os.close(fd)


def enter_namespaces(namespaces: list[dict], sync_w: int = -1, reply_r: int = -1) -> bool:
    """setns into the spec's paths (user first), then a new user namespace if asked (the
    runtime command writes its uid/gid maps while we wait), then unshare the rest (owned by
    that user namespace). True if a new cgroup namespace is still to be made (it comes after
    the cgroup join)."""
    new_flags, joins = 0, []
    for ns in namespaces or ():
        if ns["type"] not in linux.NAMESPACES:
            raise ContainerError(f"unknown namespace type {ns['type']!r}")
        flag, _ = linux.NAMESPACES[ns["type"]]
        if ns.get("path"):
            joins.append((flag != linux.CLONE_NEWUSER, flag, ns["path"], ns["type"]))
        else:
            new_flags |= flag
    for _, flag, path, kind in sorted(joins):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            linux.setns(fd, flag, f"{kind} namespace {path}")
        finally:
            os.close(fd)
    if new_flags & linux.CLONE_NEWUSER:
        linux.unshare(linux.CLONE_NEWUSER)
        send(sync_w, f"userns {os.getpid()}")
        reply = os.read(reply_r, 4096).decode()
        if reply != "mapped":
            raise ContainerError(reply or "the runtime command went away before mapping ids")
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    rest = new_flags & ~(linux.CLONE_NEWCGROUP | linux.CLONE_NEWUSER)
    if rest:
        linux.unshare(rest)
    return bool(new_flags & linux.CLONE_NEWCGROUP)


def join_cgroup(procs_fds: list[int]) -> None:
    for fd in procs_fds:
        os.write(fd, b"0")
        os.close(fd)


def preload_console() -> None:
    """Import what setup_console needs while the host's filesystem is still visible: an
    exec'd process has already entered the container's mount namespace when it runs it."""
    import fcntl  # noqa: F401
    import socket  # noqa: F401
    import struct  # noqa: F401


def setup_console(ptmx_path: str, pts_dir: str, console_sock, size: dict | None) -> str:
    """Make a pty inside the container, hand the master to the caller over the console
    socket (SCM_RIGHTS, as runc does), and make the slave our stdio and controlling tty."""
    import fcntl  # imported by the parent already (preload_console): no files needed here
    import socket
    import struct

    master = os.open(ptmx_path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    fcntl.ioctl(master, _TIOCSPTLCK, struct.pack("i", 0))
    n = struct.unpack("I", fcntl.ioctl(master, _TIOCGPTN, b"\0" * 4))[0]
    slave_path = os.path.join(pts_dir, str(n))
    slave = os.open(slave_path, os.O_RDWR | os.O_NOCTTY)
    if size:
        fcntl.ioctl(slave, _TIOCSWINSZ, struct.pack("HHHH", size.get("height", 0), size.get("width", 0), 0, 0))
    socket.send_fds(console_sock, [b"/dev/ptmx"], [master])
    console_sock.close()
    os.close(master)
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    fcntl.ioctl(0, _TIOCSCTTY, 0)
    if slave > 2:
        os.close(slave)
    return slave_path


def find_executable(args: list[str], env: list[str], cwd: str) -> str:
    if not args:
        raise ContainerError("process.args must not be empty")
    name = args[0]
    if "/" in name:
        path = name if name.startswith("/") else os.path.join(cwd, name)
        if os.path.isdir(path):
            raise ContainerError(f'exec: "{name}": is a directory')
        if os.access(path, os.X_OK):
            return path
        if os.path.exists(path):  # as runc words it: docker maps this to 126, absence to 127
            raise ContainerError(f'exec: "{name}": permission denied')
        raise ContainerError(f'exec: "{name}": stat {name}: no such file or directory')
    search = next((e[5:] for e in env if e.startswith("PATH=")), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    for d in search.split(":"):
        path = os.path.join(d or ".", name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    raise ContainerError(f'exec: "{name}": executable file not found in $PATH')


def environment(proc: dict) -> list[str]:
    env = list(proc.get("env") or [])
    if not any(e.startswith("HOME=") for e in env):
        home = "/"
        uid = (proc.get("user") or {}).get("uid", 0)
        try:
            with open("/etc/passwd") as f:
                for line in f:
                    fields = line.strip().split(":")
                    if len(fields) >= 6 and fields[2] == str(uid):
                        home = fields[5] or "/"
                        break
        except OSError:
            pass
        env.append(f"HOME={home}")
    return env


def set_rlimits(rlimits: list[dict] | None) -> None:
    for r in rlimits or ():
        which = getattr(resource, r["type"], None)
        if which is None:
            raise ContainerError(f"unknown rlimit {r['type']!r}")
        try:
            resource.setrlimit(which, (r["soft"], r["hard"]))
        except (ValueError, OSError) as e:
            raise ContainerError(f"setrlimit {r['type']} {r['soft']}/{r['hard']}: {e}") from None


def finalize(proc: dict, profile: dict | None, exe: str, env: list[str],
             personality: dict | None = None) -> None:
    """Become the user process: rlimits, user and groups, capabilities, no_new_privs,
    seccomp (before dropping CAP_SYS_ADMIN unless no_new_privs allows loading it later),
    then execve. In runc's order."""
    set_rlimits(proc.get("rlimits"))
    if personality:
        linux.set_personality(personality)
    spec_caps = proc.get("capabilities")
    last = caps.last_cap()
    nnp = bool(proc.get("noNewPrivileges"))
    if profile and not nnp:
        seccomp.load(profile)
    user = proc.get("user") or {}
    cwd = proc.get("cwd") or "/"
    late_chdir = False
    try:
        os.chdir(cwd)
    except PermissionError:
        late_chdir = True
    except OSError as e:
        raise ContainerError(f"chdir to cwd ({cwd!r}) set in config.json failed: {e.strerror}") from None
    if spec_caps is not None:
        caps.drop_bounding(caps.mask(spec_caps.get("bounding"), last), last)
    linux.prctl(linux.PR_SET_KEEPCAPS, 1)
    uid, gid = user.get("uid", 0), user.get("gid", 0)
    os.setgroups(list(user.get("additionalGids") or []))
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    linux.prctl(linux.PR_SET_KEEPCAPS, 0)
    if spec_caps is not None:
        caps.apply(spec_caps, last)
    if late_chdir:
        os.chdir(cwd)
    umask = user.get("umask")
    os.umask(0o022 if umask is None else umask)
    if nnp:
        linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
        if profile:
            seccomp.load(profile)
    env_map = dict(e.split("=", 1) for e in env if "=" in e)
    for sig in _PYTHON_IGNORES:  # an ignored signal stays ignored across execve
        signal.signal(sig, signal.SIG_DFL)
    os.execve(exe, proc["args"], env_map)


def _write_sysctls(sysctl: dict | None) -> None:
    for key, value in (sysctl or {}).items():
        path = "/proc/sys/" + key.replace(".", "/")
        if ".." in key.split("."):
            raise ContainerError(f"invalid sysctl {key!r}")
        try:
            with open(path, "w") as f:
                f.write(value)
        except OSError as e:
            raise ContainerError(f"write sysctl {key}={value}: {e.strerror}") from None


def _creation_hooks(sync_w: int, hook_r: int, spec: dict, container_id: str, bundle: str) -> None:
    """createRuntime/prestart run by the runtime command (in its namespaces) while we wait,
    then createContainer here, in the container's namespaces, before pivot_root."""
    send(sync_w, "hooks")
    reply = os.read(hook_r, 4096).decode()
    if reply != "go":
        raise ContainerError(reply or "the runtime command went away during hooks")
    os.close(hook_r)
    # The pid as this (container) namespace sees it, which is what runc reports here too.
    hooks.run(spec, "createContainer", hooks.state_json(spec, container_id, "created", os.getpid(), bundle))


def _exit_on_signals() -> None:
    """A pid-namespace init only receives signals it handles: while held before start, let
    the usual termination signals end it (runc's Go init behaves the same way); execve
    resets the handlers."""

    def handler(signum, _frame):
        os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, handler)


def container_init(sync_w: int, spec: dict, root: str, fifo_fd: int, procs_fds: list[int], cgroup,
                   console_sock, no_pivot: bool, hook_r: int, container_id: str, bundle: str) -> None:
    """The container's init before execve (pid 1 of a new pid namespace)."""
    proc = spec["process"]
    lin = spec.get("linux") or {}
    os.setsid()
    os.umask(0)
    if proc.get("oomScoreAdj") is not None:
        set_oom_score_adj(proc["oomScoreAdj"])
    new_cgroupns = any(ns["type"] == "cgroup" and not ns.get("path") for ns in lin.get("namespaces") or ())
    if new_cgroupns:
        join_cgroup(procs_fds)
        linux.unshare(linux.CLONE_NEWCGROUP)
    has_mntns = any(ns["type"] == "mount" for ns in lin.get("namespaces") or ())
    if not has_mntns:
        raise ContainerError("the spec must have a mount namespace to set up the rootfs")
    propagation = rootfs.PROPAGATION.get(lin.get("rootfsPropagation") or "rprivate")
    if propagation is None:
        raise ContainerError(f"invalid rootfsPropagation {lin.get('rootfsPropagation')!r}")
    linux.mount(None, "/", None, propagation)
    if not propagation & linux.MS_REC or propagation & linux.MS_SHARED:
        # else no mount is shared any more (rprivate, rslave, runbindable): no need to
        # read and parse the host's whole mount table
        rootfs.make_parent_mount_private(root)
    linux.mount(root, root, None, linux.MS_BIND | linux.MS_REC)
    mounts = spec.get("mounts") or []
    for m in mounts:
        rootfs.mount_one(root, m, cgroup, new_cgroupns)
    userns = any(ns["type"] == "user" for ns in lin.get("namespaces") or ())
    if rootfs.needs_dev(mounts):
        rootfs.create_devices(root, lin.get("devices"), bind=userns)
        rootfs.dev_symlinks(root)
    os.makedirs(rootfs.secure_join(root, proc.get("cwd") or "/"), 0o755, exist_ok=True)
    if proc.get("terminal"):
        pts = rootfs.secure_join(root, "/dev/pts")
        slave = setup_console(os.path.join(pts, "ptmx"), pts, console_sock, proc.get("consoleSize"))
        console = rootfs.secure_join(root, "/dev/console")
        if not os.path.lexists(console):
            os.close(os.open(console, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        linux.mount(slave, console, None, linux.MS_BIND)
    if spec.get("hooks"):
        _creation_hooks(sync_w, hook_r, spec, container_id, bundle)
    if spec.get("hostname"):
        linux.sethostname(spec["hostname"])
    if spec.get("domainname"):
        linux.setdomainname(spec["domainname"])
    if not new_cgroupns:
        join_cgroup(procs_fds)
    if no_pivot:
        rootfs.move_root(root)
    else:
        rootfs.pivot(root)
    _write_sysctls(lin.get("sysctl"))
    for path in lin.get("readonlyPaths") or ():
        rootfs.readonly_path(path)
    for path in lin.get("maskedPaths") or ():
        rootfs.mask_path(path)
    if (spec.get("root") or {}).get("readonly"):
        rootfs.remount_root_readonly()
    for m in mounts:
        if os.path.normpath(m.get("destination", "")) == "/dev" and "ro" in (m.get("options") or ()):
            linux.mount(None, "/dev", None, linux.MS_REMOUNT | linux.MS_RDONLY | rootfs.locked_flags("/dev"))
    env = environment(proc)
    exe = find_executable(proc.get("args") or [], env, proc.get("cwd") or "/")
    profile = lin.get("seccomp")
    _exit_on_signals()
    send(sync_w, "ready")
    os.close(sync_w)
    while True:
        try:
            if os.read(fifo_fd, 1):
                break
        except InterruptedError:
            continue
    os.close(fifo_fd)
    try:
        if spec.get("hooks"):
            hooks.run(spec, "startContainer",
                      hooks.state_json(spec, container_id, "running", os.getpid(), bundle))
        finalize(proc, profile, exe, env, lin.get("personality"))
    except BaseException as e:
        os.write(2, f"shimd.oci: container init: {e}\n".encode())
        os._exit(1)


def exec_init(sync_w: int, spec: dict, proc: dict, procs_fds: list[int], console_sock) -> None:
    """A process exec'd into a running container (namespaces already joined by the parent)."""
    os.setsid()
    if proc.get("terminal"):
        setup_console("/dev/pts/ptmx", "/dev/pts", console_sock, proc.get("consoleSize"))
    if proc.get("oomScoreAdj") is not None:
        set_oom_score_adj(proc["oomScoreAdj"])
    env = environment(proc)
    exe = find_executable(proc.get("args") or [], env, proc.get("cwd") or "/")
    profile = (spec.get("linux") or {}).get("seccomp")
    join_cgroup(procs_fds)
    finalize(proc, profile, exe, env, (spec.get("linux") or {}).get("personality"))

