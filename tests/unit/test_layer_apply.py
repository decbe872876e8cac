"""Layer application: entry types and attributes, compression, whiteouts in both modes."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import sys
import tarfile
from pathlib import Path

import pytest
import zstandard
from isal import igzip

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_layer_builder import E, d, tar  # noqa: E402

from runtimed.diff.apply import apply_layer  # noqa: E402
from runtimed.errors import Unimplemented  # noqa: E402
from runtimed.snapshots import mount as mountlib  # noqa: E402


def test_entry_types_and_attributes(tmp_path):
    layer = tar(
        d("dir", mode=0o1777, uid=5, gid=6, mtime=1_500_000_000),
        E("dir/suid", data=b"#!/bin/sh\n", mode=0o4755, uid=7, gid=8),
        E("dir/sgid", data=b"x", mode=0o2711),
        E("link", tarfile.SYMTYPE, linkname="../outside/nothing", uid=3, gid=4),
        E("hard", tarfile.LNKTYPE, linkname="dir/suid"),
        E("null", tarfile.CHRTYPE, dev=(1, 3), mode=0o666),
        E("blk", tarfile.BLKTYPE, dev=(7, 0), mode=0o660),
        E("fifo", tarfile.FIFOTYPE, mode=0o600),
        E("attrs", data=b"a", xattrs={"user.k": b"v\xff", "trusted.t": b"1",
                                     "security.capability": b"\x01\x00\x00\x02" + b"\x00" * 16}),
        E("deep/er/file", data=b"auto parents"),
    )
    root = tmp_path / "root"
    root.mkdir()
    result = apply_layer(io.BytesIO(layer), root)
    assert result.digest == "sha256:" + hashlib.sha256(layer).hexdigest()
    assert result.size == len(layer)

    st = os.lstat(root / "dir")
    assert stat.S_IMODE(st.st_mode) == 0o1777 and (st.st_uid, st.st_gid) == (5, 6)
    assert st.st_mtime == 1_500_000_000  # set after the files inside were written
    st = os.lstat(root / "dir/suid")
    assert stat.S_IMODE(st.st_mode) == 0o4755 and (st.st_uid, st.st_gid) == (7, 8)
    assert st.st_mtime == 1_600_000_000 and st.st_nlink == 2
    assert os.lstat(root / "hard").st_ino == st.st_ino
    assert stat.S_IMODE(os.lstat(root / "dir/sgid").st_mode) == 0o2711
    assert os.readlink(root / "link") == "../outside/nothing"
    assert (os.lstat(root / "link").st_uid, os.lstat(root / "link").st_gid) == (3, 4)
    null = os.lstat(root / "null")
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o666
    assert stat.S_ISBLK(os.lstat(root / "blk").st_mode)
    assert stat.S_ISFIFO(os.lstat(root / "fifo").st_mode)
    assert os.getxattr(root / "attrs", "user.k") == b"v\xff"
    assert os.getxattr(root / "attrs", "trusted.t") == b"1"
    assert os.getxattr(root / "attrs", "security.capability")[:4] == b"\x01\x00\x00\x02"
    assert (root / "deep/er/file").read_bytes() == b"auto parents"
    assert stat.S_IMODE(os.lstat(root / "deep").st_mode) == 0o755


@pytest.mark.parametrize("compress,media_type", [
    (lambda b: b, "application/vnd.oci.image.layer.v1.tar"),
    (igzip.compress, "application/vnd.oci.image.layer.v1.tar+gzip"),
    (igzip.compress, "application/vnd.docker.image.rootfs.diff.tar.gzip"),
    (lambda b: zstandard.ZstdCompressor().compress(b), "application/vnd.oci.image.layer.v1.tar+zstd"),
    (lambda b: zstandard.ZstdCompressor().compress(b), "application/vnd.docker.image.rootfs.diff.tar.zstd"),
])
def test_compressions_give_the_uncompressed_digest(tmp_path, compress, media_type):
    layer = tar(E("f", data=os.urandom(300_000)), d("d"), E("d/g", data=b"g"))
    result = apply_layer(io.BytesIO(compress(layer)), tmp_path, media_type=media_type)
    assert result.digest == "sha256:" + hashlib.sha256(layer).hexdigest()
    assert (tmp_path / "d/g").read_bytes() == b"g"


def test_unknown_media_type_is_unimplemented(tmp_path):
    with pytest.raises(Unimplemented):
        apply_layer(io.BytesIO(tar()), tmp_path, media_type="application/x-rar")


def test_whiteouts_delete_in_plain_mode(tmp_path):
    apply_layer(io.BytesIO(tar(
        E("gone", data=b"1"), d("dir"), E("dir/old", data=b"o"), d("dir/sub"),
        E("dir/sub/x", data=b"x"), d("keep"), E("keep/k", data=b"k"), d("tree"),
        E("tree/t", data=b"t"),
    )), tmp_path)
    apply_layer(io.BytesIO(tar(
        E(".wh.gone"), E(".wh.tree"), E("dir/new", data=b"n"), E("dir/.wh..wh..opq"),
        E("keep/.wh.missing"),
    )), tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["dir", "keep"]
    assert os.listdir(tmp_path / "dir") == ["new"]
    assert os.listdir(tmp_path / "keep") == ["k"]


def test_overlay_whiteouts_and_parent_attributes(tmp_path):
    lower, upper, work, merged = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
    for p in (lower, upper, work, merged):
        p.mkdir()
    apply_layer(io.BytesIO(tar(
        E("gone", data=b"1"), d("opq"), E("opq/old", data=b"o"),
        d("shared", mode=0o750, uid=9, gid=9), E("shared/a", data=b"a"),
    )), lower)
    apply_layer(io.BytesIO(tar(
        E(".wh.gone"), d("opq"), E("opq/.wh..wh..opq"), E("opq/new", data=b"n"),
        E("shared/b", data=b"b"),
    )), upper, overlay=True, parents=[str(lower)])
    wh = os.lstat(upper / "gone")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert os.getxattr(upper / "opq", "trusted.overlay.opaque") == b"y"
    # the parent directory made in the upper copies the lower's attributes
    st = os.lstat(upper / "shared")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 9, 9)

    mountlib.mount(mountlib.Mount("overlay", "overlay", [
        f"lowerdir={lower}", f"upperdir={upper}", f"workdir={work}"]), merged)
    try:
        assert sorted(os.listdir(merged)) == ["opq", "shared"]
        assert os.listdir(merged / "opq") == ["new"]
        assert sorted(os.listdir(merged / "shared")) == ["a", "b"]
    finally:
        mountlib.unmount_all(merged)


def test_replacing_entries(tmp_path):
    apply_layer(io.BytesIO(tar(d("was-dir"), E("was-dir/f", data=b"1"), E("was-file", data=b"2"),
                               E("was-link", tarfile.SYMTYPE, linkname="was-dir"))), tmp_path)
    apply_layer(io.BytesIO(tar(E("was-dir", data=b"now a file"), d("was-file"),
                               E("was-link", data=b"now a file too"))), tmp_path)
    assert (tmp_path / "was-dir").read_bytes() == b"now a file"
    assert (tmp_path / "was-file").is_dir()
    assert not (tmp_path / "was-link").is_symlink()
    assert (tmp_path / "was-link").read_bytes() == b"now a file too"


def test_empty_stream_is_an_empty_layer(tmp_path):
    assert apply_layer(io.BytesIO(b""), tmp_path).size == 0
    assert os.listdir(tmp_path) == []


def test_overlay_directory_replacing_a_whiteout_is_opaque(tmp_path):
    lower, upper, work, merged = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
    for p in (lower, upper, work, merged):
        p.mkdir()
    apply_layer(io.BytesIO(tar(d("a"), E("a/old", data=b"o"))), lower)
    apply_layer(io.BytesIO(tar(E(".wh.a"), d("a"), E("a/new", data=b"n"))), upper,
                overlay=True, parents=[str(lower)])
    assert os.getxattr(upper / "a", "trusted.overlay.opaque") == b"y"
    mountlib.mount(mountlib.Mount("overlay", "overlay", [
        f"lowerdir={lower}", f"upperdir={upper}", f"workdir={work}"]), merged)
    try:
        assert os.listdir(merged / "a") == ["new"]
    finally:
        mountlib.unmount_all(merged)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_fast_header_parser_matches_tarfile(fmt):
    from runtimed.diff.apply import _BoundedTarInfo

    kinds = {"sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE, "dev": tarfile.CHRTYPE,
             "blk": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}
    names = ["a", "dir/", "x" * 99, "p/" * 60 + "long", "ünï", *kinds]
    if fmt != tarfile.USTAR_FORMAT:
        names.append("q/" * 80 + "longer-than-ustar")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for n in names:
            ti = tarfile.TarInfo(n)
            ti.type = kinds.get(n, tarfile.DIRTYPE if n.endswith("/") else tarfile.REGTYPE)
            ti.linkname = "target" if n in ("sym", "hard") else ""
            ti.devmajor, ti.devminor = (1, 3) if n in ("dev", "blk") else (0, 0)
            ti.uid = 2**22 if fmt != tarfile.USTAR_FORMAT and n == "a" else 5  # base-256
            ti.mode, ti.mtime = 0o4755, 1_600_000_000
            tf.addfile(ti, io.BytesIO(b"") if ti.type == tarfile.REGTYPE else None)

    def fields(tarinfo):
        tf = tarfile.open(fileobj=io.BytesIO(buf.getvalue()), mode="r:", tarinfo=tarinfo)
        return [(m.name, m.type, m.mode, m.uid, m.gid, m.size, m.mtime, m.linkname,
                 m.devmajor, m.devminor, m.pax_headers) for m in tf]

    assert fields(_BoundedTarInfo) == fields(tarfile.TarInfo)


def test_read_only_target_is_a_failed_precondition(tmp_path):
    from runtimed.errors import FailedPrecondition

    src, target = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    target.mkdir()
    mountlib.mount(mountlib.Mount("bind", str(src), ["ro", "rbind"]), target)
    try:
        with pytest.raises(FailedPrecondition):
            apply_layer(io.BytesIO(tar(E("f", data=b"x"))), target)
    finally:
        mountlib.unmount_all(target)
    assert os.listdir(src) == []
