"""A corpus of hostile layers: each is refused with InvalidArgument and nothing outside the
root (a sentinel directory next to it, and the host's absolute paths) is touched."""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tarfile
from pathlib import Path

import pytest
from isal import igzip

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_layer_builder import E, d, tar  # noqa: E402

from runtimed.diff.apply import apply_layer  # noqa: E402
from runtimed.errors import InvalidArgument  # noqa: E402


def _huge_pax_header() -> bytes:
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = 1 << 32
    return info.tobuf(format=tarfile.GNU_FORMAT)  # no data follows: never read


def _huge_longname() -> bytes:
    info = tarfile.TarInfo("././@LongLink")
    info.type = tarfile.GNUTYPE_LONGNAME
    info.size = 1 << 31
    return info.tobuf(format=tarfile.GNU_FORMAT)


def corpus(outside: Path) -> dict[str, bytes]:
    abs_target = str(outside)
    big = tar(E("big", data=os.urandom(50_000)))
    return {
        "dotdot": tar(E("../outside/pwned", data=b"x")),
        "dotdot-nested": tar(d("a"), E("a/../../outside/pwned", data=b"x")),
        "absolute": tar(E(f"{abs_target}/pwned", data=b"x")),
        "absolute-symlink": tar(E("esc", tarfile.SYMTYPE, linkname=abs_target),
                                E("esc/pwned", data=b"x")),
        "relative-symlink": tar(E("esc", tarfile.SYMTYPE, linkname="../outside"),
                                E("esc/pwned", data=b"x")),
        "symlink-chain": tar(d("a"), E("a/b", tarfile.SYMTYPE, linkname="../c"),
                             E("c", tarfile.SYMTYPE, linkname="../outside"),
                             E("a/b/pwned", data=b"x")),
        "symlink-dir-then-dir": tar(E("esc", tarfile.SYMTYPE, linkname="../outside"),
                                    d("esc/sub")),
        "hardlink-dotdot": tar(E("hl", tarfile.LNKTYPE, linkname="../outside/secret")),
        "hardlink-absolute": tar(E("hl", tarfile.LNKTYPE, linkname=f"{abs_target}/secret")),
        "hardlink-through-symlink": tar(E("esc", tarfile.SYMTYPE, linkname=abs_target),
                                        E("hl", tarfile.LNKTYPE, linkname="esc/secret")),
        "whiteout-through-symlink": tar(E("esc", tarfile.SYMTYPE, linkname="../outside"),
                                        E("esc/.wh.secret")),
        "opaque-through-symlink": tar(E("esc", tarfile.SYMTYPE, linkname=abs_target),
                                      E("esc/.wh..wh..opq")),
        "whiteout-dotdot": tar(d("a"), E("a/.wh..."), E(".wh..")),
        "huge-pax-header": _huge_pax_header(),
        "huge-longname": _huge_longname(),
        "truncated-tar": big[: len(big) // 2],
        "truncated-gzip": igzip.compress(big)[:-100],
        "not-a-tar": b"this is not a tar archive at all" * 40,
        "xattr-through-symlink": tar(E("esc", tarfile.SYMTYPE, linkname=abs_target),
                                     E("esc/secret", data=b"x", xattrs={"user.x": b"1"})),
    }


def snapshot(path: Path) -> dict[str, tuple]:
    state = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            data = Path(p).read_bytes() if os.path.isfile(p) and not os.path.islink(p) else b""
            state[p] = (st.st_mode, st.st_nlink, st.st_mtime_ns, hashlib.sha256(data).hexdigest(),
                        tuple(sorted(os.listxattr(p, follow_symlinks=False))))
    return state


NAMES = sorted(corpus(Path("/x")))


@pytest.mark.parametrize("case", NAMES)
def test_hostile_layer_is_refused_and_host_untouched(tmp_path, case):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("do not touch")
    (outside / "dir").mkdir()
    root = tmp_path / "root"
    root.mkdir()
    before = snapshot(tmp_path / "outside")
    layer = corpus(outside)[case]
    with pytest.raises(InvalidArgument):
        apply_layer(io.BytesIO(layer), root)
    assert snapshot(tmp_path / "outside") == before
    assert not (tmp_path / "pwned").exists()
    # and the same in overlay mode, where whiteouts become devices and xattrs
    with pytest.raises(InvalidArgument):
        apply_layer(io.BytesIO(layer), root, overlay=True)
    assert snapshot(tmp_path / "outside") == before


def test_symlink_left_by_a_lower_layer_is_replaced_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("keep")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(str(outside / "secret"), root / "link")
    apply_layer(io.BytesIO(tar(E("link", data=b"mine"))), root)
    assert (outside / "secret").read_text() == "keep"
    assert (root / "link").read_bytes() == b"mine" and not (root / "link").is_symlink()


def test_symlinks_inside_the_root_are_followed(tmp_path):
    """A relative symlink that stays inside the root is a legitimate parent path."""
    apply_layer(io.BytesIO(tar(d("usr"), d("usr/lib"), E("lib", tarfile.SYMTYPE, linkname="usr/lib"),
                               E("lib/libx.so", data=b"elf"))), tmp_path)
    assert (tmp_path / "usr/lib/libx.so").read_bytes() == b"elf"
