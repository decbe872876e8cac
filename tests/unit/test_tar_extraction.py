"""Tars from clients are unpacked through PEP 706's filters (runtimed/tarsafe.py: the
standard library's from 3.11.4, backports.tarfile before, as on Debian 12's 3.11.2): a
build context with the "data" filter, ADD's local archive with the "tar" filter. These
fail if the filters are dropped or the interpreter lacks them."""

from __future__ import annotations

import io
import stat
import tarfile

import pytest

from runtimed.build import builder, context
from runtimed.errors import InvalidArgument


def _tar(path, *members: tuple[str, bytes | None, dict]) -> None:
    """Members (name, file content or None for a symlink, TarInfo attributes)."""
    with tarfile.open(path, "w") as tar:
        for name, data, attrs in members:
            info = tarfile.TarInfo(name)
            for key, value in attrs.items():
                setattr(info, key, value)
            if data is None:
                info.type = tarfile.SYMTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("member", [
    ("../escaped", b"x", {}),
    ("link", None, {"linkname": "/etc/passwd"}),
    ("link", None, {"linkname": "../../escaped"}),
])
def test_a_build_context_that_reaches_outside_its_directory_is_refused(tmp_path, member):
    archive, target = tmp_path / "ctx.tar", tmp_path / "ctx" / "in"
    _tar(archive, ("ok.txt", b"fine", {}), member)
    with pytest.raises(InvalidArgument, match="not a valid tar archive"):
        context.extract(archive, target)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "ctx" / "escaped").exists()


def test_add_unpacks_an_archive_as_tar_does_and_refuses_one_that_escapes(tmp_path):
    archive, target = tmp_path / "add.tar", tmp_path / "root"
    target.mkdir()
    _tar(archive, ("/opt/tool", b"bin", {"mode": 0o4755}), ("rel/file", b"r", {}))
    builder._extract(archive, target)
    tool = target / "opt" / "tool"  # the leading slash stripped, as tar does
    assert tool.read_bytes() == b"bin" and (target / "rel" / "file").read_bytes() == b"r"
    assert not tool.stat().st_mode & stat.S_ISUID  # the tar filter clears set-user-ID

    _tar(archive, ("../outside", b"x", {}))
    with pytest.raises(InvalidArgument, match="cannot extract"):
        builder._extract(archive, target)
    assert not (tmp_path / "outside").exists()
