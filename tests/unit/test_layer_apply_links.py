"""Hard links to files of lower layers, applied straight into an overlay upper directory:
the target is copied up first (as overlayfs does when linking in the mounted snapshot), so
the merged view is the one a native snapshot gets; a target that a layer above deletes or
hides is refused."""

from __future__ import annotations

import io
import os
import stat
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_layer_builder import E, d, tar  # noqa: E402

from runtimed.diff.apply import OPAQUE_XATTR, apply_layer  # noqa: E402
from runtimed.errors import InvalidArgument  # noqa: E402
from runtimed.snapshots import mount as mountlib  # noqa: E402
from runtimed.snapshots.mount import Mount  # noqa: E402


@pytest.fixture
def stack(tmp_path):
    """lower: bin/ (0o750, owner 7) with tool (0o4711, owner 5, an xattr) and sym -> tool."""
    lower, upper, work, merged = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
    for p in (lower, upper, work, merged):
        p.mkdir()
    apply_layer(io.BytesIO(tar(
        d("bin", mode=0o750, uid=7, gid=7, mtime=1_400_000_000),
        E("bin/tool", data=b"lower tool", mode=0o4711, uid=5, gid=6, mtime=1_500_000_000,
          xattrs={"user.origin": b"lower"}),
        E("bin/sym", tarfile.SYMTYPE, linkname="tool"),
    )), lower, overlay=True)
    return lower, upper, work, merged


def _mounted(lower, upper, work, merged):
    m = Mount("overlay", "overlay", [f"lowerdir={lower}", f"upperdir={upper}",
                                     f"workdir={work}"])
    mountlib.mount(m, merged)


def test_link_to_a_lower_file_copies_it_up(stack):
    lower, upper, work, merged = stack
    apply_layer(io.BytesIO(tar(E("usr/alias", tarfile.LNKTYPE, linkname="bin/tool"),
                               E("symlink", tarfile.LNKTYPE, linkname="bin/sym"))),
                upper, overlay=True, parents=[str(lower)])
    up = os.lstat(upper / "bin/tool")
    assert os.lstat(upper / "usr/alias").st_ino == up.st_ino and up.st_nlink == 2
    assert stat.S_IMODE(up.st_mode) == 0o4711 and (up.st_uid, up.st_gid) == (5, 6)
    assert up.st_mtime == 1_500_000_000
    assert os.getxattr(upper / "bin/tool", "user.origin") == b"lower"
    bin_dir = os.lstat(upper / "bin")  # the copied-up parent keeps the lower's attributes
    assert stat.S_IMODE(bin_dir.st_mode) == 0o750 and bin_dir.st_uid == 7
    assert os.readlink(upper / "symlink") == "tool"
    assert os.lstat(upper / "symlink").st_ino == os.lstat(upper / "bin/sym").st_ino
    _mounted(lower, upper, work, merged)
    try:
        assert (merged / "usr/alias").read_bytes() == b"lower tool"
        assert os.lstat(merged / "usr/alias").st_ino == os.lstat(merged / "bin/tool").st_ino
    finally:
        mountlib.unmount_all(merged)


@pytest.mark.parametrize("hiding", ["whiteout", "opaque", "file-over-dir"])
def test_link_to_a_hidden_lower_file_is_refused(stack, tmp_path, hiding):
    lower, upper, _, _ = stack
    middle = tmp_path / "middle"
    middle.mkdir()
    entries = {"whiteout": [d("bin"), E("bin/.wh.tool")],
               "opaque": [d("bin"), E("bin/.wh..wh..opq")],
               "file-over-dir": [E("bin", data=b"not a directory")]}[hiding]
    apply_layer(io.BytesIO(tar(*entries)), middle, overlay=True, parents=[str(lower)])
    if hiding == "opaque":
        assert os.getxattr(middle / "bin", OPAQUE_XATTR) == b"y"
    with pytest.raises(InvalidArgument):
        apply_layer(io.BytesIO(tar(E("alias", tarfile.LNKTYPE, linkname="bin/tool"))),
                    upper, overlay=True, parents=[str(middle), str(lower)])
    assert not (upper / "bin").exists() or not (upper / "bin/tool").exists()


def test_link_to_a_file_this_layer_deleted_is_refused(stack):
    lower, upper, _, _ = stack
    with pytest.raises(InvalidArgument):
        apply_layer(io.BytesIO(tar(d("bin"), E("bin/.wh..wh..opq"),
                                   E("alias", tarfile.LNKTYPE, linkname="bin/tool"))),
                    upper, overlay=True, parents=[str(lower)])


def test_link_to_a_file_no_layer_has_is_refused(stack):
    lower, upper, _, _ = stack
    with pytest.raises(InvalidArgument):
        apply_layer(io.BytesIO(tar(E("alias", tarfile.LNKTYPE, linkname="bin/none"))),
                    upper, overlay=True, parents=[str(lower)])
