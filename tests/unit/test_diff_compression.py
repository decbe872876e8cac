"""The threaded gzip reader used for layers: same bytes as a plain decompression, errors
surface in the reading thread, and closing early stops the worker."""

from __future__ import annotations

import io
import os
import threading

import pytest
from isal import igzip, isal_zlib

from runtimed.diff import compression


def _reader(data: bytes) -> compression.ThreadedReader:
    return compression.ThreadedReader(isal_zlib._GzipReader(io.BytesIO(data), 1 << 16),
                                      size=1 << 16)


def test_reads_the_same_bytes_in_any_read_size():
    plain = os.urandom(300_000) + bytes(500_000)
    member = igzip.compress(plain)
    for size in (97, 4096, 1 << 20):
        r = _reader(member + member)  # two gzip members, as concatenated layers may be
        out = bytearray()
        buf = bytearray(size)
        while n := r.readinto(buf):
            out += buf[:n]
        assert out == plain + plain
        assert r.readinto(buf) == 0  # and stays at the end
        r.close()


def test_decompression_errors_reach_the_reader():
    r = _reader(igzip.compress(os.urandom(200_000))[:-50])
    with pytest.raises(EOFError):
        while r.read(1 << 16):
            pass
    r.close()
    r = _reader(b"\x1f\x8b" + os.urandom(5000))
    with pytest.raises((isal_zlib.error, igzip.BadGzipFile, OSError)):
        r.read(1 << 16)
    r.close()


def test_closing_before_the_end_stops_the_worker():
    before = threading.active_count()
    r = _reader(igzip.compress(bytes(50 << 20)))  # far more than the buffers hold
    assert r.read(10) == bytes(10)
    r.close()
    assert threading.active_count() == before
    assert r.closed


def test_apply_through_decompressed_gives_the_layer_digest():
    import hashlib

    plain = os.urandom(100_000)
    stream = compression.decompressed(io.BytesIO(igzip.compress(plain)))
    reader = compression.DigestReader(stream)
    buf = bytearray(7000)
    got = bytearray()
    while n := reader.readinto(buf):
        got += buf[:n]
    stream.close()
    assert bytes(got) == plain
    assert reader.digest == "sha256:" + hashlib.sha256(plain).hexdigest()
    assert reader.size == len(plain)
