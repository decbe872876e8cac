"""The runtime's operations, one function per runc command (create, start, state, ...)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from runtimed.errors import FailedPrecondition, InvalidArgument, NotFound
from shimd import cgroups
from shimd.oci.state import OCI_VERSION, State, Store, init_alive, now_rfc3339, proc_start_time

SECCOMP_PROGRAM = "seccomp.bpf"  # the container's compiled filter, for exec


def _cgroup(state: State):
    return cgroups.open(state.cgroup_path)


def status(state: State, store: Store) -> str:
    if not init_alive(state):
        return "stopped"
    if os.path.exists(store.fifo(state.id)):
        return "created"
    try:
        if _cgroup(state).frozen():
            return "paused"
    except (OSError, InvalidArgument):
        pass
    return "running"


def _write_pid_file(path: str | None, pid: int) -> None:
    if not path:
        return
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp")
    with open(tmp, "w") as f:
        f.write(str(pid))
    os.rename(tmp, path)


def _connect_console(path: str | None):
    if not path:
        return None
    import socket

    from shimd.oci import init

    init.preload_console()

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        raise InvalidArgument(f"connect to console socket {path}: {e.strerror}") from None
    return sock


class SyncReport:
    """What the forked children report on the sync pipe: "pid N" (unless `pid` is known;
    on_pid(N) runs then), maybe "hooks" (the init waits for on_hooks(pid) to run the
    runtime's hooks), then "ready", or "error ..."; EOF ends. Fed what is read, by whoever
    reads the pipe (this module blocking, the shim on its event loop)."""

    def __init__(self, pid: int = 0, on_hooks=None, on_userns=None, on_pid=None) -> None:
        self.pid = pid
        self.result: str | None = None  # "ready", "error ...", or None: no report
        self._on_hooks = on_hooks
        self._on_userns = on_userns
        self._on_pid = on_pid
        self._buf = b""
        self._hooks_pending = self._ready = False

    def feed(self, chunk: bytes) -> bool:
        """Take what was read (b"" at EOF); True once `pid` and `result` are final."""
        if not chunk:
            self.result = "ready" if self._ready and self.pid else None
            return True
        self._buf += chunk
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            text = line.decode(errors="replace")
            if text.startswith("pid "):
                if not text[4:].isdigit():
                    raise ValueError(f"malformed report from the container's process: {text!r}")
                self.pid = int(text[4:])
                if self._on_pid is not None:
                    self._on_pid(self.pid)
            elif text == "ready":
                # The init may get this far before its parent has even reported its pid.
                self._ready = True
            elif text == "hooks" and self._on_hooks is not None:
                self._hooks_pending = True
            elif text.startswith("userns ") and self._on_userns is not None:
                self._on_userns(int(text[7:]))
            elif text.startswith("error "):
                self.result = text
                return True
            if self._ready and self.pid:
                self.result = "ready"
                return True
            if self._hooks_pending and self.pid:
                # The init can ask before its parent has reported the init's pid.
                self._hooks_pending = False
                self._on_hooks(self.pid)
        return False


def _read_sync(fd: int, on_hooks=None, on_userns=None, pid: int = 0,
               on_pid=None) -> tuple[int, str | None]:
    """The children's report (`SyncReport`), read from `fd` until it is complete."""
    report = SyncReport(pid, on_hooks, on_userns, on_pid)
    while not report.feed(os.read(fd, 4096)):
        pass
    return report.pid, report.result


def needs_intermediate(spec: dict) -> bool:
    """Whether the init is forked by an intermediate child rather than by the caller: a
    new user namespace must own the container's other namespaces, so a child unshares it
    first (the caller cannot: it stays in the host's)."""
    namespaces = (spec.get("linux") or {}).get("namespaces") or ()
    return any(ns.get("type") == "user" and not ns.get("path") for ns in namespaces)


def _load_spec(bundle: str) -> dict:
    path = os.path.join(bundle, "config.json")
    try:
        with open(path) as f:
            spec = json.load(f)
    except FileNotFoundError:
        raise InvalidArgument(f"bundle {bundle} has no config.json") from None
    except ValueError as e:
        raise InvalidArgument(f"{path} is not valid JSON: {e}") from None
    if not (spec.get("process") or {}).get("args"):
        raise InvalidArgument(f"{path}: process.args must not be empty")
    if not (spec.get("root") or {}).get("path"):
        raise InvalidArgument(f"{path}: root.path is required")
    _validate_process(spec["process"], path)
    personality = (spec.get("linux") or {}).get("personality")
    if personality and personality.get("domain", "LINUX") not in ("LINUX", "LINUX32"):
        raise InvalidArgument(f"{path}: linux.personality.domain must be LINUX or LINUX32")
    return spec


def _validate_process(proc: dict, where: str) -> None:
    """What would otherwise fail only after `start`, in the container's init."""
    import resource

    for r in proc.get("rlimits") or ():
        if not r.get("type", "").startswith("RLIMIT_") or not hasattr(resource, r["type"]):
            raise InvalidArgument(f"{where}: unknown rlimit {r.get('type')!r}")
        if r.get("soft", 0) > r.get("hard", 0):
            raise InvalidArgument(f"{where}: rlimit {r['type']} soft limit is above the hard limit")
    if not (proc.get("cwd") or "/").startswith("/"):
        raise InvalidArgument(f"{where}: process.cwd must be an absolute path")


def create(store: Store, container_id: str, bundle: str, pid_file: str | None = None,
           console_socket: str | None = None, no_pivot: bool = False, preserve_fds: int = 0) -> State:
    creation = begin_create(store, container_id, bundle, console_socket, no_pivot,
                            preserve_fds=preserve_fds)
    try:
        pid, result = _read_sync(creation.sync, creation.on_hooks, creation.on_userns,
                                 creation.pid, creation.on_pid)
    except BaseException:
        creation.abort()
        raise
    finally:
        creation.close()
        if creation.intermediate:
            os.waitpid(creation.intermediate, 0)
    return finish_create(creation, pid, result, pid_file)


class Creation:
    """A create whose init has been forked: wait for its report on `sync` (the init's
    "ready", or "error ..."), then `finish_create`; `abort` undoes it all on failure.
    `pid` is the init's host pid when this process forked it itself (0 when an
    intermediate child forks it and reports "pid N"); `intermediate` that child's pid."""

    def __init__(self, store: Store, container_id: str, bundle: str, root: str, spec: dict,
                 cgroup_path: str) -> None:
        self.store = store
        self.id = container_id
        self.bundle = bundle
        self.root = root
        self.spec = spec
        self.cgroup_path = cgroup_path
        self.cgroup = None
        self.pid = 0
        self.intermediate = 0
        self.sync = -1
        self.hook_w = -1
        self.state: State | None = None  # saved once the init's host pid is known
        self.pid_file: str | None = None  # written with the state, removed by abort

    def close(self) -> None:
        for fd in (self.sync, self.hook_w):
            if fd >= 0:
                os.close(fd)
        self.sync = self.hook_w = -1

    def on_userns(self, pid: int) -> None:
        try:
            _write_id_maps(pid, self.spec.get("linux") or {})
        except OSError as e:
            os.write(self.hook_w, f"write uid/gid maps: {e}".encode())
            raise
        os.write(self.hook_w, b"mapped")

    def on_pid(self, pid: int) -> None:
        """The init's host pid, as the intermediate child reports it: the state saved at
        once, while the init sets up (as when this process forked the init itself)."""
        self.state = _save_state(self, pid)

    def on_hooks(self, init_pid: int) -> None:
        from shimd.oci import hooks

        state = hooks.state_json(self.spec, self.id, "created", init_pid, self.bundle)
        try:
            hooks.run(self.spec, "prestart", state)
            hooks.run(self.spec, "createRuntime", state)
        except hooks.HookError as e:
            os.write(self.hook_w, str(e).encode())
            raise
        os.write(self.hook_w, b"go")

    def abort(self, pid: int = 0) -> None:
        self.close()
        for victim in {pid, self.pid, self.state.pid if self.state else 0} - {0}:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.cgroup is not None:
            try:
                _destroy_cgroup(self.cgroup, timeout=1)
            except OSError:
                pass  # the setup error is the one to report
        self.store.remove(self.id)
        if self.pid_file:
            try:
                os.unlink(self.pid_file)
            except OSError:
                pass


def begin_create(store: Store, container_id: str, bundle: str, console_socket: str | None = None,
                 no_pivot: bool = False, stdio: tuple[int, int, int] = (0, 1, 2),
                 preserve_fds: int = 0, pid_file: str | None = None) -> Creation:
    """Everything of `create` up to the init's report: the state dir, cgroup, fifo, and the
    init forked. Without a new user namespace this process forks the init itself: it makes
    (or joins) the container's pid namespace for its children only (`unshare` or `setns`
    with CLONE_NEWPID set pid_for_children, never this process's own pid) around the one
    fork and goes back to its own at once, and the init unshares (or joins) the other
    namespaces. A new user namespace must own the others, so there an intermediate child
    unshares it first, the rest after, and forks the init (two forks). The caller must be
    single-threaded."""
    from shimd.oci import init, linux, seccomp

    bundle = os.path.abspath(bundle)
    spec = _load_spec(bundle)
    root = os.path.join(bundle, spec["root"]["path"])
    if spec["process"].get("terminal") and not console_socket:
        raise InvalidArgument("process.terminal is set but no --console-socket was given")
    lin = spec.get("linux") or {}
    namespaces = lin.get("namespaces") or []
    cgroup_path = cgroups.normalize(lin.get("cgroupsPath") or f"/{container_id}")
    program = cache_key = None
    if lin.get("seccomp"):
        seccomp.prepare(lin["seccomp"])
        cache_key = seccomp.cache_key(lin["seccomp"])
        program = seccomp.cached_program(cache_key)
    store.reserve(container_id)
    creation = Creation(store, container_id, bundle, root, spec, cgroup_path)
    seccomp_fd = None
    child_fds: list[int] = []
    own_pidns = -1
    console = None
    try:
        os.mkfifo(store.fifo(container_id), 0o600)
        creation.cgroup = cgroup = cgroups.open(cgroup_path)
        cgroup.create()
        cgroup.update(lin.get("resources") or {})
        console = _connect_console(console_socket)
        # Opened here, by root in the host's namespaces: a user-namespaced init could not.
        fifo_fd = os.open(store.fifo(container_id), os.O_RDWR | os.O_CLOEXEC)
        child_fds.append(fifo_fd)
        procs_fds = [os.open(p, os.O_WRONLY | os.O_CLOEXEC) for p in cgroup.procs_files()]
        child_fds += procs_fds
        if lin.get("seccomp"):
            seccomp_fd = seccomp.PRECOMPILED_FD = os.memfd_create("seccomp")  # the init's copy
            if program:  # compiled for an earlier container: complete before the init exists
                os.write(seccomp_fd, program)
        r, w = os.pipe()
        creation.sync = r
        hook_r, creation.hook_w = os.pipe()
        child_fds += [w, hook_r]
        args = (spec, root, fifo_fd, procs_fds, cgroup, console, no_pivot, hook_r, container_id,
                bundle)
        if needs_intermediate(spec):
            child = os.fork()
            if child == 0:
                init.child_main(_intermediate, w, stdio, preserve_fds, *args)
            creation.intermediate = child
        else:
            pid_ns = next((ns for ns in namespaces if ns.get("type") == "pid"), None)
            if pid_ns is not None:
                own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
                _enter_pid_namespace_for_children(pid_ns.get("path"))
            child = os.fork()
            if child == 0:  # never returns: the finally below is this process's alone
                init.child_main(_init_direct, w, stdio, preserve_fds, *args)
            creation.pid = child
            if own_pidns >= 0:
                linux.setns(own_pidns, linux.CLONE_NEWPID, "own pid namespace")
                os.close(own_pidns)
                own_pidns = -1
        if not lin.get("uidMappings"):  # a user namespace waits for us: no head start
            _prime_cgroup_attach(cgroup)
        if seccomp_fd is not None:
            seccomp.PRECOMPILED_FD = None  # the init's copy of it; not ours to use again
            cached = program is not None
            if not program:
                try:
                    # compiled here while the init sets up its mounts; loaded by it after start
                    seccomp.precompile_into(seccomp_fd, lin["seccomp"])
                    program = os.pread(seccomp_fd, os.fstat(seccomp_fd).st_size, 0)
                    cached = seccomp.cache_program(cache_key, program)
                except OSError:
                    os.ftruncate(seccomp_fd, 0)  # the init builds it itself and reports why not
            if program and not cached:  # a cached one is found by exec there (_open_program)
                try:
                    _save_program(store, container_id, program)  # for every exec (same profile)
                except OSError:
                    pass  # an exec builds the filter itself
        if creation.pid:
            # saved while the init sets up (off the caller's wait for its report): a caller
            # that dies meanwhile leaves what `delete --force` cleans up with
            creation.state = _save_state(creation, creation.pid)
            if pid_file:  # the shim's; the command line writes its own once the init is ready
                _write_pid_file(pid_file, creation.pid)
                creation.pid_file = pid_file
        return creation
    except BaseException:
        creation.abort()
        raise
    finally:
        if own_pidns >= 0:  # the fork failed: this process's next children are its own
            linux.setns(own_pidns, linux.CLONE_NEWPID, "own pid namespace")
            os.close(own_pidns)
        if seccomp_fd is not None:
            seccomp.PRECOMPILED_FD = None
            os.close(seccomp_fd)
        for fd in child_fds:
            os.close(fd)
        if console is not None:  # the init's copy (or nobody's, when it failed)
            console.close()


def finish_create(creation: Creation, pid: int, result: str | None,
                  pid_file: str | None = None) -> State:
    """After the init's report: the state saved (the container exists), or the error."""
    if result != "ready":
        creation.abort(pid)
        raise FailedPrecondition(
            f"container init failed: {result[6:]}" if result else "container init exited during setup")
    state = creation.state
    try:
        if state is None or state.pid != pid:  # an intermediate child forked the init
            state = creation.state = _save_state(creation, pid)
        if pid_file != creation.pid_file or pid != creation.pid:
            _write_pid_file(pid_file, pid)
    except BaseException:
        creation.abort(pid)
        raise
    return state


def _save_state(creation: Creation, pid: int) -> State:
    info = proc_start_time(pid)
    state = State(id=creation.id, bundle=creation.bundle, rootfs=creation.root, pid=pid,
                  start_time=info[0] if info else 0, created=now_rfc3339(),
                  cgroup_path=creation.cgroup_path, config=creation.spec)
    creation.store.save(state)
    return state


def _enter_pid_namespace_for_children(path: str | None) -> None:
    from shimd.oci import linux

    if not path:
        linux.unshare(linux.CLONE_NEWPID)
        return
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        linux.setns(fd, linux.CLONE_NEWPID, f"pid namespace {path}")
    finally:
        os.close(fd)


def _save_program(store: Store, container_id: str, program: bytes) -> None:
    out = os.open(os.path.join(store.dir(container_id), SECCOMP_PROGRAM),
                  os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(out, program)
    finally:
        os.close(out)


def _open_program(store: Store, container_id: str, profile: dict) -> int | None:
    """The container's compiled filter: its own copy, kept when the program was not
    cached, else the cache's entry for its profile (no file per container for that);
    None: the exec'd process builds the filter."""
    try:
        return os.open(os.path.join(store.dir(container_id), SECCOMP_PROGRAM),
                       os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        from shimd.oci import seccomp

        return seccomp.open_cached(seccomp.cache_key(profile))


def _prime_cgroup_attach(cgroup) -> None:
    """Give the init's cgroup join a head start. Every write to a cgroup.procs file takes
    the kernel's global cgroup_threadgroup_rwsem for writing, and the first writer after a
    quiet spell waits for an RCU grace period (measured: 16 ms of a 45 ms create); writers
    that follow within the next grace period do not. So while the child sets up mounts,
    this process moves itself into the cgroup it is already in (a no-op that takes the
    same lock), and the child's own join a few ms later is quick. Best effort.

    Only where the join takes that lock (cgroup v2): on v1 the child joins through `tasks`
    without it (shimd/cgroups/v1.py), and taking it here would only hold up every fork on
    the machine (fork takes it for reading), the exec's own among them."""
    if not any(p.endswith("cgroup.procs") for p in cgroup.procs_files()):
        return
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                name = controllers.split(",")[0].removeprefix("name=") if controllers else "unified"
                procs = f"/sys/fs/cgroup/{name}{path.rstrip('/')}/cgroup.procs"
                if os.path.exists(procs):
                    with open(procs, "w") as out:
                        out.write("0")
                    return
    except (OSError, ValueError):
        pass


def _write_id_maps(pid: int, lin: dict) -> None:
    for name, key in (("uid_map", "uidMappings"), ("gid_map", "gidMappings")):
        lines = "".join(f"{m['containerID']} {m['hostID']} {m['size']}\n" for m in lin.get(key) or ())
        if not lines:
            raise OSError(22, f"a new user namespace needs linux.{key}")
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(lines)


def _forked(stdio: tuple[int, int, int], preserve_fds: int) -> None:
    """First thing in a child this process forked: the caller's signal handlers and fds
    are none of its business (the caller may be the shim), stdio as asked."""
    import signal as signals

    from shimd.oci import linux

    signals.set_wakeup_fd(-1)
    for sig in (signals.SIGCHLD, signals.SIGTERM, signals.SIGINT):
        signals.signal(sig, signals.SIG_DFL)
    for target, fd in enumerate(stdio):
        if fd != target:
            os.dup2(fd, target)
    linux.cloexec_from(3, range(3, 3 + preserve_fds))  # nothing else reaches the container


def _init_direct(sync_w: int, stdio: tuple[int, int, int], preserve_fds: int, spec: dict,
                 *args) -> None:
    """The init forked by `begin_create` itself (already in its pid namespace): the other
    namespaces, then the container's setup."""
    from shimd.oci import init

    _forked(stdio, preserve_fds)
    namespaces = (spec.get("linux") or {}).get("namespaces") or []
    init.enter_namespaces([ns for ns in namespaces if ns.get("type") != "pid"])
    init.container_init(sync_w, spec, *args)


def _intermediate(sync_w: int, stdio: tuple[int, int, int], preserve_fds: int, spec: dict,
                  root: str, fifo_fd: int, procs_fds: list[int], cgroup, console, no_pivot: bool,
                  hook_r: int, container_id: str, bundle: str) -> None:
    """With a new user namespace: enter the namespaces (the user namespace first, so it owns
    the rest), fork the init (pid 1 of a new pid namespace), report its host pid, and exit
    so the init is reparented to the caller's subreaper."""
    from shimd.oci import init

    _forked(stdio, preserve_fds)
    init.enter_namespaces((spec.get("linux") or {}).get("namespaces") or [], sync_w, hook_r)
    pid = os.fork()
    if pid == 0:
        init.child_main(init.container_init, sync_w, spec, root, fifo_fd, procs_fds, cgroup, console,
                        no_pivot, hook_r, container_id, bundle)
    init.send(sync_w, f"pid {pid}")


def start(store: Store, container_id: str) -> None:
    state = store.load(container_id)
    current = status(state, store)
    if current != "created":
        raise FailedPrecondition(f"cannot start a container in the {current} state")
    try:
        fd = os.open(store.fifo(container_id), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise FailedPrecondition(f"container init is not waiting to start: {e.strerror}") from None
    try:
        os.write(fd, b"0")
    finally:
        os.close(fd)
    os.unlink(store.fifo(container_id))
    if state.config.get("hooks"):
        from shimd.oci import hooks

        for warning in hooks.run_quietly(state.config, "poststart", hooks.state_json(
                state.config, state.id, "running", state.pid, state.bundle)):
            sys.stderr.write(f"shimd.oci: warning: {warning}\n")


def state_json(store: Store, container_id: str) -> dict:
    state = store.load(container_id)
    current = status(state, store)
    out = {
        "ociVersion": OCI_VERSION,
        "id": state.id,
        "pid": state.pid if current != "stopped" else 0,
        "status": current,
        "bundle": state.bundle,
        "rootfs": state.rootfs,
        "created": state.created,
        "owner": state.owner,
    }
    if state.config.get("annotations"):
        out["annotations"] = state.config["annotations"]  # omitted when empty, as runc does
    return out


def parse_signal(text: str) -> int:
    if text.isdigit():
        return int(text)
    name = text.upper()
    name = name if name.startswith("SIG") else "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise InvalidArgument(f"unknown signal {text!r}") from None


def kill(store: Store, container_id: str, sig: int, all_processes: bool = False) -> None:
    state = store.load(container_id)
    current = status(state, store)
    if not all_processes:
        if current == "stopped":
            raise FailedPrecondition("container not running")
        os.kill(state.pid, sig)
        return
    _signal_all(state, sig, current == "paused")


def _signal_all(state: State, sig: int, paused: bool) -> None:
    """Freeze, signal every process in the cgroup, thaw: no fork escapes the signal."""
    cgroup = _cgroup(state)
    if not cgroup.exists():
        return
    frozen = False
    if not paused:
        try:
            cgroup.freeze()
            frozen = True
        except OSError:
            pass
    try:
        for pid in cgroup.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    finally:
        if frozen or (paused and sig == signal.SIGKILL):
            cgroup.thaw()


def _destroy_cgroup(cgroup, timeout: float = 5) -> None:
    for pid in cgroup.pids():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while True:
        try:
            cgroup.delete()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def delete(store: Store, container_id: str, force: bool = False) -> None:
    try:
        state = store.load(container_id)
    except NotFound:
        if force:
            store.remove(container_id)  # a create that died before writing its state
            return
        raise
    current = status(state, store)
    if current in ("running", "paused"):
        if not force:
            raise FailedPrecondition(f"cannot delete container {container_id} that is not stopped: {current}")
        _signal_all(state, signal.SIGKILL, current == "paused")
    elif current == "created":
        os.kill(state.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while init_alive(state) and time.monotonic() < deadline:
        time.sleep(0.005)
    _destroy_cgroup(_cgroup(state))
    store.remove(container_id)
    if state.config.get("hooks"):
        from shimd.oci import hooks

        for warning in hooks.run_quietly(state.config, "poststop", hooks.state_json(
                state.config, state.id, "stopped", 0, state.bundle)):
            sys.stderr.write(f"shimd.oci: warning: {warning}\n")


def delete_at_once(store: Store, container_id: str) -> bool:
    """`delete` when it has nothing to wait for (the init reaped, its cgroup empty and
    removable at once, no hooks): True once done. False, with nothing lost, when `delete`
    would have to wait: the caller runs that where blocking is fine (a shim's thread)."""
    try:
        state = store.load(container_id)
    except NotFound:
        return False
    if state.config.get("hooks") or init_alive(state):
        return False
    cgroup = _cgroup(state)
    try:
        if cgroup.pids() or not cgroup.delete(wait=False):
            return False
    except OSError:
        return False
    store.remove(container_id)
    return True


def pause(store: Store, container_id: str) -> None:
    state = store.load(container_id)
    current = status(state, store)
    if current not in ("running", "created"):
        raise FailedPrecondition(f"cannot pause a container in the {current} state")
    _cgroup(state).freeze()


def resume(store: Store, container_id: str) -> None:
    state = store.load(container_id)
    if status(state, store) != "paused":
        raise FailedPrecondition("container not paused")
    _cgroup(state).thaw()


def ps(store: Store, container_id: str) -> list[int]:
    return sorted(_cgroup(store.load(container_id)).pids())


def update(store: Store, container_id: str, resources: dict) -> None:
    state = store.load(container_id)
    if status(state, store) == "stopped":
        raise FailedPrecondition("cannot update a stopped container")
    _cgroup(state).update(resources)


def stats(store: Store, container_id: str) -> dict:
    state = store.load(container_id)
    if status(state, store) == "stopped":
        raise FailedPrecondition("container not running")
    return {"type": "stats", "id": container_id, "data": _cgroup(state).stats()}


def _exec_checks(store: Store, container_id: str, proc: dict, console_socket: str | None) -> State:
    state = store.load(container_id)
    current = status(state, store)
    if current not in ("running", "created"):
        raise FailedPrecondition(f"cannot exec in a {current} container")
    if proc.get("terminal") and not console_socket:
        raise InvalidArgument("process.terminal is set but no --console-socket was given")
    if not proc.get("args"):
        raise InvalidArgument("process.args must not be empty")
    _validate_process(proc, "process")
    return state


def _open_namespaces(state: State) -> list[tuple[int, int, str]]:
    """fds of the init's namespaces, in the order they are joined: the user namespace first
    (it owns the others), the mount namespace last."""
    from shimd.oci import linux

    ns_fds: list[tuple[int, int, str]] = []
    try:
        for ns in (state.config.get("linux") or {}).get("namespaces") or ():
            flag, name = linux.NAMESPACES[ns["type"]]
            fd = os.open(f"/proc/{state.pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
            ns_fds.append((fd, flag, name))
    except BaseException:
        for fd, _, _ in ns_fds:
            os.close(fd)
        raise
    ns_fds.sort(key=lambda x: (x[2] != "user", x[2] == "mnt"))
    return ns_fds


def exec_process(store: Store, container_id: str, proc: dict, pid_file: str | None = None,
                 console_socket: str | None = None, detach: bool = False, preserve_fds: int = 0) -> int:
    """Start proc inside the container's namespaces and cgroup; returns its exit code when
    not detached (128+signal if signalled), else 0 once it has exec'd (and this command
    exits: the process goes to the caller's subreaper, as with runc)."""
    state = _exec_checks(store, container_id, proc, console_socket)
    child, sync = _fork_exec(state, store, proc, (0, 1, 2), console_socket, preserve_fds)
    try:
        _prime_cgroup_attach(_cgroup(state))
        _, result = _read_sync(sync)
    finally:
        os.close(sync)
    if result is not None:
        os.waitpid(child, 0)
        raise FailedPrecondition(f"exec failed: {result[6:]}")
    _write_pid_file(pid_file, child)
    if detach:
        return 0
    _, status_ = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status_)
    return code if code >= 0 else 128 - code


def fork_exec(store: Store, container_id: str, proc: dict,
              stdio: tuple[int, int, int] = (0, 1, 2), console_socket: str | None = None,
              preserve_fds: int = 0) -> tuple[int, int]:
    """Fork proc into the running container, straight from the caller, which must be
    single-threaded (the `exec` command, or the shim itself): it joins the init's pid
    namespace for its children only (setns(CLONE_NEWPID) sets pid_for_children, never the
    caller's own pid) around the one fork and goes back to its own right after; the child
    joins the other namespaces, the cgroup, and becomes the process. One fork of a Python
    process where an intermediate child (setns, fork, exit) took two. Returns (host pid,
    sync fd): EOF on the fd means the process has exec'd; a line "error <message>" that it
    failed (the child then exits 1)."""
    state = _exec_checks(store, container_id, proc, console_socket)
    return _fork_exec(state, store, proc, stdio, console_socket, preserve_fds)


def _fork_exec(state: State, store: Store, proc: dict, stdio: tuple[int, int, int],
               console_socket: str | None, preserve_fds: int) -> tuple[int, int]:
    from shimd.oci import init, linux, seccomp

    container_id = state.id
    spec = state.config
    if (spec.get("linux") or {}).get("seccomp"):
        seccomp.prepare()
    ns_fds: list[tuple[int, int, str]] = []
    procs_fds: list[int] = []
    console = None
    program_fd = None
    own_pidns = -1
    try:
        if (spec.get("linux") or {}).get("seccomp"):
            program_fd = seccomp.PRECOMPILED_FD = _open_program(store, container_id,
                                                                spec["linux"]["seccomp"])
        ns_fds = _open_namespaces(state)
        procs_fds = [os.open(p, os.O_WRONLY | os.O_CLOEXEC) for p in _cgroup(state).procs_files()]
        console = _connect_console(console_socket)
        pidns = next((fd for fd, _, name in ns_fds if name == "pid"), -1)
        r, w = os.pipe()
        if pidns >= 0:
            own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
            linux.setns(pidns, linux.CLONE_NEWPID, "pid namespace")
        try:
            child = os.fork()
        except BaseException:
            os.close(r)
            os.close(w)
            raise
        if child == 0:  # never returns: the finally below is the caller's alone
            os.close(r)
            init.child_main(_exec_child, w, spec, proc, stdio, preserve_fds,
                            [n for n in ns_fds if n[2] != "pid"], procs_fds, console)
        os.close(w)
    finally:
        if own_pidns >= 0:  # the caller's next children are its own again
            linux.setns(own_pidns, linux.CLONE_NEWPID, "own pid namespace")
            os.close(own_pidns)
        if program_fd is not None:
            seccomp.PRECOMPILED_FD = None
            os.close(program_fd)
        for fd, _, _ in ns_fds:
            os.close(fd)
        for fd in procs_fds:
            os.close(fd)
        if console is not None:
            console.close()
    return child, r


def _exec_child(sync_w: int, spec: dict, proc: dict, stdio: tuple[int, int, int],
                preserve_fds: int, ns_fds, procs_fds, console) -> None:
    """The process `fork_exec` forked: the caller's signal handlers and fds are none of its
    business; stdio as asked; into the namespaces; then what an exec'd process does."""
    from shimd.oci import init, linux

    # as runc: until execve, /proc/<pid>/exe (the host's Python) is out of the container's
    # reach (CVE-2019-5736); execve of the container's binary makes it dumpable again
    linux.prctl(linux.PR_SET_DUMPABLE, 0)
    _forked(stdio, preserve_fds)
    for fd, flag, name in ns_fds:
        linux.setns(fd, flag, f"{name} namespace")
    init.exec_init(sync_w, spec, proc, procs_fds, console)


def run(store: Store, container_id: str, bundle: str, **create_args) -> int:
    """create + start + wait (the runtime is the subreaper of its container) + delete."""
    from shimd.oci import linux

    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
    state = create(store, container_id, bundle, **create_args)
    try:
        start(store, container_id)
        while True:
            pid, st = os.waitpid(-1, 0)
            if pid == state.pid:
                code = os.waitstatus_to_exitcode(st)
                return code if code >= 0 else 128 - code
    finally:
        delete(store, container_id, force=True)


def list_states(store: Store) -> list[dict]:
    out = []
    for cid in store.ids():
        try:
            out.append(state_json(store, cid))
        except (NotFound, InvalidArgument, OSError, ValueError):
            continue
    return out
