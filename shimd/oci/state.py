"""Per-container state under --root: state.json (atomic) and the exec fifo.

The status is derived, never stored: a live init with the fifo still present is "created",
a frozen cgroup is "paused", a dead (or zombie, or recycled) pid is "stopped".
"""

from __future__ import annotations

import json
import os
import time

from runtimed.errors import AlreadyExists, InvalidArgument, NotFound

DEFAULT_ROOT = "/run/shimd-oci"
OCI_VERSION = "1.0.2"


class State:
    """What `create` recorded about a container (a plain class: `dataclasses` pulls in
    `inspect`, and every runtime command pays its import time)."""

    __slots__ = ("id", "bundle", "rootfs", "pid", "start_time", "created", "cgroup_path",
                 "config", "owner")

    def __init__(self, id: str, bundle: str, rootfs: str, pid: int = 0, start_time: int = 0,
                 created: str = "", cgroup_path: str = "", config: dict | None = None,
                 owner: str = "") -> None:
        self.id = id
        self.bundle = bundle
        self.rootfs = rootfs
        self.pid = pid
        self.start_time = start_time  # /proc/PID/stat field 22: tells our init from a recycled pid
        self.created = created
        self.cgroup_path = cgroup_path
        self.config = config or {}
        self.owner = owner

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


def validate_id(container_id: str) -> None:
    if not container_id or container_id in (".", "..") or "/" in container_id or len(container_id) > 1024:
        raise InvalidArgument(f"invalid container id {container_id!r}")


class Store:
    """Containers' states under --root: `<root>/<id>/` each, as runc keeps them; or, for a
    `single` root, the root itself is its one container's directory, made and removed by
    whoever owns it: the bundle of a shim whose in-process runtime forked the init (no
    directory of the runtime's own: since session 13, one directory fewer per container).
    Without `single` said, a root that holds a `state.json` itself is taken for a single
    one (the command line on a shim's bundle)."""

    def __init__(self, root: str, single: bool | None = None) -> None:
        self.root = root
        self.single = (os.path.exists(os.path.join(root, "state.json")) if single is None
                       else single)

    def dir(self, container_id: str) -> str:
        validate_id(container_id)
        return self.root if self.single else os.path.join(self.root, container_id)

    def fifo(self, container_id: str) -> str:
        return os.path.join(self.dir(container_id), "exec.fifo")

    def reserve(self, container_id: str) -> str:
        d = self.dir(container_id)
        if self.single:
            if any(os.path.lexists(os.path.join(d, name)) for name in ("state.json", "exec.fifo")):
                raise AlreadyExists(f"container with id {container_id!r} already exists")
            return d
        os.makedirs(self.root, 0o711, exist_ok=True)
        try:
            os.mkdir(d, 0o711)
        except FileExistsError:
            raise AlreadyExists(f"container with id {container_id!r} already exists") from None
        return d

    def save(self, state: State) -> None:
        """state.json (0600: it holds the spec), by temp + rename: readers see it whole."""
        path = os.path.join(self.dir(state.id), "state.json")
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "w") as f:
            f.write(json.dumps(state.to_dict()))  # one write; no fsync: --root is per boot (a tmpfs or the shim's state dir)
        os.rename(tmp, path)

    def load(self, container_id: str) -> State:
        try:
            with open(os.path.join(self.dir(container_id), "state.json")) as f:
                state = State(**json.load(f))
        except FileNotFoundError:
            raise NotFound(f"container {container_id!r} does not exist") from None
        if state.id != container_id:  # a single root's container is another one
            raise NotFound(f"container {container_id!r} does not exist")
        return state

    def ids(self) -> list[str]:
        if self.single:
            try:
                with open(os.path.join(self.root, "state.json")) as f:
                    return [json.load(f)["id"]]
            except (FileNotFoundError, ValueError, KeyError):
                return []
        try:
            return sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []

    def remove(self, container_id: str) -> None:
        d = self.dir(container_id)
        for name in ("exec.fifo", "state.json", "state.json.tmp", "seccomp.bpf"):
            try:
                os.unlink(os.path.join(d, name))
            except FileNotFoundError:
                pass
        if self.single:  # (its owner removes it)
            return
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass


def proc_start_time(pid: int) -> tuple[int, str] | None:
    """(start time, state letter) of pid, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(b")") + 2:].split()
    return int(fields[19]), fields[0].decode()


def init_alive(state: State) -> bool:
    if state.pid <= 0:
        return False
    info = proc_start_time(state.pid)
    return info is not None and info[0] == state.start_time and info[1] not in ("Z", "X")


def now_rfc3339() -> str:
    t = time.time_ns()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t // 1_000_000_000)) + f".{t % 1_000_000_000:09d}Z"
