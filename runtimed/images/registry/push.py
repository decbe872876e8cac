"""Push: upload an image's tree from the content store to a registry.

Blobs first (configs and layers, concurrently), each skipped when a HEAD finds it,
mounted from another repository of the same registry when the blob's
`containerd.io/distribution.source.<host>` label names one, else uploaded: monolithic
(one PUT) up to `monolithic_max` bytes, chunked (PATCH with Content-Range, then PUT)
above. Manifests follow, children before parents, and the tag is written last, so a
registry never serves a manifest whose blobs are missing.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import time
from dataclasses import dataclass
from urllib.parse import urljoin

from runtimed.errors import Canceled, FailedPrecondition, InvalidArgument, NotFound, RuntimedError
from runtimed.images import mediatypes, platforms
from runtimed.images import reference as references
from runtimed.images.manifest import Descriptor, children, parse_index, walk
from runtimed.images.registry.hosts import RegistryHosts
from runtimed.images.registry.remote import (
    Progress,
    ProgressFn,
    Remote,
    TransferOptions,
    first_cause,
    remotes,
    source_key,
)
from runtimed.images.registry.transport import check

log = logging.getLogger("runtimed.registry")


@dataclass
class PushOptions(TransferOptions):
    # None: push every platform the target has; else only the best matching manifest
    platforms: platforms.Matcher | None = None
    monolithic_max: int = 32 << 20  # larger blobs go up in chunks
    chunk_size: int = 16 << 20


class Pusher:
    def __init__(self, store, hosts: RegistryHosts | None = None):
        self.store = store
        self.hosts = hosts or RegistryHosts()

    def push(
        self,
        ns: str,
        ref_text: str,
        target: Descriptor,
        options: PushOptions | None = None,
        progress: ProgressFn | None = None,
    ) -> Descriptor:
        """Push `target` (an index or manifest in the store) as `ref_text`; returns the
        descriptor the registry now serves under the reference."""
        options = options or PushOptions()
        ref = references.parse(ref_text)
        remote = remotes(self.hosts, ref, options, push=True)[-1]
        try:
            return _Push(self.store, ns, remote, options, progress or (lambda p: None)).run(target)
        finally:
            remote.close()


class _Push:
    def __init__(self, store, ns: str, remote: Remote, options: PushOptions, report: ProgressFn):
        self.store = store
        self.ns = ns
        self.remote = remote
        self.options = options
        self.report = report
        self.scopes = remote.scopes(push=True)
        self.host = remote.endpoint.host
        self.cancelled = options.cancelled

    def _read(self, desc: Descriptor) -> bytes:
        try:
            return b"".join(self.store.read_chunks(self.ns, desc.digest))
        except NotFound:
            raise FailedPrecondition(
                f"push {self.remote.ref}: {desc.media_type} {desc.digest} is not in the content "
                "store (an image pulled for one platform can only be pushed with --platform)"
            ) from None

    def run(self, target: Descriptor) -> Descriptor:
        if self.options.platforms is not None and mediatypes.is_index(target.media_type):
            target = self._pick(target)
        manifests: list[tuple[Descriptor, bytes]] = []
        blobs: dict[str, Descriptor] = {}
        for node in walk(self._read, target):
            desc = node.descriptor
            if mediatypes.is_manifest(desc.media_type) or mediatypes.is_index(desc.media_type):
                manifests.append((desc, self._read(desc)))
            elif not mediatypes.is_non_distributable(desc.media_type):
                # foreign layers live at their URLs, not in registries (as containerd skips)
                blobs.setdefault(desc.digest, desc)
        for desc in blobs.values():
            self.report(Progress(desc.digest, desc.media_type, "waiting", 0, desc.size))
        pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(self.options.concurrency, 1), thread_name_prefix="push"
        )
        try:
            futures = [pool.submit(self._push_blob, desc) for desc in blobs.values()]
            for future in futures:
                future.result()
        except BaseException as exc:
            self.cancelled.set()
            raise first_cause(futures, exc) from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        # walk() yields parents first: push in reverse so children land first
        for desc, data in reversed(manifests[1:]):
            self._put_manifest(desc, data, desc.digest)
        root, data = manifests[0]
        self._put_manifest(root, data, self.remote.ref.tag or root.digest)
        return root

    def _pick(self, index_desc: Descriptor) -> Descriptor:
        index = parse_index(
            self._read(index_desc), index_desc.media_type, f"index {index_desc.digest}"
        )
        matcher = self.options.platforms
        present = [
            m
            for m in index.manifests
            if m.platform is not None
            and matcher.match(m.platform)
            and self.store.exists(self.ns, m.digest)
        ]
        if not present:
            raise NotFound(
                f"push {self.remote.ref}: no manifest for platform {matcher} in the content store"
            )
        best = platforms.sort_best_first(matcher, [m.platform for m in present])[0]
        return next(m for m in present if m.platform == best)

    # blobs

    def _push_blob(self, desc: Descriptor) -> None:
        if self.cancelled.is_set():
            raise Canceled("push cancelled")
        self.options.check_deadline(f"push {self.remote.ref}")
        what = f"blob {desc.digest} to {self.remote.ref}"
        transport = self.remote.transport
        response = transport.request(
            "HEAD", self.remote.path("blobs", desc.digest), scopes=self.scopes, what=what
        )
        response.release_conn()
        if response.status == 200:
            self.report(Progress(desc.digest, desc.media_type, "exists", desc.size, desc.size))
            return
        location = None
        for source in self._mount_sources(desc):
            response = transport.request(
                "POST",
                f"/v2/{self.remote.repository}/blobs/uploads/?mount={desc.digest}&from={source}",
                scopes=self.scopes + (f"repository:{source}:pull",),
                what=what,
            )
            response.release_conn()
            if response.status == 201:
                self.report(Progress(desc.digest, desc.media_type, "mounted", desc.size, desc.size))
                return
            if response.status == 202:
                location = response.headers.get("Location")
                break
        if location is None:
            response = transport.request(
                "POST",
                f"/v2/{self.remote.repository}/blobs/uploads/",
                scopes=self.scopes,
                what=what,
            )
            check(response, (202,), f"start upload of {what}", self.host)
            location = response.headers.get("Location")
        if not location:
            raise RuntimedError(f"{what}: {self.host} started an upload without a Location")
        location = urljoin(transport.base_url + "/", location)
        if desc.size <= self.options.monolithic_max:
            self._upload_monolithic(desc, location, what)
        else:
            self._upload_chunked(desc, location, what)
        self.report(Progress(desc.digest, desc.media_type, "done", desc.size, desc.size))

    def _mount_sources(self, desc: Descriptor) -> list[str]:
        try:
            labels = self.store.info(self.ns, desc.digest).labels
        except NotFound:
            return []
        repos = [
            r
            for r in labels.get(source_key(self.remote.ref.domain), "").split(",")
            if r and r != self.remote.repository
        ]
        return repos[:3]

    def _upload_monolithic(self, desc: Descriptor, location: str, what: str) -> None:
        self.report(Progress(desc.digest, desc.media_type, "uploading", 0, desc.size))
        with self.store.open_blob(self.ns, desc.digest) as f:
            body = _ProgressReader(
                f,
                lambda n: self.report(
                    Progress(desc.digest, desc.media_type, "uploading", n, desc.size)
                ),
            )
            response = self.remote.transport.request(
                "PUT",
                _with_query(location, f"digest={desc.digest}"),
                scopes=self.scopes,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(desc.size),
                },
                body=body,
                what=what,
            )
        check(response, (201, 204), f"upload of {what}", self.host)

    def _upload_chunked(self, desc: Descriptor, location: str, what: str) -> None:
        transport = self.remote.transport
        offset = 0
        with self.store.open_blob(self.ns, desc.digest) as f:
            while offset < desc.size:
                self.options.check_deadline(f"push {self.remote.ref}")
                if self.cancelled.is_set():
                    raise Canceled("push cancelled")
                chunk = f.read(self.options.chunk_size)
                if not chunk:
                    raise FailedPrecondition(f"{what}: blob shorter than its {desc.size} bytes")
                end = offset + len(chunk) - 1
                response = transport.request(
                    "PATCH",
                    location,
                    scopes=self.scopes,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{end}",
                        "Content-Length": str(len(chunk)),
                    },
                    body=chunk,
                    what=what,
                )
                check(response, (202,), f"chunk {offset}-{end} of {what}", self.host)
                location = urljoin(
                    transport.base_url + "/", response.headers.get("Location") or location
                )
                offset = end + 1
                self.report(Progress(desc.digest, desc.media_type, "uploading", offset, desc.size))
        response = transport.request(
            "PUT",
            _with_query(location, f"digest={desc.digest}"),
            scopes=self.scopes,
            headers={"Content-Length": "0"},
            body=b"",
            what=what,
        )
        check(response, (201, 204), f"finish upload of {what}", self.host)

    # manifests

    def _put_manifest(self, desc: Descriptor, data: bytes, tag_or_digest: str) -> None:
        what = f"manifest {desc.digest} as {self.remote.ref.name}:{tag_or_digest}"
        if "sha256:" + hashlib.sha256(data).hexdigest() != desc.digest:
            raise FailedPrecondition(f"{what}: stored bytes do not match the digest")
        children(desc, data)  # refuses a malformed document before it reaches the registry
        response = self.remote.transport.request(
            "PUT",
            self.remote.path("manifests", tag_or_digest),
            scopes=self.scopes,
            headers={"Content-Type": desc.media_type},
            body=data,
            what=what,
        )
        check(response, (201, 200), f"push of {what}", self.host)
        served = response.headers.get("Docker-Content-Digest")
        if served and served != desc.digest:
            raise InvalidArgument(f"{what}: the registry stored it as {served}")
        self.report(Progress(desc.digest, desc.media_type, "done", desc.size, desc.size))


def _with_query(url: str, query: str) -> str:
    return url + ("&" if "?" in url else "?") + query


class _ProgressReader:
    """A file wrapper that reports bytes read (at most every 100 ms) while urllib3 sends."""

    def __init__(self, f, report):
        self._f = f
        self._report = report
        self._done = 0
        self._last = 0.0

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._done += len(data)
        now = time.monotonic()
        if now - self._last > 0.1:
            self._last = now
            self._report(self._done)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self._done = offset if whence == 0 else self._done
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()
