"""Layer media types and stream (de)compression, done in C: isal for gzip, zstandard.

Both directions are streams: a layer is never held in memory or written uncompressed to
disk. `DigestReader` hashes what passes through it, which gives the diff ID (the sha256 of
the uncompressed tar) of a layer while it is being applied.
"""

from __future__ import annotations

import hashlib
import io
import queue
import threading
from typing import BinaryIO

from runtimed.errors import InvalidArgument, Unimplemented

GZIP, ZSTD, NONE = "gzip", "zstd", "none"

MEDIA_TYPES: dict[str, str] = {
    "application/vnd.oci.image.layer.v1.tar": NONE,
    "application/vnd.oci.image.layer.v1.tar+gzip": GZIP,
    "application/vnd.oci.image.layer.v1.tar+zstd": ZSTD,
    "application/vnd.oci.image.layer.nondistributable.v1.tar": NONE,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": ZSTD,
    "application/vnd.docker.image.rootfs.diff.tar": NONE,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": GZIP,
    "application/vnd.docker.image.rootfs.diff.tar.zstd": ZSTD,
    "application/vnd.docker.image.rootfs.foreign.diff.tar": NONE,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": GZIP,
}

# what Diff produces for each compression, as containerd's walking differ does
OUTPUT_MEDIA_TYPES = {
    NONE: "application/vnd.oci.image.layer.v1.tar",
    GZIP: "application/vnd.oci.image.layer.v1.tar+gzip",
    ZSTD: "application/vnd.oci.image.layer.v1.tar+zstd",
}

CHUNK = 1 << 20


def compression_of(media_type: str) -> str:
    """The compression a layer media type declares; encryption and unknown types are
    refused (Unimplemented, as containerd answers)."""
    base = media_type.split(";", 1)[0].strip()
    if base in MEDIA_TYPES:
        return MEDIA_TYPES[base]
    if base.endswith("+encrypted"):
        raise Unimplemented(f"encrypted layers ({media_type}) are not supported")
    raise Unimplemented(f"unsupported layer media type {media_type!r}")


def detect(head: bytes) -> str:
    """Compression from the magic bytes (used when the media type is silent or wrong)."""
    if head[:2] == b"\x1f\x8b":
        return GZIP
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return ZSTD
    return NONE


class DigestReader(io.RawIOBase):
    """Reads through to `source`, hashing and counting every byte."""

    def __init__(self, source: BinaryIO):
        self.source = source
        self.hash = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.source.readinto(buffer)  # straight into the caller's buffer: no copy here
        if n:
            self.hash.update(memoryview(buffer)[:n])
            self.size += n
        return n

    def read(self, size: int = -1) -> bytes:
        data = self.source.read() if size is None or size < 0 else self.source.read(size)
        self.hash.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        """Hash what remains (tar padding after the end-of-archive blocks)."""
        while self.read(CHUNK):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


class _Peek(io.RawIOBase):
    def __init__(self, head: bytes, source: BinaryIO):
        self.head = head
        self.source = source

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.head:
            if size is None or size < 0:
                data, self.head = self.head + self.source.read(), b""
                return data
            data, self.head = self.head[:size], self.head[size:]
            return data
        return self.source.read() if size is None or size < 0 else self.source.read(size)

    def readinto(self, buffer) -> int:
        if self.head:
            data = self.read(len(buffer))
            buffer[:len(data)] = data
            return len(data)
        readinto = getattr(self.source, "readinto", None)
        if readinto is None:
            data = self.source.read(len(buffer))
            buffer[:len(data)] = data
            return len(data)
        return readinto(buffer) or 0


class ThreadedReader(io.RawIOBase):
    """Reads `inner` (a decompressor releasing the GIL) on its own thread, into a few
    buffers that go round between the two threads.

    isal's own threaded reader allocates a new megabyte for every block; in the daemon
    that memory comes back from the kernel as fresh pages each time (about one page fault
    per 4 KiB of layer), which cost more than the decompression itself.
    """

    def __init__(self, inner, buffers: int = 3, size: int = CHUNK):
        self._inner = inner
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._full: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(buffers):
            self._free.put(bytearray(size))
        self._block: memoryview | None = None
        self._held: bytearray | None = None
        self._pos = 0
        self._eof = False
        self._thread = threading.Thread(target=self._run, name="layer-decompress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while (buf := self._free.get()) is not None:
                n = self._inner.readinto(buf)
                self._full.put((buf, n, None))
                if not n:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the reading thread
            self._full.put((None, 0, exc))

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._block is None or self._pos >= len(self._block):
            if self._eof:
                return 0
            if self._held is not None:
                self._free.put(self._held)
                self._held = self._block = None
            buf, n, exc = self._full.get()
            if exc is not None:
                self._eof = True
                raise exc
            if not n:
                self._eof = True
                return 0
            self._held, self._block, self._pos = buf, memoryview(buf)[:n], 0
        n = min(len(buffer), len(self._block) - self._pos)
        buffer[:n] = self._block[self._pos:self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            # the worker stops at this marker, after at most the free buffers ahead of it
            self._free.put(None)
            self._thread.join()
        super().close()


def decompressed(source: BinaryIO, media_type: str | None = None) -> BinaryIO:
    """A reader of the uncompressed tar; the compression is taken from the magic bytes
    (a declared media type only decides whether the type is supported at all)."""
    if media_type:
        compression_of(media_type)
    head = source.read(4)
    stream = _Peek(head, source)
    kind = detect(head)
    if kind == GZIP:
        from isal import isal_zlib

        # decompression on its own thread (isal releases the GIL) overlaps with the tar
        # parsing and writing here; close() stops it
        return ThreadedReader(isal_zlib._GzipReader(stream, CHUNK))
    if kind == ZSTD:
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(stream, read_size=CHUNK,
                                                           read_across_frames=True)
    return stream


class Compressor:
    """A writable stream compressing into `sink` (which receives compressed chunks)."""

    def __init__(self, sink: BinaryIO, compression: str, level: int | None = None):
        self.compression = compression
        self.sink = sink
        if compression == GZIP:
            from isal import igzip

            # isal levels are 0..3; 1 is close to zlib's 6 in ratio at several times the speed
            self._w = igzip.IGzipFile(fileobj=sink, mode="wb",
                                      compresslevel=1 if level is None else level, mtime=0)
        elif compression == ZSTD:
            import zstandard

            self._w = zstandard.ZstdCompressor(level=3 if level is None else level).stream_writer(
                sink, closefd=False)
        elif compression == NONE:
            self._w = None
        else:
            raise InvalidArgument(f"unknown compression {compression!r}")

    def write(self, data) -> int:
        if self._w is None:
            self.sink.write(data)
        else:
            self._w.write(data)
        return len(data)

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None

    def flush(self) -> None:
        pass
