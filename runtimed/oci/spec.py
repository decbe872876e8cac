"""OCI runtime specs from an image config plus the options a user gives.

The default spec is containerd's `oci.WithDefaultSpec` with Docker's defaults on top
(default capabilities, masked and read-only paths, the default seccomp profile), so a
container started by `ctl` sees what it would see under `docker run`.
"""

from __future__ import annotations

import copy
import os
import shlex
from dataclasses import dataclass, field

from runtimed.errors import InvalidArgument
from runtimed.oci.process import (  # noqa: F401 - part of this module's API
    DEFAULT_PATH,
    FileReader,
    User,
    exec_process,
    merge_env,
    resolve_user,
)
from runtimed.oci.seccomp import default_profile

SPEC_VERSION = "1.0.2-dev"

DEFAULT_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]

ALL_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
]

# capability numbers, as in linux/capability.h
_CAP_ORDER = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK",
    "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG",
    "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
]

MASKED_PATHS = [
    "/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


def _mount(dest: str, typ: str, source: str, options: list[str]) -> dict:
    return {"destination": dest, "type": typ, "source": source, "options": options}


DEFAULT_MOUNTS = [
    _mount("/proc", "proc", "proc", ["nosuid", "noexec", "nodev"]),
    _mount("/dev", "tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", "size=65536k"]),
    _mount("/dev/pts", "devpts", "devpts",
           ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]),
    _mount("/dev/shm", "tmpfs", "shm", ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
    _mount("/dev/mqueue", "mqueue", "mqueue", ["nosuid", "noexec", "nodev"]),
    _mount("/sys", "sysfs", "sysfs", ["nosuid", "noexec", "nodev", "ro"]),
]


INIT_PATH = "/sbin/docker-init"  # where docker mounts its init
INIT_BINARIES = ("/usr/bin/tini-static", "/usr/bin/docker-init")


def init_binary() -> str:
    """A statically linked tini on this host (Debian's `tini` package): the container's
    libc may not match the host's, so the dynamic /usr/bin/tini is no use."""
    for path in INIT_BINARIES:
        if os.access(path, os.X_OK):
            return path
    raise InvalidArgument("--init needs a static tini: install Debian's `tini` package "
                          "(/usr/bin/tini-static)")


@dataclass
class Mount:
    """One mount into the container: a bind of a host path, or a tmpfs."""

    destination: str
    source: str = ""
    type: str = "bind"
    options: list[str] = field(default_factory=list)
    readonly: bool = False

    def to_oci(self) -> dict:
        if self.type == "bind":
            opts = ["rbind", "ro" if self.readonly else "rw", *self.options]
            return _mount(self.destination, "bind", self.source, opts)
        opts = ["nosuid", "nodev", "noexec", *self.options]
        if self.readonly:
            opts.append("ro")
        return _mount(self.destination, self.type, self.source or self.type, opts)


@dataclass
class SpecOptions:
    """What a user can ask for on top of the image config (docker run's flags)."""

    args: list[str] | None = None  # replaces the image's Cmd
    entrypoint: list[str] | None = None  # replaces the image's Entrypoint ([] clears it)
    env: list[str] = field(default_factory=list)
    cwd: str | None = None
    user: str | None = None
    hostname: str | None = None
    terminal: bool = False
    mounts: list[Mount] = field(default_factory=list)
    read_only: bool = False
    memory: int | None = None  # bytes
    cpus: float | None = None
    pids_limit: int | None = None
    cap_add: list[str] = field(default_factory=list)
    cap_drop: list[str] = field(default_factory=list)
    privileged: bool = False
    network: str = ""  # "" (own namespace), "host", "none", or a path to join
    seccomp: dict | None = None  # a profile replacing Docker's default
    seccomp_unconfined: bool = False
    no_new_privileges: bool = True
    annotations: dict[str, str] = field(default_factory=dict)
    init: bool = False  # docker's --init: tini as PID 1, reaping zombies, forwarding signals


@dataclass
class ImageConfig:
    """The runtime part of an OCI image config (`config` in the config blob)."""

    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    working_dir: str = ""
    user: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    volumes: list[str] = field(default_factory=list)
    stop_signal: str = ""

    @classmethod
    def from_blob(cls, blob: dict) -> ImageConfig:
        c = blob.get("config") or {}
        return cls(
            entrypoint=list(c.get("Entrypoint") or []),
            cmd=list(c.get("Cmd") or []),
            env=list(c.get("Env") or []),
            working_dir=c.get("WorkingDir") or "",
            user=c.get("User") or "",
            labels=dict(c.get("Labels") or {}),
            volumes=sorted(c.get("Volumes") or {}),
            stop_signal=c.get("StopSignal") or "",
        )


def normalize_capability(name: str) -> str:
    name = name.strip().upper()
    if name == "ALL":
        return name
    full = name if name.startswith("CAP_") else "CAP_" + name
    if full not in ALL_CAPS:
        raise InvalidArgument(f"unknown capability {name!r}")
    return full


def capabilities(add: list[str], drop: list[str], privileged: bool = False) -> list[str]:
    """Docker's rule: ALL in add keeps every capability but the dropped ones; ALL in drop
    keeps only the added ones; otherwise the defaults plus the added minus the dropped."""
    add = [normalize_capability(c) for c in add]
    drop = [normalize_capability(c) for c in drop]
    if privileged:
        return current_capabilities()
    if "ALL" in add:
        return [c for c in ALL_CAPS if c not in drop]
    added = [c for c in add if c != "ALL"]
    if "ALL" in drop:
        return [c for c in ALL_CAPS if c in added]
    return [c for c in ALL_CAPS if (c in DEFAULT_CAPS or c in added) and c not in drop]


def current_capabilities() -> list[str]:
    """The capabilities in this process's bounding set (containerd's
    WithAllCurrentCapabilities): `--privileged` cannot grant what the host withholds."""
    try:
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 16) for line in f if line.startswith("CapBnd:"))
    except (OSError, StopIteration, ValueError):
        return list(ALL_CAPS)
    return [cap for bit, cap in enumerate(_CAP_ORDER) if mask >> bit & 1]


def default_spec(container_id: str, namespace: str) -> dict:
    """containerd's default Linux spec with Docker's default seccomp profile."""
    caps = list(DEFAULT_CAPS)
    return {
        "ociVersion": SPEC_VERSION,
        "root": {"path": "rootfs"},
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": [],
            "env": [DEFAULT_PATH],
            "cwd": "/",
            "capabilities": {k: list(caps) for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "mounts": copy.deepcopy(DEFAULT_MOUNTS),
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "cgroupsPath": f"/{namespace}/{container_id}",
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
            "seccomp": default_profile(caps),
        },
    }


def process_args(image: ImageConfig, opts: SpecOptions) -> list[str]:
    entrypoint = image.entrypoint if opts.entrypoint is None else opts.entrypoint
    if opts.args:
        cmd = opts.args
    elif opts.entrypoint is not None:
        cmd = []  # as Docker: a new entrypoint drops the image's Cmd
    else:
        cmd = image.cmd
    args = [*entrypoint, *cmd]
    if not args:
        raise InvalidArgument("no command specified: the image has no Cmd or Entrypoint")
    return args


def build_spec(
    container_id: str,
    namespace: str,
    image: ImageConfig,
    opts: SpecOptions,
    read_file: FileReader | None = None,
) -> dict:
    """The full spec for a container: defaults, image config, then the user's options."""
    spec = default_spec(container_id, namespace)
    proc = spec["process"]
    linux = spec["linux"]
    proc["args"] = process_args(image, opts)
    if opts.init:
        proc["args"] = [INIT_PATH, "--", *proc["args"]]
        spec["mounts"].append(Mount(INIT_PATH, init_binary(), readonly=True).to_oci())
    proc["env"] = merge_env(image.env or [DEFAULT_PATH], opts.env)
    proc["cwd"] = opts.cwd or image.working_dir or "/"
    proc["terminal"] = opts.terminal
    if opts.terminal and not any(e.startswith("TERM=") for e in proc["env"]):
        proc["env"].append("TERM=xterm")

    user_str = opts.user if opts.user is not None else image.user
    user = resolve_user(user_str or "0", read_file)
    proc["user"] = {"uid": user.uid, "gid": user.gid}
    if user.additional_gids:
        proc["user"]["additionalGids"] = user.additional_gids
    if not any(e.startswith("HOME=") for e in proc["env"]):
        proc["env"].append(f"HOME={user.home or '/'}")

    caps = capabilities(opts.cap_add, opts.cap_drop, opts.privileged)
    proc["capabilities"] = {k: list(caps) for k in ("bounding", "effective", "permitted")}
    if opts.privileged:
        linux.pop("seccomp", None)
        linux["maskedPaths"] = []
        linux["readonlyPaths"] = []
        linux["resources"]["devices"] = [{"allow": True, "access": "rwm"}]
        for m in spec["mounts"]:
            if m["type"] == "sysfs":
                m["options"] = [o for o in m["options"] if o != "ro"] + ["rw"]
    elif opts.seccomp_unconfined:
        linux.pop("seccomp", None)
    else:
        linux["seccomp"] = opts.seccomp if opts.seccomp is not None else default_profile(caps)
    proc["noNewPrivileges"] = opts.no_new_privileges

    if opts.hostname:
        spec["hostname"] = opts.hostname
    else:
        spec["hostname"] = container_id[:12]
    if opts.read_only:
        spec["root"]["readonly"] = True

    if opts.network == "host":
        linux["namespaces"] = [n for n in linux["namespaces"] if n["type"] != "network"]
        spec.pop("hostname", None)
        for path in ("/etc/hosts", "/etc/resolv.conf"):
            spec["mounts"].append(_mount(path, "bind", path, ["rbind", "ro"]))
    elif opts.network.startswith("/"):
        for n in linux["namespaces"]:
            if n["type"] == "network":
                n["path"] = opts.network

    if any(m.type == "volume" for m in opts.mounts):
        raise InvalidArgument("volume mounts must be resolved to host paths first (containers.create does)")
    taken = {m.destination for m in opts.mounts}
    spec["mounts"] = [m for m in spec["mounts"] if m["destination"] not in taken]
    spec["mounts"] += [m.to_oci() for m in opts.mounts]

    resources = linux["resources"]
    if opts.memory is not None:
        if opts.memory < 6 * 1024 * 1024:
            raise InvalidArgument("minimum memory limit allowed is 6MB")
        resources["memory"] = {"limit": opts.memory}
    if opts.cpus is not None:
        if opts.cpus <= 0:
            raise InvalidArgument("--cpus must be a positive number")
        resources["cpu"] = {"quota": int(opts.cpus * 100000), "period": 100000}
    if opts.pids_limit is not None and opts.pids_limit > 0:
        resources["pids"] = {"limit": opts.pids_limit}
    if opts.annotations:
        spec["annotations"] = dict(opts.annotations)
    return spec


def parse_memory(value: str) -> int:
    """Docker's RAM sizes: `512m`, `1g`, `1048576`, `64k` (binary units)."""
    text = value.strip().lower().removesuffix("b")
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise InvalidArgument(f"invalid size: {value!r}") from None


def parse_volume(spec: str) -> Mount:
    """`-v /host:/ctr[:ro]` a bind mount, `-v name:/ctr[:ro]` a named volume, `-v /ctr` an
    anonymous volume."""
    parts = spec.split(":")
    if len(parts) == 1 and parts[0].startswith("/"):
        return Mount(destination=parts[0], type="volume")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise InvalidArgument(f"invalid volume specification {spec!r}: use SRC:DEST[:ro]")
    src, dst = parts[0], parts[1]
    mode = parts[2].split(",") if len(parts) == 3 else []
    if not dst.startswith("/"):
        raise InvalidArgument(f"invalid volume specification {spec!r}: destination must be absolute")
    unknown = [m for m in mode if m not in ("ro", "rw", "z", "Z")]
    if unknown:
        raise InvalidArgument(f"invalid mode {':'.join(unknown)!r} in volume {spec!r}")
    typ = "bind" if src.startswith("/") else "volume"
    return Mount(destination=dst, source=src, type=typ, readonly="ro" in mode)


def parse_mount(spec: str) -> Mount:
    """`--mount type=bind|tmpfs,source=…,target=…,readonly` (docker's csv form)."""
    fields: dict[str, str] = {}
    for item in spec.split(","):
        key, eq, value = item.partition("=")
        fields[key.strip().lower()] = value if eq else "true"
    typ = fields.pop("type", "volume")
    target = fields.pop("target", None) or fields.pop("destination", None) or fields.pop("dst", None)
    source = fields.pop("source", None) or fields.pop("src", None) or ""
    readonly = fields.pop("readonly", fields.pop("ro", "false")) in ("true", "1", "")
    if not target:
        raise InvalidArgument(f"invalid mount {spec!r}: target is required")
    if typ == "bind":
        if not source:
            raise InvalidArgument(f"invalid mount {spec!r}: a bind mount needs source=")
        fields.pop("bind-propagation", None)
        return Mount(destination=target, source=source, type="bind", readonly=readonly)
    if typ == "tmpfs":
        opts = []
        if "tmpfs-size" in fields:
            opts.append(f"size={parse_memory(fields.pop('tmpfs-size'))}")
        if "tmpfs-mode" in fields:
            opts.append(f"mode={fields.pop('tmpfs-mode')}")
        return Mount(destination=target, type="tmpfs", options=opts, readonly=readonly)
    if typ == "volume":
        return Mount(destination=target, source=source, type="volume", readonly=readonly)
    raise InvalidArgument(f"invalid mount {spec!r}: type must be bind, volume or tmpfs")


def parse_tmpfs(spec: str) -> Mount:
    """`--tmpfs /run[:size=64m,mode=1777]`."""
    dest, _, opts = spec.partition(":")
    if not dest.startswith("/"):
        raise InvalidArgument(f"invalid tmpfs {spec!r}: destination must be absolute")
    return Mount(destination=dest, type="tmpfs", options=[o for o in opts.split(",") if o])


def apply_security_opts(opts: SpecOptions, items: list[str]) -> None:
    """docker's `--security-opt`: seccomp=unconfined|FILE, no-new-privileges[=true|false]."""
    import json

    for item in items:
        key, sep, value = item.partition("=" if "=" in item else ":")
        if key == "seccomp" and value == "unconfined":
            opts.seccomp_unconfined = True
        elif key == "seccomp" and value:
            try:
                with open(value) as f:
                    opts.seccomp = json.load(f)
            except (OSError, ValueError) as exc:
                raise InvalidArgument(f"seccomp profile {value}: {exc}") from None
        elif key == "no-new-privileges":
            opts.no_new_privileges = value in ("", "true")
        else:
            raise InvalidArgument(
                f"unsupported security option {item!r}: use seccomp=unconfined|FILE or no-new-privileges"
            )


def parse_env_file(text: str) -> list[str]:
    """Docker's env-file: KEY=VALUE lines, `#` comments, a bare KEY takes the caller's value."""
    import os

    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" in line:
            out.append(line)
        elif line in os.environ:
            out.append(f"{line}={os.environ[line]}")
    return out


def command_line(spec: dict) -> str:
    return shlex.join((spec.get("process") or {}).get("args") or [])
