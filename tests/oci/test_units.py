"""Pure pieces of the built-in runtime: option tables, path resolution, seccomp and
capability translation, the command line."""

from __future__ import annotations

import errno
import os

import pytest

from runtimed.errors import AlreadyExists, InvalidArgument, NotFound
from shimd.oci import caps, linux, rootfs, seccomp
from shimd.oci.__main__ import UsageError, parse
from shimd.oci.commands import parse_signal
from shimd.oci.state import State, Store
from tests.oci.conftest import in_child


def test_mount_options_split_into_flags_propagation_and_data():
    flags, prop, data = rootfs.parse_options(["nosuid", "ro", "rw", "noexec", "rbind", "rslave",
                                              "mode=755", "size=64k", "tmpcopyup"])
    assert flags == linux.MS_NOSUID | linux.MS_NOEXEC | linux.MS_BIND | linux.MS_REC
    assert prop == [linux.MS_SLAVE | linux.MS_REC]
    assert data == "mode=755,size=64k"


def test_secure_join_never_leaves_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    os.symlink("/etc", root / "abs")
    os.symlink("../../../../etc", root / "up")
    os.symlink("loop2", root / "loop1")
    os.symlink("loop1", root / "loop2")
    assert rootfs.secure_join(str(root), "/abs/passwd") == str(root / "etc" / "passwd")
    assert rootfs.secure_join(str(root), "/up/x") == str(root / "etc" / "x")
    assert rootfs.secure_join(str(root), "/../../x") == str(root / "x")
    with pytest.raises(OSError):
        rootfs.secure_join(str(root), "/loop1/x")


def test_seccomp_actions():
    assert seccomp.action("SCMP_ACT_ERRNO", None) == 0x00050000 | errno.EPERM
    assert seccomp.action("SCMP_ACT_ERRNO", 38) == 0x00050000 | 38
    assert seccomp.action("SCMP_ACT_ERRNO", None, default_errno=13) == 0x00050000 | 13
    assert seccomp.action("SCMP_ACT_ALLOW", None) == seccomp.SCMP_ACT_ALLOW
    assert seccomp.action("SCMP_ACT_KILL_PROCESS", None) == seccomp.SCMP_ACT_KILL_PROCESS
    with pytest.raises(InvalidArgument):
        seccomp.action("SCMP_ACT_BOGUS", None)
    with pytest.raises(InvalidArgument):
        seccomp.action("SCMP_ACT_NOTIFY", None)


def test_capability_masks_ignore_unknown_and_too_new():
    assert caps.mask(["CAP_CHOWN", "CAP_KILL", "kill", "CAP_NOT_A_CAP"], 40) == (1 << 0) | (1 << 5)
    assert caps.mask(["CAP_CHECKPOINT_RESTORE"], 39) == 0
    assert caps.NAMES.index("SYS_ADMIN") == 21 and len(caps.NAMES) == 41


def test_command_line_parsing():
    glob, cmd, opts, pos = parse(["--root", "/r", "--log=/l", "--log-format", "json", "--systemd-cgroup",
                                  "create", "--bundle", "/b", "--pid-file=/p", "--no-pivot", "id1"])
    assert glob == {"root": "/r", "log": "/l", "log-format": "json", "systemd-cgroup": True}
    assert (cmd, pos) == ("create", ["id1"])
    assert opts == {"bundle": "/b", "pid_file": "/p", "no_pivot": True}
    _, cmd, opts, pos = parse(["kill", "--all", "id1", "KILL"])
    assert opts == {"all": True} and pos == ["id1", "KILL"]
    _, _, opts, pos = parse(["exec", "-e", "A=1", "-e", "B=2", "id", "sh", "-c", "echo -n x"])
    assert opts == {"env": ["A=1", "B=2"]} and pos == ["id", "sh", "-c", "echo -n x"]
    with pytest.raises(UsageError):
        parse(["create", "--bogus", "id"])
    with pytest.raises(UsageError):
        parse(["--root"])
    assert parse_signal("KILL") == parse_signal("SIGKILL") == parse_signal("9") == 9
    with pytest.raises(InvalidArgument):
        parse_signal("NOPE")


def test_store_roundtrip_and_errors(tmp_path):
    store = Store(str(tmp_path / "root"))
    store.reserve("c1")
    with pytest.raises(AlreadyExists):
        store.reserve("c1")
    store.save(State(id="c1", bundle="/b", rootfs="/b/rootfs", pid=42, config={"a": 1}))
    loaded = store.load("c1")
    assert (loaded.pid, loaded.config, loaded.rootfs) == (42, {"a": 1}, "/b/rootfs")
    store.remove("c1")
    with pytest.raises(NotFound):
        store.load("c1")
    for bad in ("", "..", "a/b"):
        with pytest.raises(InvalidArgument):
            store.dir(bad)


def test_a_single_root_is_its_one_containers_directory(tmp_path):
    """A shim's in-process runtime keeps its container's state in the bundle itself (made
    and removed by the shim's owner, not the store); the command line on that root
    (runtimed's `delete --force` after a dead shim) finds it."""
    root = tmp_path / "bundle"
    root.mkdir()
    (root / "config.json").write_text("{}")
    store = Store(str(root), single=True)
    assert store.reserve("c1") == str(root)
    store.save(State(id="c1", bundle="/b", rootfs="/b/rootfs", pid=42))
    assert sorted(os.listdir(root)) == ["config.json", "state.json"]  # no <root>/c1/
    assert (root / "state.json").stat().st_mode & 0o777 == 0o600  # it holds the spec (env too)
    with pytest.raises(AlreadyExists):
        Store(str(root), single=True).reserve("c1")
    found = Store(str(root))  # as the command line opens it
    assert found.single and found.ids() == ["c1"] and found.load("c1").pid == 42
    with pytest.raises(NotFound):
        found.load("c2")  # another container is not in it
    found.remove("c1")
    assert sorted(os.listdir(root)) == ["config.json"]  # the bundle stays, its owner's
    assert not Store(str(root)).single


def test_seccomp_cache_key_and_untrusted_entries(tmp_path, monkeypatch):
    monkeypatch.setattr(seccomp, "CACHE_DIR", str(tmp_path / "cache"))
    a = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}]}
    reordered = {"syscalls": [{"action": "SCMP_ACT_ERRNO", "names": ["mkdir"]}], "defaultAction": "SCMP_ACT_ALLOW"}
    b = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["rmdir"], "action": "SCMP_ACT_ERRNO"}]}
    assert seccomp.cache_key(a) == seccomp.cache_key(reordered) != seccomp.cache_key(b)
    key_a, key_b = seccomp.cache_key(a), seccomp.cache_key(b)
    assert seccomp.cached_program(key_a) is None  # no cache directory yet
    program = bytes(range(16))
    seccomp.cache_program(key_a, program)
    assert seccomp.cached_program(key_a) == program and seccomp.cached_program(key_b) is None
    entry = tmp_path / "cache" / key_a
    entry.write_bytes(program[:12])  # not whole instructions
    assert seccomp.cached_program(key_a) is None
    entry.unlink()
    os.symlink(tmp_path / "elsewhere", entry)
    (tmp_path / "elsewhere").write_bytes(program)
    assert seccomp.cached_program(key_a) is None  # never followed
    seccomp.cache_program(key_b, b"")  # nothing to keep
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [entry.name]


@pytest.mark.parametrize("walk", [False, True], ids=["close_range", "proc-walk"])
@pytest.mark.parametrize("keep", [range(0), range(1, 2), range(2, 3)])
def test_cloexec_from_marks_every_fd_but_the_kept_ones(keep, walk):
    """In a forked child (it marks the whole fd table): fds from `first` on are close-on-exec
    after it, but for those kept; fds below `first` stay as they were. Through
    close_range and through the /proc/self/fd walk (no close_range in libc)."""
    import fcntl

    fds = []
    for _ in range(3):
        r, w = os.pipe()
        fds += [r, w]
    for fd in fds:
        os.set_inheritable(fd, True)
    first = fds[1]
    kept = [fds[1] + i for i in keep]

    def check() -> None:
        if walk:
            linux._close_range = None
        linux.cloexec_from(first, range(first + keep.start, first + keep.stop))
        flags = {fd: bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC) for fd in fds}
        assert flags == {fd: fd >= first and fd not in kept for fd in fds}

    try:
        in_child(check)
    finally:
        for fd in fds:
            os.close(fd)
