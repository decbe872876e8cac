"""The container's filesystem view: spec mounts, devices, pivot_root, masked/read-only paths.

Runs inside the new mount namespace, before the process joins its cgroup (see init.py).
Paths inside the rootfs are resolved with `secure_join`, so a symlink in the image cannot
send a mount outside the rootfs.
"""

from __future__ import annotations

import os
import stat

from shimd.oci import linux
from shimd.oci.linux import (
    MS_BIND,
    MS_NOATIME,
    MS_NODEV,
    MS_NODIRATIME,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_RELATIME,
    MS_REMOUNT,
    MS_SHARED,
    MS_SLAVE,
    MS_UNBINDABLE,
)

# option → (flags to set, flags to clear); runc's mount option table.
_FLAGS: dict[str, tuple[int, int]] = {
    "ro": (MS_RDONLY, 0), "rw": (0, MS_RDONLY),
    "nosuid": (MS_NOSUID, 0), "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0), "dev": (0, MS_NODEV),
    "noexec": (MS_NOEXEC, 0), "exec": (0, MS_NOEXEC),
    "sync": (linux.MS_SYNCHRONOUS, 0), "async": (0, linux.MS_SYNCHRONOUS),
    "dirsync": (linux.MS_DIRSYNC, 0), "remount": (MS_REMOUNT, 0),
    "mand": (linux.MS_MANDLOCK, 0), "nomand": (0, linux.MS_MANDLOCK),
    "atime": (0, MS_NOATIME), "noatime": (MS_NOATIME, 0),
    "diratime": (0, MS_NODIRATIME), "nodiratime": (MS_NODIRATIME, 0),
    "relatime": (MS_RELATIME, 0), "norelatime": (0, MS_RELATIME),
    "strictatime": (linux.MS_STRICTATIME, 0), "nostrictatime": (0, linux.MS_STRICTATIME),
    "lazytime": (linux.MS_LAZYTIME, 0), "nolazytime": (0, linux.MS_LAZYTIME),
    "bind": (MS_BIND, 0), "rbind": (MS_BIND | MS_REC, 0),
    "nosymfollow": (linux.MS_NOSYMFOLLOW, 0),
}
PROPAGATION = {
    "private": MS_PRIVATE, "rprivate": MS_PRIVATE | MS_REC,
    "shared": MS_SHARED, "rshared": MS_SHARED | MS_REC,
    "slave": MS_SLAVE, "rslave": MS_SLAVE | MS_REC,
    "unbindable": MS_UNBINDABLE, "runbindable": MS_UNBINDABLE | MS_REC,
}
# statvfs f_flag bits that a bind remount must keep (the kernel refuses to drop them).
_LOCKED = ((1, MS_RDONLY), (2, MS_NOSUID), (4, MS_NODEV), (8, MS_NOEXEC),
           (1024, MS_NOATIME), (2048, MS_NODIRATIME), (4096, MS_RELATIME))

DEFAULT_DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
                   ("urandom", 1, 9), ("tty", 5, 0))


def parse_options(options: list[str] | None) -> tuple[int, list[int], str]:
    """Mount options → (flags, propagation flags, data string)."""
    flags, propagation, data = 0, [], []
    for opt in options or ():
        if opt in _FLAGS:
            set_, clear = _FLAGS[opt]
            flags = (flags | set_) & ~clear
        elif opt in PROPAGATION:
            propagation.append(PROPAGATION[opt])
        elif opt == "tmpcopyup":
            continue
        else:
            data.append(opt)
    return flags, propagation, ",".join(data)


def secure_join(root: str, unsafe: str) -> str:
    """root + unsafe with every symlink resolved as if root were "/" (never escapes root)."""
    parts = [p for p in unsafe.split("/") if p]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            resolved.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > 255:
                raise OSError(40, f"too many symlinks resolving {unsafe} in {root}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        resolved.append(part)
    return os.path.join(root, *resolved)


def locked_flags(path: str) -> int:
    f_flag = os.statvfs(path).f_flag
    return sum(ms for st, ms in _LOCKED if f_flag & st)


def bind_remount(path: str, flags: int) -> None:
    """Remount a bind mount with flags, keeping the flags the kernel locks."""
    keep = locked_flags(path) & ~MS_RDONLY
    linux.mount(None, path, None, MS_BIND | MS_REMOUNT | keep | (flags & ~(MS_BIND | MS_REC)))


def _make_target(dest: str, is_dir: bool) -> None:
    if os.path.lexists(dest):
        return
    if is_dir:
        os.makedirs(dest, 0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dest), 0o755, exist_ok=True)
        os.close(os.open(dest, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o755))


def mount_one(rootfs: str, m: dict, cgroup: object | None, cgroupns: bool) -> None:
    """One entry of the spec's mounts, relative to rootfs."""
    dest = secure_join(rootfs, m["destination"])
    kind = m.get("type") or ""
    source = m.get("source") or kind
    flags, propagation, data = parse_options(m.get("options"))
    if kind == "bind" or flags & MS_BIND:
        if not os.path.exists(source):
            raise OSError(2, f"bind mount source {source} does not exist")
        _make_target(dest, os.path.isdir(source))
        linux.mount(source, dest, None, flags & (MS_BIND | MS_REC) | MS_BIND)
        if flags & ~(MS_BIND | MS_REC):
            bind_remount(dest, flags)
    elif kind == "cgroup":
        _mount_cgroup(dest, flags, cgroup, cgroupns)
    else:
        existing = os.stat(dest).st_mode if kind == "tmpfs" and os.path.isdir(dest) else None
        _make_target(dest, True)
        if kind == "mqueue" or kind == "sysfs":
            data = data or None
        try:
            linux.mount(source, dest, kind, flags & ~MS_REMOUNT, data)
        except OSError as e:
            if kind != "sysfs" or e.errno != 1:
                raise
            # sysfs refuses a mount from a network namespace we do not own: bind the host's.
            linux.mount("/sys", dest, None, MS_BIND | MS_REC)
            bind_remount(dest, flags)
        if existing is not None:
            # runc gives a tmpfs the mode of the directory it covers: match it.
            os.chmod(dest, stat.S_IMODE(existing))
    for p in propagation:
        linux.mount(None, dest, None, p)


def _mount_cgroup(dest: str, flags: int, cgroup, cgroupns: bool) -> None:
    """/sys/fs/cgroup: the container's own cgroups, like runc shows them."""
    _make_target(dest, True)
    base = flags & (MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RELATIME)
    if getattr(cgroup, "version", 1) == 2:
        if cgroupns:
            linux.mount("cgroup", dest, "cgroup2", base | (flags & MS_RDONLY))
        else:
            linux.mount(cgroup.dir, dest, None, MS_BIND | MS_REC)
            bind_remount(dest, flags)
        return
    linux.mount("tmpfs", dest, "tmpfs", base, "mode=755")
    for ctrl, host_dir in sorted(cgroup.dirs.items()):
        name = os.path.basename(cgroup.mounts[ctrl])
        sub = os.path.join(dest, name)
        os.makedirs(sub, exist_ok=True)
        if cgroupns:
            option = ctrl if not ctrl.startswith("name=") else f"none,{ctrl}"
            linux.mount("cgroup", sub, "cgroup", base | (flags & MS_RDONLY), option)
        else:
            linux.mount(host_dir, sub, None, MS_BIND | MS_REC)
            bind_remount(sub, base | (flags & MS_RDONLY))


def needs_dev(spec_mounts: list[dict]) -> bool:
    """Devices are created unless /dev is bind mounted from the host."""
    for m in spec_mounts:
        if os.path.normpath(m.get("destination", "")) == "/dev":
            flags, _, _ = parse_options(m.get("options"))
            return not (m.get("type") == "bind" or flags & MS_BIND)
    return True


def create_devices(rootfs: str, extra: list[dict] | None, bind: bool = False) -> None:
    """mknod the default and spec devices; in a user namespace (no mknod) bind-mount the
    host's nodes instead, as runc does."""
    devices = [{"path": f"/dev/{n}", "type": "c", "major": ma, "minor": mi, "fileMode": 0o666}
               for n, ma, mi in DEFAULT_DEVICES]
    seen = {d["path"] for d in extra or ()}
    devices = [d for d in devices if d["path"] not in seen] + list(extra or ())
    parents: set[str] = set()
    for dev in devices:
        path = secure_join(rootfs, dev["path"])
        parent = os.path.dirname(path)
        if parent not in parents:  # /dev once, not once per device
            os.makedirs(parent, 0o755, exist_ok=True)
            parents.add(parent)
        kind = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}[dev["type"]]
        mode = dev.get("fileMode", 0o666) & 0o7777
        if bind:
            if os.path.lexists(path):
                os.unlink(path)
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
            linux.mount(dev["path"], path, None, MS_BIND)
            continue
        number = os.makedev(dev.get("major", 0), dev.get("minor", 0))
        try:
            os.mknod(path, kind | mode, number)
        except FileExistsError:  # the image has one there: ours replaces it
            os.unlink(path)
            os.mknod(path, kind | mode, number)
        os.chown(path, dev.get("uid", 0), dev.get("gid", 0))


def dev_symlinks(rootfs: str) -> None:
    links = [("/proc/self/fd", "fd"), ("/proc/self/fd/0", "stdin"),
             ("/proc/self/fd/1", "stdout"), ("/proc/self/fd/2", "stderr")]
    if os.path.exists("/proc/kcore"):
        links.append(("/proc/kcore", "core"))
    dev = secure_join(rootfs, "/dev")
    for target, name in links:
        try:
            os.symlink(target, os.path.join(dev, name))
        except FileExistsError:
            pass
    ptmx = os.path.join(dev, "ptmx")
    if os.path.lexists(ptmx):
        os.unlink(ptmx)
    os.symlink("pts/ptmx", ptmx)


def make_parent_mount_private(path: str) -> None:
    """pivot_root refuses a new root whose parent mount is shared (rootfsPropagation
    "shared"/"rshared"): make just that mount private, as runc does."""
    best, shared = "", False
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            target = fields[4].replace("\\040", " ")
            if (path == target or path.startswith(target.rstrip("/") + "/")) and len(target) >= len(best):
                best = target
                shared = any(opt.startswith("shared:") for opt in fields[6:fields.index("-")])
    if best and shared:
        linux.mount(None, best, None, MS_PRIVATE)


def pivot(rootfs: str) -> None:
    """pivot_root(".", ".") then detach the old root: no put_old directory needed."""
    old = os.open("/", os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    new = os.open(rootfs, os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fchdir(new)
        linux.pivot_root(".", ".")
        os.fchdir(old)
        # Make the old root a slave so unmounting it does not propagate to the host.
        linux.mount(None, ".", None, MS_SLAVE | MS_REC)
        linux.umount(".", linux.MNT_DETACH)
        os.chdir("/")
    finally:
        os.close(old)
        os.close(new)


def move_root(rootfs: str) -> None:
    """--no-pivot (e.g. a ramfs root, where pivot_root is refused): MS_MOVE and chroot."""
    os.chdir(rootfs)
    linux.mount(rootfs, "/", None, linux.MS_MOVE)
    os.chroot(".")
    os.chdir("/")


def readonly_path(path: str) -> None:
    if not os.path.exists(path):
        return
    linux.mount(path, path, None, MS_BIND | MS_REC)
    linux.mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_REC | locked_flags(path))


def mask_path(path: str) -> None:
    try:
        is_dir = os.path.isdir(path) and not os.path.islink(path)
        if not os.path.lexists(path):
            return
        if is_dir:
            linux.mount("tmpfs", path, "tmpfs", MS_RDONLY)
        else:
            linux.mount("/dev/null", path, None, MS_BIND)
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno != 2:
            raise


def remount_root_readonly() -> None:
    linux.mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | locked_flags("/"))
