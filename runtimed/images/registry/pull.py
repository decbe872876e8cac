"""Pull: resolve a reference, fetch its tree into the content store, verified.

Order of work: resolve the tag to a digest (HEAD, GET when the registry omits the digest),
read the manifest or index into memory (capped, verified), select the platform(s), fetch
configs and layers concurrently, store children before parents (so a crash never leaves a
manifest whose blobs are missing), then return the target for the image record.

Each blob goes through a content-store ingest named by its digest, so a pull that died
(connection, daemon) resumes where the bytes stop: the next request asks `Range: bytes=N-`.
A blob is committed only when its size and sha256 match its descriptor; anything else
aborts the ingest and nothing becomes visible. Compressed layers are decompressed while
they stream (gzip via isal, zstd) to compute the diff ID, checked against the image config
and recorded as `containerd.io/uncompressed`. `on_layer` hands layers to the unpacker in
order, each as soon as it and all layers below it are in.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import urllib3

from runtimed.errors import (
    AlreadyExists,
    Canceled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RuntimedError,
    Unavailable,
)
from runtimed.images import mediatypes, platforms
from runtimed.images import reference as references
from runtimed.images.manifest import (
    MAX_JSON_SIZE,
    Descriptor,
    gc_labels,
    parse_config,
    parse_index,
    parse_manifest,
)
from runtimed.images.registry.hosts import RegistryHosts
from runtimed.images.registry.remote import (
    MANIFEST_ACCEPT,
    Progress,
    ProgressFn,
    Remote,
    TransferOptions,
    append_source,
    first_cause,
    remotes,
    source_key,
    wait_with_deadline,
)
from runtimed.images.registry.transport import check

log = logging.getLogger("runtimed.registry")

CHUNK = 1 << 20


@dataclass
class PullOptions(TransferOptions):
    platforms: platforms.Matcher | None = None  # None: what this host runs
    all_platforms: bool = False
    # called with (manifest descriptor, layer index, layer descriptor, diff id), in layer
    # order per manifest, as soon as a layer and every layer below it are stored
    on_layer: Callable[[Descriptor, int, Descriptor, str], None] | None = None


@dataclass
class PullResult:
    name: str  # the normalised reference
    target: Descriptor  # what the image record points at (the index or manifest)
    manifests: list[Descriptor] = field(default_factory=list)  # platform manifests fetched
    # per manifest digest: its layers with their diff IDs
    layers: dict[str, list[tuple[Descriptor, str]]] = field(default_factory=dict)


class Puller:
    def __init__(self, store, hosts: RegistryHosts | None = None):
        """`store` is the content store (runtimed.content.store.ContentStore)."""
        self.store = store
        self.hosts = hosts or RegistryHosts()

    def pull(
        self,
        ns: str,
        ref_text: str,
        options: PullOptions | None = None,
        progress: ProgressFn | None = None,
    ) -> PullResult:
        options = options or PullOptions()
        ref = references.parse(ref_text)
        report = progress or (lambda p: None)
        candidates = remotes(self.hosts, ref, options)
        errors: list[str] = []
        try:
            for remote in candidates:
                try:
                    target = self._resolve(remote)
                except RuntimedError as exc:
                    if not remote.endpoint.mirror:
                        if isinstance(exc, NotFound):
                            raise NotFound(f"image {ref} not found: {exc}") from None
                        raise
                    errors.append(f"mirror {remote.endpoint.host}: {exc}")
                    log.info("%s: mirror %s failed: %s", ref, remote.endpoint.host, exc)
                    continue
                return _Pull(self.store, ns, remote, options, report).run(target)
            raise NotFound(f"image {ref} not found ({'; '.join(errors)})")
        finally:
            for remote in candidates:
                remote.close()

    def _resolve(self, remote: Remote) -> Descriptor:
        """The descriptor the reference names (a tag resolves to a digest)."""
        ref = remote.ref
        what = f"manifest {ref}"
        headers = {"Accept": MANIFEST_ACCEPT}
        scopes = remote.scopes()
        response = remote.transport.request(
            "HEAD", remote.path("manifests", ref.object), scopes=scopes, headers=headers, what=what
        )
        response.release_conn()
        if response.status == 404:
            raise NotFound(f"the registry {remote.endpoint.host} has no manifest {ref.object!r}")
        if response.status in (200,):
            media_type = _content_type(response)
            digest = ref.digest or response.headers.get("Docker-Content-Digest", "")
            size = response.headers.get("Content-Length")
            if (
                digest
                and size is not None
                and media_type
                and (mediatypes.is_index(media_type) or mediatypes.is_manifest(media_type))
            ):
                return Descriptor(media_type, references.validate_digest(digest), int(size))
        # some registries answer HEAD poorly: GET the manifest and hash it ourselves
        response = remote.transport.request(
            "GET",
            remote.path("manifests", ref.object),
            scopes=scopes,
            headers=headers,
            stream=True,
            what=what,
        )
        check(response, (200,), what, remote.endpoint.host)
        try:
            data = _read_capped(response, MAX_JSON_SIZE, what)
        finally:
            response.release_conn()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if ref.digest and ref.digest != digest:
            raise FailedPrecondition(f"{what}: content has digest {digest}, not {ref.digest}")
        media_type = _content_type(response) or _sniff_media_type(data)
        return Descriptor(media_type, digest, len(data))


class _Pull:
    """One pull's state: the tree walk, the worker pool, progress."""

    def __init__(self, store, ns: str, remote: Remote, options: PullOptions, report: ProgressFn):
        self.store = store
        self.ns = ns
        self.remote = remote
        self.options = options
        self.report = report
        self.matcher = options.platforms or platforms.default()
        self.source_key = source_key(remote.ref.domain)
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(options.concurrency, 1), thread_name_prefix="pull"
        )
        self.cancelled = options.cancelled

    def run(self, target: Descriptor) -> PullResult:
        result = PullResult(str(self.remote.ref), target)
        try:
            self._fetch_tree(target, result)
        except BaseException:
            self.cancelled.set()
            raise
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
        return result

    # the tree

    def _fetch_tree(self, desc: Descriptor, result: PullResult) -> None:
        data = self._fetch_json(desc)
        if mediatypes.is_index(desc.media_type):
            index = parse_index(data, desc.media_type, f"index {desc.digest}")
            chosen = self._select(index.manifests)
            for child in chosen:
                self._fetch_tree(child, result)
            self._store_json(desc, data, gc_labels(chosen))
        elif mediatypes.is_manifest(desc.media_type):
            manifest = parse_manifest(data, desc.media_type, f"manifest {desc.digest}")
            self._fetch_image(desc, manifest, result)
            self._store_json(desc, data, gc_labels([manifest.config, *manifest.layers]))
            result.manifests.append(desc)
        else:
            raise InvalidArgument(
                f"{self.remote.ref}: {desc.digest} has media type {desc.media_type!r}, "
                "neither a manifest nor an index"
            )

    def _select(self, manifests: list[Descriptor]) -> list[Descriptor]:
        if self.options.all_platforms:
            return manifests
        candidates = [m for m in manifests if m.platform is None or self.matcher.match(m.platform)]
        with_platform = [m for m in candidates if m.platform is not None]
        if with_platform:
            best = platforms.sort_best_first(self.matcher, [m.platform for m in with_platform])[0]
            return [next(m for m in with_platform if m.platform == best)]
        if candidates:
            return candidates[:1]
        available = ", ".join(
            sorted({platforms.format(m.platform) for m in manifests if m.platform})
        )
        raise NotFound(
            f"image {self.remote.ref}: no manifest for platform {self.matcher} "
            f"(the index offers {available or 'none'})"
        )

    def _fetch_image(self, manifest_desc: Descriptor, manifest, result: PullResult) -> None:
        config_data = self._fetch_json(manifest.config)
        config = parse_config(config_data, f"config {manifest.config.digest}")
        diff_ids = ((config.get("rootfs") or {}).get("diff_ids")) or []
        if diff_ids and len(diff_ids) != len(manifest.layers):
            raise InvalidArgument(
                f"image {self.remote.ref}: config lists {len(diff_ids)} diff ids for "
                f"{len(manifest.layers)} layers"
            )
        for layer in manifest.layers:
            self.report(Progress(layer.digest, layer.media_type, "waiting", 0, layer.size))
        futures = [
            self.pool.submit(self._fetch_layer, layer, diff_ids[i] if diff_ids else "")
            for i, layer in enumerate(manifest.layers)
        ]
        layers: list[tuple[Descriptor, str]] = []
        try:
            for i, future in enumerate(futures):
                diff_id = future.result()
                layers.append((manifest.layers[i], diff_id))
                if self.options.on_layer is not None:
                    layer = manifest.layers[i]
                    self.report(
                        Progress(
                            layer.digest, layer.media_type, "unpacking", layer.size, layer.size
                        )
                    )
                    self.options.on_layer(manifest_desc, i, layer, diff_id)
                    self.report(
                        Progress(layer.digest, layer.media_type, "unpacked", layer.size, layer.size)
                    )
        except BaseException as exc:
            self.cancelled.set()
            for future in futures:
                future.cancel()
            raise first_cause(futures, exc) from None
        self._store_json(manifest.config, config_data, {})
        result.layers[manifest_desc.digest] = layers

    # blobs

    def _labels(self, desc: Descriptor, extra: dict[str, str]) -> dict[str, str]:
        try:
            current = self.store.info(self.ns, desc.digest).labels.get(self.source_key)
        except NotFound:
            current = None
        return {**extra, self.source_key: append_source(current, self.remote.repository)}

    def _fetch_json(self, desc: Descriptor) -> bytes:
        """A manifest, index or config: from the store when present, else the registry."""
        if desc.size > MAX_JSON_SIZE:
            raise InvalidArgument(
                f"{desc.media_type} {desc.digest}: {desc.size} bytes exceeds the "
                f"{MAX_JSON_SIZE} byte limit for JSON documents"
            )
        if self.store.exists(self.ns, desc.digest):
            return b"".join(self.store.read_chunks(self.ns, desc.digest))
        kind = (
            "manifests"
            if (mediatypes.is_manifest(desc.media_type) or mediatypes.is_index(desc.media_type))
            else "blobs"
        )
        what = f"{desc.media_type or 'blob'} {desc.digest} of {self.remote.ref}"
        self.options.check_deadline(f"pull {self.remote.ref}")
        headers = {"Accept": desc.media_type or MANIFEST_ACCEPT} if kind == "manifests" else {}
        response = self.remote.transport.request(
            "GET",
            self.remote.path(kind, desc.digest),
            scopes=self.remote.scopes(),
            headers=headers,
            stream=True,
            what=what,
        )
        check(response, (200,), what, self.remote.endpoint.host)
        try:
            data = _read_capped(response, desc.size, what)
        finally:
            response.release_conn()
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if len(data) != desc.size or actual != desc.digest:
            raise FailedPrecondition(
                f"{what}: the registry sent {len(data)} bytes with digest {actual}, expected "
                f"{desc.size} bytes with digest {desc.digest}; refused, nothing stored"
            )
        return data

    def _store_json(self, desc: Descriptor, data: bytes, extra: dict[str, str]) -> None:
        self.store.write_blob(
            self.ns,
            data,
            expected_digest=desc.digest,
            expected_size=desc.size,
            labels=self._labels(desc, extra),
            lease=self.options.lease,
        )
        self.report(Progress(desc.digest, desc.media_type, "done", desc.size, desc.size))

    def _fetch_layer(self, desc: Descriptor, diff_id: str) -> str:
        """Stream one layer into the store; returns its diff ID."""
        if self.cancelled.is_set():
            raise Canceled("pull cancelled")
        compression = mediatypes.layer_compression(desc.media_type)
        if self.store.exists(self.ns, desc.digest):
            info = self.store.info(self.ns, desc.digest)
            known = info.labels.get(mediatypes.LABEL_UNCOMPRESSED, "") or (
                desc.digest if compression == "" else ""
            )
            self.store.write_blob(
                self.ns,
                b"",
                expected_digest=desc.digest,
                expected_size=desc.size,
                labels=self._labels(desc, {}),
                lease=self.options.lease,
            )
            self.report(Progress(desc.digest, desc.media_type, "exists", desc.size, desc.size))
            return known or diff_id
        writer = self._open_writer(desc)
        if writer is None:  # another pull committed it meanwhile
            self.report(Progress(desc.digest, desc.media_type, "exists", desc.size, desc.size))
            return self.store.info(self.ns, desc.digest).labels.get(
                mediatypes.LABEL_UNCOMPRESSED, diff_id
            )
        if writer.shared:  # verified and stored in another namespace: nothing to download
            labels = {mediatypes.LABEL_UNCOMPRESSED: diff_id} if diff_id else {}
            try:
                writer.commit(desc.size, desc.digest, self._labels(desc, labels))
            except AlreadyExists:
                pass
            self.report(Progress(desc.digest, desc.media_type, "exists", desc.size, desc.size))
            return diff_id
        try:
            hasher = _DiffHasher(compression)
            if writer.offset > desc.size:
                writer.truncate(0)
            if writer.offset:
                with open(writer.path / "data", "rb") as f:
                    remaining = writer.offset
                    while remaining and (chunk := f.read(min(CHUNK, remaining))):
                        hasher.update(chunk)
                        remaining -= len(chunk)
            self._download(desc, writer, hasher)
            actual_diff = hasher.digest()
            if diff_id and actual_diff and actual_diff != diff_id:
                raise FailedPrecondition(
                    f"layer {desc.digest} of {self.remote.ref}: uncompressed content has digest "
                    f"{actual_diff}, but the image config lists {diff_id}; refused"
                )
            labels = {mediatypes.LABEL_UNCOMPRESSED: actual_diff} if actual_diff else {}
            try:
                writer.commit(desc.size, desc.digest, self._labels(desc, labels))
            except AlreadyExists:
                pass
            except FailedPrecondition as exc:
                raise FailedPrecondition(
                    f"layer {desc.digest} from {self.remote.endpoint.host} failed verification "
                    f"({exc}); refused, nothing stored"
                ) from None
        except (FailedPrecondition, InvalidArgument):
            self._abort(writer)  # bad bytes: never resume from them
            raise
        except BaseException:
            writer.close()  # keep the ingest: a later pull resumes it
            raise
        self.report(Progress(desc.digest, desc.media_type, "done", desc.size, desc.size))
        return actual_diff or diff_id

    def _open_writer(self, desc: Descriptor):
        ref = f"pull-{desc.digest}"
        while True:
            try:
                return self.store.writer(
                    self.ns, ref, total=desc.size, expected=desc.digest, lease=self.options.lease
                )
            except AlreadyExists:
                return None
            except Unavailable:  # another pull is writing this blob: wait for it
                if self.cancelled.is_set():
                    raise Canceled("pull cancelled") from None
                wait_with_deadline(self.options, f"pull {self.remote.ref}", 0.2)

    def _abort(self, writer) -> None:
        writer.close()
        try:
            self.store.abort(self.ns, writer.ref, self.options.lease)
        except NotFound:
            pass

    def _download(self, desc: Descriptor, writer, hasher: _DiffHasher) -> None:
        what = f"layer {desc.digest} of {self.remote.ref}"
        host = self.remote.endpoint.host
        failures = 0
        while writer.offset < desc.size or desc.size == 0:
            self.options.check_deadline(f"pull {self.remote.ref}")
            if self.cancelled.is_set():
                raise Canceled("pull cancelled")
            start = writer.offset
            headers = {"Range": f"bytes={start}-"} if start else {}
            self.report(Progress(desc.digest, desc.media_type, "downloading", start, desc.size))
            response = self.remote.transport.request(
                "GET",
                self.remote.path("blobs", desc.digest),
                scopes=self.remote.scopes(),
                headers=headers,
                stream=True,
                what=what,
            )
            if start and response.status == 416:
                response.release_conn()
                writer.truncate(0)
                hasher.reset()
                continue
            check(response, (200, 206), what, host)
            interrupt = response.shutdown
            self.cancelled.register(interrupt)
            try:
                if start and response.status == 200:  # Range ignored: start over
                    writer.truncate(0)
                    hasher.reset()
                elif start:
                    _check_content_range(response, start, what)
                last_report = 0.0  # the first bytes are reported at once
                while chunk := response.read1(CHUNK):  # what arrived: a stall loses nothing
                    if writer.offset + len(chunk) > desc.size:
                        raise FailedPrecondition(
                            f"{what}: the registry sent more than the {desc.size} bytes the "
                            "manifest declares; refused, nothing stored"
                        )
                    writer.write(chunk)
                    hasher.update(chunk)
                    now = time.monotonic()
                    if now - last_report > 0.1:
                        last_report = now
                        self.report(
                            Progress(
                                desc.digest,
                                desc.media_type,
                                "downloading",
                                writer.offset,
                                desc.size,
                            )
                        )
                    if self.cancelled.is_set():
                        raise Canceled("pull cancelled")
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                failures += 1
                if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
                    if failures > self.options.resume_attempts:
                        raise DeadlineExceeded(
                            f"{what}: no data for {self.options.progress_timeout:g}s"
                        ) from None
                if failures > self.options.resume_attempts:
                    raise Unavailable(
                        f"{what}: connection to {host} broke {failures} times, last at byte "
                        f"{writer.offset} of {desc.size}: {exc}"
                    ) from None
                log.info(
                    "%s: connection broke at %d/%d bytes (%s); resuming",
                    what,
                    writer.offset,
                    desc.size,
                    exc,
                )
                continue
            finally:
                self.cancelled.unregister(interrupt)
                response.release_conn()
            if desc.size == 0:
                break
            if writer.offset < desc.size:
                failures += 1
                if failures > self.options.resume_attempts:
                    raise Unavailable(
                        f"{what}: {host} ended the body at byte {writer.offset} of {desc.size}"
                    )
                log.info("%s: body ended at %d/%d bytes; resuming", what, writer.offset, desc.size)


class _DiffHasher:
    """sha256 of the uncompressed stream, fed with compressed chunks as they arrive."""

    def __init__(self, compression: str | None):
        self.compression = compression
        self.reset()

    def reset(self) -> None:
        self._hash = hashlib.sha256()
        self._failed = self.compression is None
        if self.compression == "gzip":
            try:
                from isal import isal_zlib as zlib
            except ImportError:  # pragma: no cover - isal is a dependency
                import zlib
            self._decompressor = zlib.decompressobj(wbits=47)  # gzip or zlib, auto
        elif self.compression == "zstd":
            import zstandard

            self._decompressor = zstandard.ZstdDecompressor().decompressobj()
        else:
            self._decompressor = None

    def update(self, chunk: bytes) -> None:
        if self._failed:
            return
        if self._decompressor is None:
            self._hash.update(chunk)
            return
        try:
            self._hash.update(self._decompressor.decompress(chunk))
            # concatenated gzip members: continue with a fresh decompressor
            while (
                self.compression == "gzip"
                and self._decompressor.eof
                and self._decompressor.unused_data
            ):
                rest = self._decompressor.unused_data
                self.reset_stream()
                self._hash.update(self._decompressor.decompress(rest))
        except Exception as exc:  # noqa: BLE001 - an undecodable layer just gets no label
            log.debug("cannot decompress layer stream: %s", exc)
            self._failed = True

    def reset_stream(self) -> None:
        saved = self._hash
        self.reset()
        self._hash = saved

    def digest(self) -> str:
        if self._failed:
            return ""
        return "sha256:" + self._hash.hexdigest()


def _content_type(response) -> str:
    return (response.headers.get("Content-Type") or "").split(";", 1)[0].strip()


def _sniff_media_type(data: bytes) -> str:
    from runtimed.images.manifest import load_json

    doc = load_json(data, "manifest")
    if isinstance(doc.get("mediaType"), str) and doc["mediaType"]:
        return doc["mediaType"]
    return mediatypes.OCI_INDEX if "manifests" in doc else mediatypes.OCI_MANIFEST


def _read_capped(response, limit: int, what: str) -> bytes:
    parts = []
    total = 0
    for chunk in response.stream(CHUNK, decode_content=False):
        total += len(chunk)
        if total > limit:
            raise FailedPrecondition(f"{what}: the registry sent more than {limit} bytes; refused")
        parts.append(chunk)
    return b"".join(parts)


def _check_content_range(response, start: int, what: str) -> None:
    value = response.headers.get("Content-Range", "")
    if value and not value.startswith(f"bytes {start}-"):
        raise Unavailable(f"{what}: asked for bytes from {start}, the registry sent {value!r}")
