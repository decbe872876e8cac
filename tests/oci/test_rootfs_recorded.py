"""The mount sequence for runc's default spec, recorded instead of performed (no root, no
namespaces): what flags and data each mount gets, and that nothing escapes the rootfs."""

from __future__ import annotations

import pytest

from shimd.oci import linux, rootfs
from tests.oci.conftest import runc_default_spec


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mount(self, source, target, fstype, flags=0, data=None):
        self.calls.append((source, target, fstype, flags, data or None))


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    rec = Recorder()
    monkeypatch.setattr(linux, "mount", rec.mount)
    monkeypatch.setattr(rootfs, "locked_flags", lambda path: 0)
    root = tmp_path / "rootfs"
    root.mkdir()
    return rec, root


def test_default_spec_mounts(recorded):
    rec, root = recorded
    spec = runc_default_spec()
    for m in spec["mounts"]:
        if m["type"] != "cgroup":
            rootfs.mount_one(str(root), m, cgroup=None, cgroupns=False)
    by_target = {call[1].removeprefix(str(root)): call for call in rec.calls}
    nosuid_noexec_nodev = linux.MS_NOSUID | linux.MS_NOEXEC | linux.MS_NODEV
    assert by_target["/proc"] == ("proc", str(root / "proc"), "proc", 0, None)
    assert by_target["/dev"][2:] == ("tmpfs", linux.MS_NOSUID | linux.MS_STRICTATIME, "mode=755,size=65536k")
    assert by_target["/dev/pts"][2:] == ("devpts", linux.MS_NOSUID | linux.MS_NOEXEC,
                                         "newinstance,ptmxmode=0666,mode=0620,gid=5")
    assert by_target["/dev/shm"][2:] == ("tmpfs", nosuid_noexec_nodev, "mode=1777,size=65536k")
    assert by_target["/dev/mqueue"][2:] == ("mqueue", nosuid_noexec_nodev, None)
    assert by_target["/sys"][2:] == ("sysfs", nosuid_noexec_nodev | linux.MS_RDONLY, None)
    assert all(call[1].startswith(str(root) + "/") for call in rec.calls)


def test_bind_mount_is_remounted_with_its_flags_and_propagation(recorded, tmp_path):
    rec, root = recorded
    src = tmp_path / "src"
    src.mkdir()
    rootfs.mount_one(str(root), {"destination": "/data", "type": "bind", "source": str(src),
                                 "options": ["rbind", "ro", "nosuid", "rslave"]}, None, False)
    dest = str(root / "data")
    assert rec.calls == [
        (str(src), dest, None, linux.MS_BIND | linux.MS_REC, None),
        (None, dest, None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_NOSUID, None),
        (None, dest, None, linux.MS_SLAVE | linux.MS_REC, None),
    ]


def test_symlinked_destination_stays_inside_rootfs(recorded):
    rec, root = recorded
    (root / "etc").mkdir()
    (root / "evil").symlink_to("/etc")
    rootfs.mount_one(str(root), {"destination": "/evil/x", "type": "tmpfs", "source": "tmpfs"}, None, False)
    assert rec.calls[0][1] == str(root / "etc" / "x")
