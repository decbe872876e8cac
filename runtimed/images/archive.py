"""Image archives in and out: OCI image layout tars and `docker save` tars.

Import streams the tar once: every blob goes straight into the content store (verified
by digest and size as it is written, never held in memory), under a temporary lease so
nothing of a failed import survives the next collection. Only after the whole tree under
the archive's index is present and valid are image records created. Refusals are
InvalidArgument naming the member or blob at fault.

Export writes an OCI layout (plus Docker's manifest.json, as containerd does, so `docker
load` reads it too) or a docker-archive; an OCI export imports back with the same digests.
Every blob it will send is put on a lease of the export's own before it is read, and the
lease goes when the stream ends however it ends: an image deleted and collected mid-export
still streams whole, and its blobs are collectable once the stream is over.
The rules for names, platforms and the Docker conversion follow containerd's
`images/archive` package and `ctr images import/export`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import secrets
import tarfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import BinaryIO

from runtimed.content.digests import validate as validate_digest
from runtimed.content.store import ContentInfo
from runtimed.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from runtimed.images import mediatypes, platforms, reference
from runtimed.images.manifest import (
    MAX_JSON_SIZE,
    Descriptor,
    children,
    config_platform,
    dump_json,
    gc_labels,
    load_json,
    parse_config,
    parse_index,
    parse_manifest,
    walk,
)
from runtimed.metadata.images import Image
from runtimed.metadata.leases import CONTENT, EXPIRE_LABEL, Resource

log = logging.getLogger("runtimed.images.archive")

CHUNK = 1 << 20
IMPORT_LEASE_TTL = timedelta(hours=1)  # a crashed import's blobs go at a later collection
EXPORT_LEASE_TTL = timedelta(hours=24)  # as containerd's transfer service leases its work
ARCHIVE_LABEL = "runtimed.io/archive"  # on the leases imports and exports make: import|export
_GZIP_MAGIC = b"\x1f\x8b\x08"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_SPECIAL_FILES = ("oci-layout", "index.json", "manifest.json", "repositories")


@dataclass
class ImportOptions:
    """As `ctr images import`: names come from the archive's annotations; `base_name`
    prefixes tag-only names and then keeps only names under it; without it tag-only names
    get `import-<date>`."""

    base_name: str = ""
    digests: bool = False  # also name each image `<base>@<digest>`
    skip_digest_for_named: bool = False
    index_name: str = ""  # also keep the archive's index as an image of this name
    all_platforms: bool = False
    platform: str = ""  # verify only this platform's content (strict); default: the host's
    unpack: bool = False
    snapshotter: str = ""
    labels: dict[str, str] = field(default_factory=dict)  # set on every image created


@dataclass
class ExportOptions:
    all_platforms: bool = False
    platforms: list[str] = field(default_factory=list)  # default: the host's (strict)
    skip_manifest_json: bool = False  # leave out Docker's manifest.json (OCI layout only)
    skip_non_distributable: bool = False
    docker: bool = False  # docker-archive (manifest.json + repositories) instead of OCI


@dataclass
class Progress:
    """What an import is doing: `read` (offset = archive bytes read), `blob` (a blob is
    stored: ref = digest, offset = total = its size), `image` (ref = image name created),
    `unpack` (ref = image name unpacked)."""

    action: str
    ref: str = ""
    offset: int = 0
    total: int = 0


@dataclass
class ImportedImage:
    name: str
    target: Descriptor


ProgressFn = Callable[[Progress], None]


class Archives:
    """Import and export over the content, image and lease stores (no store of its own)."""

    def __init__(self, content, images, leases, gc=None, unpacker_factory=None):
        self.content = content
        self.images = images
        self.leases = leases
        self.gc = gc
        self.unpacker_factory = unpacker_factory  # () -> object with unpack(ns, image, ...)

    # -- import ---------------------------------------------------------------------------

    def import_archive(
        self,
        ns: str,
        reader: BinaryIO,
        options: ImportOptions | None = None,
        progress: ProgressFn | None = None,
        lease: str | None = None,
    ) -> list[ImportedImage]:
        """Read one archive from `reader`; return the images created or updated.

        Under the caller's `lease` when given; otherwise under a temporary one, dropped at
        the end: the new image records then keep their blobs, and a failed import's blobs
        are collected at once.
        """
        options = options or ImportOptions()
        report = progress or (lambda p: None)
        own_lease = None
        if lease is None:
            own_lease = lease = self._temporary_lease(ns, "import", IMPORT_LEASE_TTL)
        try:
            imported = _Import(self, ns, options, report, lease).run(reader)
        except BaseException:
            if own_lease is not None:
                self._drop_lease(ns, own_lease, collect=True)
            raise
        if own_lease is not None:
            self._drop_lease(ns, own_lease, collect=False)
        return imported

    def _temporary_lease(self, ns: str, kind: str, ttl: timedelta) -> str:
        expires = (datetime.now(UTC) + ttl).strftime("%Y-%m-%dT%H:%M:%SZ")
        return self.leases.create(ns, f"{kind}-{secrets.token_hex(8)}",
                                  {EXPIRE_LABEL: expires, ARCHIVE_LABEL: kind}).id

    def recover(self, namespaces: Callable[[], list]) -> None:
        """At daemon start: the leases of imports and exports a crash cut off are dropped
        (their streams are gone), so what they alone held goes at the next collection
        rather than at their expiry."""
        for namespace in namespaces():
            for lease in self.leases.list(namespace.name):
                if lease.labels.get(ARCHIVE_LABEL) in ("import", "export"):
                    try:
                        self.leases.delete(namespace.name, lease.id)
                    except NotFound:
                        pass

    def _drop_lease(self, ns: str, lease: str, collect: bool) -> None:
        try:
            self.leases.delete(ns, lease)
        except NotFound:
            pass
        if collect and self.gc is not None:
            try:
                self.gc.collect()
            except Exception:  # noqa: BLE001 - the import error matters more
                log.exception("collecting after a failed import")

    # -- export ---------------------------------------------------------------------------

    def export_chunks(
        self, ns: str, names: list[str], options: ExportOptions | None = None
    ) -> ExportStream:
        """The archive of images `names`, as chunks of about 1 MiB. Names and blobs are
        resolved before the first chunk, so a missing image fails before any output. Each
        blob is leased before it is first read; the caller ends the stream by exhausting
        it or with `close()`, which drops the lease."""
        options = options or ExportOptions()
        if not names:
            raise InvalidArgument("export needs at least one image name")
        lease = self._temporary_lease(ns, "export", EXPORT_LEASE_TTL)
        try:
            plan = _ExportPlan(self, ns, options, lease)
            for name in names:
                plan.add_image(name)
        except BaseException:
            self._drop_lease(ns, lease, collect=False)
            raise
        return ExportStream(self, ns, lease, _coalesce(plan.records()))

    def export_archive(
        self, ns: str, names: list[str], out: BinaryIO, options: ExportOptions | None = None
    ) -> int:
        written = 0
        with self.export_chunks(ns, names, options) as chunks:
            for chunk in chunks:
                out.write(chunk)
                written += len(chunk)
        return written

    # -- helpers shared by import and export ----------------------------------------------

    def read_json_blob(self, ns: str, desc: Descriptor) -> bytes:
        """A manifest, index or config from the store, checked against its descriptor."""
        info = self._present(ns, desc)
        if info.size > MAX_JSON_SIZE:
            raise InvalidArgument(
                f"{_kind(desc)} {desc.digest}: {info.size} bytes exceeds the {MAX_JSON_SIZE} "
                "byte limit for JSON documents"
            )
        with self.content.open_blob(ns, desc.digest) as f:
            return f.read()

    def _present(self, ns: str, desc: Descriptor):
        try:
            info = self.content.info(ns, desc.digest)
        except NotFound:
            raise NotFound(f"{_kind(desc)} {desc.digest} is not in the content store") from None
        if info.size != desc.size:
            raise InvalidArgument(
                f"{_kind(desc)} {desc.digest}: descriptor says {desc.size} bytes, blob has {info.size}"
            )
        return info


class ExportStream:
    """The chunks of one export and the lease holding its blobs. The lease goes when the
    chunks run out, when producing one fails, or at `close()` (a client that went away);
    `close()` may come from another thread while a chunk is being read: it waits for it."""

    def __init__(self, archives: Archives, ns: str, lease: str, chunks: Iterator[bytes]):
        self._archives = archives
        self._ns = ns
        self._lease: str | None = lease
        self._chunks: Iterator[bytes] | None = chunks
        self._lock = threading.Lock()

    def __iter__(self) -> ExportStream:
        return self

    def __next__(self) -> bytes:
        with self._lock:
            if self._chunks is None:
                raise StopIteration
            try:
                return next(self._chunks)
            except BaseException:  # StopIteration included: the stream is over
                self._end()
                raise

    def close(self) -> None:
        with self._lock:
            if self._chunks is not None:
                self._chunks.close()  # type: ignore[attr-defined]
            self._end()

    def __enter__(self) -> ExportStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _end(self) -> None:
        self._chunks = None
        lease, self._lease = self._lease, None
        if lease is not None:
            self._archives._drop_lease(self._ns, lease, collect=False)


def _kind(desc: Descriptor) -> str:
    mt = desc.media_type
    if mediatypes.is_index(mt):
        return "index"
    if mediatypes.is_manifest(mt):
        return "manifest"
    if mediatypes.is_config(mt):
        return "config"
    if mediatypes.is_layer(mt):
        return "layer"
    return f"blob ({mt})" if mt else "blob"


class _ArchiveStream:
    """The archive as tarfile reads a stream (read, forward seek, tell), counting bytes
    and reporting them at most every few MiB, plus `views`: a member's data as views into
    the buffers the reader handed over. Tarfile's own stream mode copies each byte four
    to six times on its way to a member's reader (joins, slices, a buffered reader); the
    bytes of a blob go from here to the content store with no copy at all."""

    def __init__(self, raw: BinaryIO, report: ProgressFn):
        self.raw = raw
        self.report = report
        self.count = 0  # bytes taken from `raw`
        self._reported = 0
        self._buffer = memoryview(b"")
        self._pos = 0  # archive offset of the first byte of `_buffer`

    def _fill(self) -> bool:
        data = self.raw.read(CHUNK)
        n = len(data)
        self._buffer = memoryview(data)
        self.count += n
        if self.count - self._reported >= 4 * CHUNK or (n == 0 and self.count != self._reported):
            self._reported = self.count
            self.report(Progress("read", offset=self.count))
        return n > 0

    def peek(self, size: int) -> bytes:
        """Up to `size` bytes from the current position, not consumed (compression sniffing)."""
        while len(self._buffer) < size:
            rest = bytes(self._buffer)
            if not self._fill():
                self._buffer = memoryview(rest)
                break
            if rest:
                self._buffer = memoryview(rest + bytes(self._buffer))
        return bytes(self._buffer[:size])

    def views(self, size: int) -> Iterator[memoryview]:
        """The next `size` bytes (fewer at the end of the stream), piece by piece."""
        while size > 0:
            if not self._buffer and not self._fill():
                return
            piece = self._buffer[:size]
            self._buffer = self._buffer[len(piece):]
            self._pos += len(piece)
            size -= len(piece)
            yield piece

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = 1 << 62
        if len(self._buffer) >= size:  # headers and JSON members: one slice
            piece = self._buffer[:size]
            self._buffer = self._buffer[size:]
            self._pos += size
            return bytes(piece)
        return b"".join(self.views(size))

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence != 0 or offset < self._pos:
            raise tarfile.StreamError("seeking backwards is not allowed")
        for _ in self.views(offset - self._pos):
            pass
        return self._pos

    def drain(self) -> None:
        """Read what follows the end-of-archive marker (record padding), so the whole
        stream is consumed and the last progress report says so."""
        for _ in self.views(1 << 62):
            pass


def _compressed(head: bytes) -> bool:
    """What tarfile's stream mode would decompress (its own sniffing, byte for byte)."""
    return (head.startswith((b"\x1f\x8b\x08", b"\x5d\x00\x00\x80", b"\xfd7zXZ"))
            or (head[0:3] == b"BZh" and head[4:10] == b"1AY&SY"))


def _member_path(name: str) -> str:
    """The member's name, normalised; absolute names and `..` are refused, not rewritten."""
    if not name or name.startswith("/"):
        raise InvalidArgument(f"archive member {name!r}: absolute names are not allowed")
    if "\x00" in name:
        raise InvalidArgument(f"archive member {name!r}: NUL in name")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidArgument(f"archive member {name!r}: path traversal ('..') is not allowed")
    return "/".join(parts)


def _member_data(tf: tarfile.TarFile, member: tarfile.TarInfo) -> Iterator[bytes | memoryview]:
    """A regular member's bytes in pieces of at most CHUNK: straight from the archive
    stream's buffers when tarfile reads an uncompressed stream of ours, else through
    tarfile's reader."""
    if isinstance(tf.fileobj, _ArchiveStream) and not member.issparse():
        tf.fileobj.seek(member.offset_data)
        left = member.size
        for piece in tf.fileobj.views(left):
            left -= len(piece)
            for start in range(0, len(piece), CHUNK):
                yield piece[start:start + CHUNK]
        if left:
            raise tarfile.ReadError("unexpected end of data")
        return
    f = tf.extractfile(member)
    while chunk := f.read(CHUNK):
        yield chunk


def _check_digest(chunks: Iterator[bytes | memoryview], expected: str, size: int) -> None:
    h = hashlib.sha256()
    n = 0
    for chunk in chunks:
        h.update(chunk)
        n += len(chunk)
    actual = "sha256:" + h.hexdigest()
    if n != size or actual != expected:
        raise InvalidArgument(f"content is {actual} ({n} bytes), expected {expected} ({size} bytes)")


def _read_member_json(tf: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> bytes:
    if member.size > MAX_JSON_SIZE:
        raise InvalidArgument(
            f"archive member {name}: {member.size} bytes exceeds the {MAX_JSON_SIZE} byte "
            "limit for JSON documents"
        )
    f = tf.extractfile(member)
    return f.read() if f is not None else b""


class _Import:
    """One import: the streaming pass over the tar, then verification and naming."""

    def __init__(self, archives: Archives, ns: str, options: ImportOptions, report: ProgressFn,
                 lease: str):
        self.a = archives
        self.content = archives.content
        self.ns = ns
        self.options = options
        self.report = report
        self.lease = lease
        self.files: dict[str, Descriptor] = {}  # member name -> blob (digest, size)
        self.json: dict[str, bytes] = {}  # oci-layout, index.json, manifest.json
        self.symlinks: dict[str, str] = {}

    def run(self, reader: BinaryIO) -> list[ImportedImage]:
        matcher = self._matcher()  # a bad platform fails before any byte is read
        stream = _ArchiveStream(reader, self.report)
        try:
            if _compressed(stream.peek(10)):  # gzip, bzip2, xz: tarfile decompresses
                tf = tarfile.open(fileobj=stream, mode="r|*", bufsize=CHUNK)
            else:
                tf = tarfile.TarFile(fileobj=stream, mode="r")
            with tf:
                for member in tf:
                    self._member(tf, member)
            stream.drain()
        except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise  # a disk error of ours, not a broken archive
            raise InvalidArgument(f"not a readable tar archive: {exc or type(exc).__name__}") from None
        if "oci-layout" in self.json:
            index = self._oci_index()
        elif "manifest.json" in self.json:
            index = self._docker_index()
        elif "index.json" in self.json:
            raise InvalidArgument("OCI image layout without an oci-layout file")
        else:
            raise InvalidArgument(
                "unrecognized image archive: neither an OCI image layout (oci-layout, "
                "index.json) nor a docker save archive (manifest.json)"
            )
        self._verify(index, matcher)
        images = self._names(index)
        created = []
        for name, target in images:
            self._store_image(name, target)
            created.append(ImportedImage(name, target))
            self.report(Progress("image", ref=name, offset=target.size, total=target.size))
        if self.options.unpack:
            self._unpack(created)
        return created

    # streaming pass

    def _member(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = _member_path(member.name)
        if member.isdir():
            return
        if member.issym():
            target = member.linkname
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
            if target.startswith("/") or resolved.startswith("../") or resolved == "..":
                raise InvalidArgument(
                    f"archive member {name}: symlink to {target!r} points outside the archive"
                )
            self.symlinks[name] = resolved
            return
        if not member.isreg():
            kind = "hard link" if member.islnk() else "special file"
            raise InvalidArgument(f"archive member {name}: {kind} entries are not allowed in an image archive")
        if name in _SPECIAL_FILES:
            if name in self.json:
                raise InvalidArgument(f"archive member {name} appears twice")
            self.json[name] = _read_member_json(tf, member, name)
            return
        if posixpath.basename(name) in ("VERSION", "json") and "/" in name:
            return  # docker save v1.0 layer metadata, unused
        expected = None
        if name.startswith("blobs/"):
            parts = name.split("/")
            if len(parts) != 3:
                raise InvalidArgument(f"archive member {name}: expected blobs/<algorithm>/<hex>")
            expected = f"{parts[1]}:{parts[2]}"
            try:
                validate_digest(expected)
            except InvalidArgument as exc:
                raise InvalidArgument(f"archive member {name}: {exc}") from None
        try:
            info = self._write_blob(_member_data(tf, member), expected, member.size)
        except (FailedPrecondition, InvalidArgument) as exc:
            raise InvalidArgument(f"archive member {name}: content does not match: {exc}") from None
        self.files[name] = Descriptor("", info.digest, info.size)
        self.report(Progress("blob", ref=info.digest, offset=info.size, total=info.size))

    def _write_blob(self, chunks: Iterator[bytes | memoryview], expected: str | None,
                    size: int) -> ContentInfo:
        """Stream one member into the store, verified against `expected` and `size`.

        A blob the store already holds (here, or on disk for another namespace) is not
        written again, but the member is still hashed: the archive itself must be sound.
        """
        ref = f"import-{secrets.token_hex(8)}"
        try:
            w = self.content.writer(self.ns, ref, total=size, expected=expected or "",
                                    lease=self.lease)
        except AlreadyExists:
            _check_digest(chunks, expected, size)
            return self.content.info(self.ns, expected)
        try:
            status = w.status()
            if expected and status.expected == expected and status.offset == size:
                _check_digest(chunks, expected, size)  # on disk already: commit, no copy
            else:
                for chunk in chunks:
                    w.write(chunk)
            try:
                return w.commit(size, expected or "")
            except AlreadyExists:
                return self.content.info(self.ns, w.digest())
        except BaseException:
            w.close()
            try:
                self.content.abort(self.ns, ref, self.lease)
            except NotFound:
                pass
            raise

    # OCI layout

    def _oci_index(self) -> Descriptor:
        layout = load_json(self.json["oci-layout"], "oci-layout")
        version = layout.get("imageLayoutVersion")
        if version != mediatypes.OCI_LAYOUT_VERSION:
            raise InvalidArgument(f"oci-layout: unsupported imageLayoutVersion {version!r}")
        data = self.json.get("index.json")
        if data is None:
            raise InvalidArgument("OCI image layout without index.json")
        parse_index(data, mediatypes.OCI_INDEX, "index.json")
        return self._write_json(data, mediatypes.OCI_INDEX)

    def _write_json(self, data: bytes, media_type: str) -> Descriptor:
        info = self.content.write_blob(self.ns, data, expected_size=len(data), lease=self.lease)
        return Descriptor(media_type, info.digest, info.size)

    # docker save

    def _resolve(self, name: str, what: str) -> Descriptor:
        path = _member_path(name)
        for _ in range(16):
            if path in self.files:
                return self.files[path]
            if path not in self.symlinks:
                break
            path = self.symlinks[path]
        raise InvalidArgument(f"manifest.json: {what} {name!r} is missing from the archive")

    def _docker_index(self) -> Descriptor:
        try:
            entries = json.loads(self.json["manifest.json"])
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidArgument(f"manifest.json: invalid JSON: {exc}") from None
        if not isinstance(entries, list) or not entries:
            raise InvalidArgument("manifest.json: expected a non-empty list of images")
        manifests = []
        for i, entry in enumerate(entries):
            where = f"manifest.json[{i}]"
            if not isinstance(entry, dict):
                raise InvalidArgument(f"{where}: expected an object")
            config_name, layer_names = entry.get("Config"), entry.get("Layers") or []
            tags = entry.get("RepoTags") or []
            if not isinstance(config_name, str):
                raise InvalidArgument(f"{where}: Config must name the config file")
            if not isinstance(layer_names, list) or not all(isinstance(x, str) for x in layer_names):
                raise InvalidArgument(f"{where}: Layers must be a list of file names")
            if not isinstance(tags, list) or not all(isinstance(x, str) for x in tags):
                raise InvalidArgument(f"{where}: RepoTags must be a list of names")
            config = self._resolve(config_name, "config")
            config = Descriptor(mediatypes.DOCKER_CONFIG, config.digest, config.size)
            config_doc = parse_config(self.a.read_json_blob(self.ns, config), f"config {config_name}")
            layers = []
            for layer_name in layer_names:
                blob = self._resolve(layer_name, "layer")
                layers.append(Descriptor(self._layer_type(blob), blob.digest, blob.size))
            diff_ids = (config_doc.get("rootfs") or {}).get("diff_ids")
            if diff_ids is not None and len(diff_ids) != len(layers):
                raise InvalidArgument(
                    f"{where}: {len(layers)} layers but the config lists {len(diff_ids)} diff_ids"
                )
            doc = {
                "schemaVersion": 2,
                "mediaType": mediatypes.DOCKER_MANIFEST,
                "config": config.to_json(),
                "layers": [layer.to_json() for layer in layers],
            }
            desc = self._write_json(dump_json(doc), mediatypes.DOCKER_MANIFEST)
            desc.platform = config_platform(config_doc)
            if not tags:
                manifests.append(desc)
            for tag in tags:
                ref = reference.parse(tag)
                named = Descriptor(desc.media_type, desc.digest, desc.size, platform=desc.platform)
                named.annotations = {
                    mediatypes.ANNOTATION_IMAGE_NAME: str(ref),
                    mediatypes.ANNOTATION_REF_NAME: ref.object,
                }
                manifests.append(named)
        index = {"schemaVersion": 2, "manifests": [m.to_json() for m in manifests]}
        return self._write_json(dump_json(index), mediatypes.OCI_INDEX)

    def _layer_type(self, blob: Descriptor) -> str:
        with self.content.open_blob(self.ns, blob.digest) as f:
            head = f.read(4)
        if head.startswith(_GZIP_MAGIC):
            return mediatypes.DOCKER_LAYER_GZIP
        if head.startswith(_ZSTD_MAGIC):
            return mediatypes.DOCKER_LAYER_ZSTD
        return mediatypes.DOCKER_LAYER

    # verification

    def _matcher(self) -> platforms.Matcher:
        if self.options.all_platforms:
            return platforms.ALL
        if self.options.platform:
            return platforms.only_strict(platforms.parse(self.options.platform))
        return platforms.default()

    def _verify(self, index: Descriptor, matcher: platforms.Matcher) -> None:
        """Every blob under the index (for the platforms asked for) is present, of the
        size its descriptor says, and every JSON document in it parses; parents get the
        gc.ref labels containerd's clients expect, for all their children."""

        def read(desc: Descriptor) -> bytes:
            try:
                return self.a.read_json_blob(self.ns, desc)
            except NotFound as exc:
                raise InvalidArgument(f"{exc}: missing from the archive") from None

        for node in walk(read, index, matcher):
            desc = node.descriptor
            if not (mediatypes.is_index(desc.media_type) or mediatypes.is_manifest(desc.media_type)
                    or mediatypes.is_config(desc.media_type)):
                if mediatypes.is_non_distributable(desc.media_type):
                    continue  # foreign layers are fetched from their URLs, never archived
                try:
                    self.a._present(self.ns, desc)
                except NotFound as exc:
                    raise InvalidArgument(f"{exc}: missing from the archive") from None
            if node.all_children:
                # every platform's content the archive brought stays with the index, so a
                # later unpack or export can pick another platform
                labels = gc_labels(node.all_children)
                self.content.update(
                    self.ns, ContentInfo(desc.digest, 0, 0, 0, labels),
                    [f"labels.{key}" for key in labels],
                )

    # naming

    def _names(self, index: Descriptor) -> list[tuple[str, Descriptor]]:
        options = self.options
        prefix = options.base_name or f"import-{time.strftime('%Y-%m-%d')}"
        translate = _ref_translator(prefix, check_prefix=bool(options.base_name))
        names: list[tuple[str, Descriptor]] = []
        if options.index_name:
            names.append((options.index_name, index))
        data = self.a.read_json_blob(self.ns, index)
        for m in children(index, data):
            name = m.annotations.get(mediatypes.ANNOTATION_IMAGE_NAME, "")
            if not name and m.annotations.get(mediatypes.ANNOTATION_REF_NAME):
                name = translate(m.annotations[mediatypes.ANNOTATION_REF_NAME])
            if name:
                names.append((name, m))
            if options.digests and not (options.skip_digest_for_named and name):
                names.append((f"{prefix}@{m.digest}", m))
        return names

    def _store_image(self, name: str, target: Descriptor) -> None:
        image = Image(
            name,
            Descriptor(target.media_type, target.digest, target.size, dict(target.annotations)),
            dict(self.options.labels),
        )
        paths = ["target", *(f"labels.{k}" for k in self.options.labels)]
        try:
            self.a.images.update(self.ns, image, paths)
        except NotFound:
            try:
                self.a.images.create(self.ns, image)
            except AlreadyExists:  # created meanwhile by someone else: ours wins, as containerd
                self.a.images.update(self.ns, image, paths)

    def _unpack(self, created: list[ImportedImage]) -> None:
        if self.a.unpacker_factory is None:
            raise FailedPrecondition("unpack requested but no unpacker is available")
        unpacker = self.a.unpacker_factory()
        for image in created:
            unpacker.unpack(
                self.ns, image.name, platform=self.options.platform or None,
                snapshotter=self.options.snapshotter or None, lease=self.lease,
            )
            self.report(Progress("unpack", ref=image.name))


def _ref_translator(prefix: str, check_prefix: bool) -> Callable[[str], str]:
    """containerd's Add/FilterRefPrefix: a bare tag becomes `prefix:tag`; a full name is
    kept (with check_prefix, only when it is under `prefix`)."""

    def translate(ref: str) -> str:
        if any(c in ref for c in "/:@"):
            if check_prefix and not _has_prefix(ref, prefix):
                return ""
            return ref
        return f"{prefix}:{ref}"

    return translate


def _has_prefix(name: str, prefix: str) -> bool:
    return name.startswith(prefix) and (len(name) == len(prefix) or name[len(prefix)] in "/:@")


# -- export ---------------------------------------------------------------------------------


@dataclass
class _DockerEntry:
    manifest: Descriptor
    names: list[str] = field(default_factory=list)


class _ExportPlan:
    def __init__(self, archives: Archives, ns: str, options: ExportOptions, lease: str):
        self.a = archives
        self.ns = ns
        self.options = options
        self.lease = lease
        self.held: set[str] = set()  # digests on the lease
        if options.all_platforms:
            self.matcher: platforms.Matcher = platforms.ALL
        elif options.platforms:
            self.matcher = platforms.Ordered(
                tuple(platforms.normalize(platforms.parse(p)) for p in options.platforms)
            )
        else:
            self.matcher = platforms.only_strict(platforms.host_default())
        self.index: list[Descriptor] = []  # index.json entries
        self.blobs: dict[str, Descriptor] = {}  # digest -> descriptor, in write order
        self.docker: dict[str, _DockerEntry] = {}

    def _hold(self, desc: Descriptor) -> None:
        """Lease the blob before anything reads it: once leased, a collection cannot take
        it; if one took it before, the read that follows says it is missing."""
        if desc.digest not in self.held:
            self.a.leases.add_resource(self.ns, self.lease, Resource(desc.digest, CONTENT))
            self.held.add(desc.digest)

    def _read(self, desc: Descriptor) -> bytes:
        self._hold(desc)
        return self.a.read_json_blob(self.ns, desc)

    def _add_tree(self, desc: Descriptor) -> None:
        for node in walk(self._read, desc, None):
            d = node.descriptor
            if self.options.skip_non_distributable and mediatypes.is_non_distributable(d.media_type):
                continue
            self._hold(d)
            self.a._present(self.ns, d)
            self.blobs.setdefault(d.digest, d)

    def add_image(self, name: str) -> None:
        image = self.a.images.get(self.ns, name)
        t = image.target
        ref_name = name
        try:
            ref_name = reference.parse_strict(name).object
        except InvalidArgument:
            pass
        annotations = {**t.annotations, mediatypes.ANNOTATION_IMAGE_NAME: name,
                       mediatypes.ANNOTATION_REF_NAME: ref_name}
        desc = Descriptor(t.media_type, t.digest, t.size, annotations)
        self.index.append(desc)
        if mediatypes.is_manifest(desc.media_type):
            self._add_tree(desc)
            self.docker.setdefault(desc.digest, _DockerEntry(desc)).names.append(name)
        elif mediatypes.is_index(desc.media_type):
            self._hold(desc)
            self.a._present(self.ns, desc)
            self.blobs.setdefault(desc.digest, desc)
            chosen = []
            for m in children(desc, self._read(desc)):
                if m.platform is not None and not self.matcher.match(m.platform):
                    continue
                self._add_tree(m)
                chosen.append(m)
            if not chosen:
                raise NotFound(f"image {name!r}: no manifest for platform {self.matcher}")
            with_platform = [m for m in chosen if m.platform is not None]
            best = (platforms.sort_best_first(self.matcher, [m.platform for m in with_platform])
                    if with_platform else [])
            pick = next((m for m in with_platform if best and m.platform == best[0]), chosen[0])
            self.docker.setdefault(pick.digest, _DockerEntry(pick)).names.append(name)
        else:
            raise InvalidArgument(
                f"image {name!r}: target {desc.media_type!r} is neither a manifest nor an index"
            )

    def _docker_files(self) -> tuple[bytes, bytes]:
        """Docker's manifest.json (config and layer paths, familiar tags) and the legacy
        `repositories` file, for the images chosen for Docker."""
        entries = []
        repositories: dict[str, dict[str, str]] = {}
        for entry in self.docker.values():
            m = parse_manifest(self._read(entry.manifest), entry.manifest.media_type)
            tags = []
            for name in entry.names:
                try:
                    ref = reference.parse(name)
                except InvalidArgument:
                    continue
                if ref.tag is None:
                    continue
                tag = reference.Reference(ref.domain, ref.path, ref.tag).familiar
                tags.append(tag)
                repo, _, version = tag.rpartition(":")
                repositories.setdefault(repo, {})[version] = m.config.digest.partition(":")[2]
            entries.append({
                "Config": _blob_name(m.config.digest),
                "RepoTags": tags or None,
                "Layers": [_blob_name(layer.digest) for layer in m.layers],
            })
        return dump_json(entries), dump_json(repositories)

    def records(self) -> Iterator[bytes]:
        if self.options.docker:
            manifest_json, repositories = self._docker_files()
            yield from _file("manifest.json", manifest_json)
            yield from _file("repositories", repositories)
        else:
            yield from _file("oci-layout", dump_json({"imageLayoutVersion": mediatypes.OCI_LAYOUT_VERSION}))
            index = {"schemaVersion": 2, "mediaType": mediatypes.OCI_INDEX,
                     "manifests": [d.to_json() for d in self.index]}
            yield from _file("index.json", dump_json(index))
        yield from _dir("blobs/")
        yield from _dir("blobs/sha256/")
        for desc in self.blobs.values():
            yield from self._blob(desc)
        if not self.options.docker and not self.options.skip_manifest_json and self.docker:
            yield from _file("manifest.json", self._docker_files()[0])
        yield b"\0" * (2 * tarfile.BLOCKSIZE)

    def _blob(self, desc: Descriptor) -> Iterator[bytes]:
        yield _header(_blob_name(desc.digest), desc.size)
        h = hashlib.sha256()
        left = desc.size
        with self.a.content.open_blob(self.ns, desc.digest) as f:
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    break
                h.update(chunk)
                left -= len(chunk)
                yield chunk
        if left or "sha256:" + h.hexdigest() != desc.digest:
            raise FailedPrecondition(f"blob {desc.digest} in the content store is corrupt")
        yield b"\0" * (-desc.size % tarfile.BLOCKSIZE)


def _blob_name(digest: str) -> str:
    algorithm, _, encoded = digest.partition(":")
    return f"blobs/{algorithm}/{encoded}"


def _header(name: str, size: int, kind: bytes = tarfile.REGTYPE, mode: int = 0o444) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mode, info.mtime = size, kind, mode, 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT)


def _file(name: str, data: bytes) -> Iterator[bytes]:
    yield _header(name, len(data), mode=0o644)
    yield data
    yield b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def _dir(name: str) -> Iterator[bytes]:
    yield _header(name, 0, tarfile.DIRTYPE, 0o755)


def _coalesce(parts: Iterator[bytes], size: int = CHUNK) -> Iterator[bytes]:
    """Join small pieces (tar headers, padding) so each chunk is about `size` bytes."""
    buf = bytearray()
    for part in parts:
        if not buf and len(part) >= size:
            yield part
            continue
        buf += part
        if len(buf) >= size:
            yield bytes(buf)
            buf.clear()
    if buf:
        yield bytes(buf)

