"""runtimed.snapshots.mount on its own: options as runc reads them (one table, the shim's)."""

from __future__ import annotations

import errno
import os

import pytest

from runtimed.snapshots.mount import Mount, mount, mountpoints, unmount


def test_options_only_runcs_table_had(tmp_path):
    """`nosymfollow` is a mount flag (it was passed to tmpfs as data, which refused it), and
    two propagation changes are two calls (they were ORed into one, which the kernel
    refuses)."""
    target = tmp_path / "t"
    target.mkdir()
    mount(Mount("tmpfs", "tmpfs", ["nosymfollow", "size=1m", "private", "unbindable"]), target)
    try:
        (target / "file").write_text("x")
        os.symlink("file", target / "link")
        with pytest.raises(OSError) as refused:
            (target / "link").read_text()
        assert refused.value.errno == errno.ELOOP
        (info,) = [line for line in open("/proc/self/mountinfo") if f" {target} " in line]
        assert "unbindable" in info
    finally:
        unmount(target)
    assert str(target) not in mountpoints()
