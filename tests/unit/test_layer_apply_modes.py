"""Layer application skips chmod/chown when creation already gives the header's mode and
owner; these cases are where it must not: a restrictive umask, set-group-ID parents,
modes without owner bits, existing directories, sparse files."""

from __future__ import annotations

import io
import os
import stat
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_layer_builder import E, d, tar  # noqa: E402

from runtimed.diff.apply import apply_layer  # noqa: E402


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _owner(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


def test_modes_are_exact_under_a_restrictive_umask(tmp_path):
    layer = tar(d("pub", mode=0o755), E("pub/file", data=b"x", mode=0o644),
                E("pub/exe", data=b"x", mode=0o775), d("pub/open", mode=0o777),
                E("none", data=b"unreadable", mode=0o000), d("locked", mode=0o000))
    old = os.umask(0o077)
    try:
        apply_layer(io.BytesIO(layer), tmp_path)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "pub") == 0o755
    assert _mode(tmp_path / "pub/file") == 0o644
    assert _mode(tmp_path / "pub/exe") == 0o775
    assert _mode(tmp_path / "pub/open") == 0o777
    assert _mode(tmp_path / "none") == 0o000
    assert (tmp_path / "none").read_bytes() == b"unreadable"  # root reads it anyway
    assert _mode(tmp_path / "locked") == 0o000


def test_set_group_id_parent_does_not_leak_its_group_or_bit(tmp_path):
    """What is created in a set-group-ID directory takes its group (and a directory its
    bit) from the kernel; the layer's header must win."""
    layer = tar(d("shared", mode=0o2775, gid=1000),
                E("shared/file", data=b"x", mode=0o644),
                d("shared/sub", mode=0o755),
                E("shared/link", tarfile.SYMTYPE, linkname="file"),
                d("shared/keep", mode=0o2755, gid=1000),
                E("shared/keep/f", data=b"y", mode=0o600, gid=1000))
    apply_layer(io.BytesIO(layer), tmp_path)
    assert _mode(tmp_path / "shared") == 0o2775
    assert _owner(tmp_path / "shared") == (0, 1000)
    assert _owner(tmp_path / "shared/file") == (0, 0)
    assert _owner(tmp_path / "shared/sub") == (0, 0)
    assert _mode(tmp_path / "shared/sub") == 0o755
    assert _owner(tmp_path / "shared/link") == (0, 0)
    assert _mode(tmp_path / "shared/keep") == 0o2755
    assert _owner(tmp_path / "shared/keep/f") == (0, 1000)


def test_a_directory_made_set_group_id_after_its_children_are_cached(tmp_path):
    """A child listed before its directory makes the parent exist with defaults first; the
    directory's own entry then sets its bit, and later children see it."""
    layer = tar(E("late/first", data=b"1"), d("late", mode=0o2755, gid=1000),
                E("late/second", data=b"2"))
    apply_layer(io.BytesIO(layer), tmp_path)
    assert _mode(tmp_path / "late") == 0o2755
    assert _owner(tmp_path / "late/first") == (0, 0)
    assert _owner(tmp_path / "late/second") == (0, 0)


def test_existing_directory_takes_the_entry_owner_and_mode(tmp_path):
    (tmp_path / "etc").mkdir(mode=0o700)
    os.chown(tmp_path / "etc", 5, 5)
    (tmp_path / "same").mkdir(mode=0o755)
    apply_layer(io.BytesIO(tar(d("etc", mode=0o755, uid=0, gid=0, mtime=1_000_000_000),
                               d("same", mode=0o755, mtime=1_000_000_000))), tmp_path)
    assert _mode(tmp_path / "etc") == 0o755 and _owner(tmp_path / "etc") == (0, 0)
    assert os.lstat(tmp_path / "etc").st_mtime == 1_000_000_000
    assert os.lstat(tmp_path / "same").st_mtime == 1_000_000_000


def test_existing_names_are_replaced(tmp_path):
    (tmp_path / "was-dir").mkdir()
    (tmp_path / "was-dir/inner").write_bytes(b"x")
    (tmp_path / "was-file").write_bytes(b"old")
    os.symlink("/etc", tmp_path / "was-link")
    apply_layer(io.BytesIO(tar(E("was-dir", data=b"now a file"),
                               d("was-file"),
                               E("was-link", data=b"not through the link", mode=0o600))),
                tmp_path)
    assert (tmp_path / "was-dir").read_bytes() == b"now a file"
    assert stat.S_ISDIR(os.lstat(tmp_path / "was-file").st_mode)
    assert not os.path.islink(tmp_path / "was-link")
    assert (tmp_path / "was-link").read_bytes() == b"not through the link"


def test_sparse_file_data_is_expanded(tmp_path):
    """Sparse members store only their data chunks: they are copied through tarfile's
    reader, not straight from the stream."""
    layer = _gnu_sparse(b"sparse", [(0, b"head"), (1 << 20, b"tail")], (1 << 20) + 4)
    apply_layer(io.BytesIO(layer), tmp_path)
    got = (tmp_path / "sparse").read_bytes()
    assert len(got) == (1 << 20) + 4 and got[:4] == b"head" and got[-4:] == b"tail"
    assert got[4:-4] == bytes(len(got) - 8)


def _gnu_sparse(name: bytes, chunks: list[tuple[int, bytes]], realsize: int) -> bytes:
    """An old-GNU sparse member ('S') with up to four chunks in the header."""
    stored = b"".join(data for _, data in chunks)
    hdr = bytearray(512)
    hdr[0:len(name)] = name
    hdr[100:108] = b"0000644\0"
    hdr[108:116] = b"0000000\0"
    hdr[116:124] = b"0000000\0"
    hdr[124:136] = b"%011o\0" % len(stored)
    hdr[136:148] = b"%011o\0" % 1_600_000_000
    hdr[156:157] = b"S"
    hdr[257:265] = b"ustar  \0"
    for i, (offset, data) in enumerate(chunks):
        base = 386 + i * 24
        hdr[base:base + 12] = b"%011o\0" % offset
        hdr[base + 12:base + 24] = b"%011o\0" % len(data)
    hdr[483:495] = b"%011o\0" % realsize
    hdr[148:156] = b"        "
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    body = stored + bytes(-len(stored) % 512)
    return bytes(hdr) + body + bytes(1024)
