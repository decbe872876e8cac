"""Images: list, inspect, tag, remove, import/export, pull/push, unpack.

The image's runtime config, layers and files are read through the Content service, so the
library works against a daemon on another machine too; unpacking into a snapshot chain is
done by the daemon on import and pull, and by `ImagesAPI.unpack` (Diff.Apply per layer,
as containerd's client does) when an image arrived another way.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ctl.client.types import Descriptor, Image
from runtimed.errors import AlreadyExists, InvalidArgument, NotFound
from runtimed.images import mediatypes
from runtimed.images import reference as references
from runtimed.oci.spec import ImageConfig

if TYPE_CHECKING:
    from runtimed.images import platforms


def normalize(name: str) -> str:
    """`busybox` → `docker.io/library/busybox:latest`; digests and other hosts kept."""
    return references.normalize(name)


def familiar(name: str) -> str:
    """The short form people type: `busybox:latest`."""
    try:
        return references.parse(name).familiar
    except InvalidArgument:
        return name


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI chain IDs: the first layer's diff ID, then sha256(parent + " " + diff ID)."""
    out: list[str] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            import hashlib  # here: loading OpenSSL costs ~2 ms, and a one-layer image needs none

            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {diff_id}".encode()).hexdigest())
    return out


@dataclass
class ResolvedImage:
    """An image resolved for one platform: its manifest, config and layers."""

    image: Image
    manifest_descriptor: Descriptor
    manifest: dict
    config_descriptor: Descriptor
    config: dict
    layers: list[Descriptor] = field(default_factory=list)

    @property
    def diff_ids(self) -> list[str]:
        return list((self.config.get("rootfs") or {}).get("diff_ids") or [])

    @property
    def chain_id(self) -> str:
        ids = chain_ids(self.diff_ids)
        if not ids:
            raise InvalidArgument(f"image {self.image.name} has no layers")
        return ids[-1]

    @property
    def runtime_config(self) -> ImageConfig:
        return ImageConfig.from_blob(self.config)

    @property
    def size(self) -> int:
        """Bytes of content: the manifest, the config and the (compressed) layers."""
        return self.manifest_descriptor.size + self.config_descriptor.size + sum(
            layer.size for layer in self.layers
        )


#: How many small JSON blobs (indexes, manifests, configs) a client keeps, and how big each
#: may be: enough for the images a program runs again and again.
JSON_MEMO_ENTRIES = 64
JSON_MEMO_MAX_BYTES = 1 << 20


class ImagesAPI:
    def __init__(self, client):
        self._client = client
        self._json_blobs: dict[tuple[str, str], bytes] = {}  # (namespace, digest) → bytes

    @property
    def _images(self):
        return self._client._stub("images")

    @property
    def _content(self):
        return self._client._stub("content")

    def list(self, filters: list[str] | None = None) -> list[Image]:
        pb = self._images.pb
        response = self._images.List(pb.ListImagesRequest(filters=filters or []))
        return [Image.from_pb(i) for i in response.images]

    def get(self, name: str) -> Image:
        """The image by reference (`busybox` works) or by a unique digest prefix."""
        pb = self._images.pb
        full = name
        try:
            full = normalize(name)
        except InvalidArgument:
            pass
        try:
            return Image.from_pb(self._images.Get(pb.GetImageRequest(name=full)).image)
        except NotFound:
            if full != name:
                try:
                    return Image.from_pb(self._images.Get(pb.GetImageRequest(name=name)).image)
                except NotFound:
                    pass
        match = self._by_digest_prefix(name)
        if match is None:
            raise NotFound(f"no such image: {name}")
        return match

    def _by_digest_prefix(self, prefix: str) -> Image | None:
        hexpart = prefix.removeprefix("sha256:")
        if len(hexpart) < 4 or any(c not in "0123456789abcdef" for c in hexpart):
            return None
        found = [
            i for i in self.list()
            if i.target.digest.removeprefix("sha256:").startswith(hexpart)
            or self._config_digest(i).removeprefix("sha256:").startswith(hexpart)
        ]
        return found[0] if found else None

    def _config_digest(self, image: Image) -> str:
        try:
            return self.resolve(image).config_descriptor.digest
        except (NotFound, InvalidArgument):
            return ""

    def tag(self, source: str, target: str) -> Image:
        """Another name for the same content (`docker tag`)."""
        pb = self._images.pb
        image = self.get(source)
        new = pb.Image(name=normalize(target), labels=image.labels)
        new.target.media_type = image.target.media_type
        new.target.digest = image.target.digest
        new.target.size = image.target.size
        new.target.annotations.update(image.target.annotations)
        try:
            created = self._images.Create(pb.CreateImageRequest(image=new)).image
        except AlreadyExists:
            created = self._images.Update(pb.UpdateImageRequest(image=new)).image
        return Image.from_pb(created)

    def remove(self, name: str, sync: bool = False) -> Image:
        image = self.get(name)
        pb = self._images.pb
        self._images.Delete(pb.DeleteImageRequest(name=image.name, sync=sync))
        return image

    # content -------------------------------------------------------------------------

    def read_blob(self, digest: str, offset: int = 0, size: int = 0) -> bytes:
        pb = self._content.pb
        chunks = self._content.Read(pb.ReadContentRequest(digest=digest, offset=offset, size=size))
        return b"".join(c.data for c in chunks)

    def stream_blob(self, digest: str) -> Iterator[bytes]:
        pb = self._content.pb
        for chunk in self._content.Read(pb.ReadContentRequest(digest=digest)):
            yield chunk.data

    def read_json(self, digest: str) -> dict:
        """A JSON blob (index, manifest, config), parsed. A blob is named by its digest, so
        its bytes never change: the client keeps the last few it read, and creating
        container after container from one image reads them once (two Content.Read round
        trips per create otherwise). The bytes are kept, not the dict: each caller gets
        its own to change."""
        key = (self._client.namespace, digest)
        data = self._json_blobs.get(key)
        if data is None:
            data = self.read_blob(digest)
            if len(data) <= JSON_MEMO_MAX_BYTES:
                if len(self._json_blobs) >= JSON_MEMO_ENTRIES:  # the oldest goes
                    self._json_blobs.pop(next(iter(self._json_blobs), None), None)
                self._json_blobs[key] = data
        try:
            return json.loads(data)
        except ValueError as exc:
            raise InvalidArgument(f"blob {digest} is not valid JSON: {exc}") from None

    def resolve(self, image: Image | str, platform: str | None = None) -> ResolvedImage:
        """Walk index → manifest for `platform` (default: this host) → config."""
        if isinstance(image, str):
            image = self.get(image)
        # an image that is one manifest (not an index) needs no platform matching
        matcher = _matcher(platform) if platform else None
        desc = image.target
        for _ in range(8):
            if mediatypes.is_index(desc.media_type):
                from runtimed.images import platforms

                if matcher is None:
                    matcher = platforms.default()
                index = self.read_json(desc.digest)
                candidates = []
                for m in index.get("manifests") or []:
                    plat = _platform_of(m)
                    if plat is None or matcher.match(plat):
                        candidates.append(m)
                if not candidates:
                    raise NotFound(f"image {image.name} has no manifest for platform {matcher}")
                known = [p for p in map(_platform_of, candidates) if p is not None]
                if known:
                    best = platforms.sort_best_first(matcher, known)[0]
                    candidates.sort(key=lambda m: _platform_of(m) != best)
                m = candidates[0]
                desc = Descriptor(m["mediaType"], m["digest"], m["size"], m.get("annotations") or {})
                continue
            if mediatypes.is_manifest(desc.media_type):
                manifest = self.read_json(desc.digest)
                cfg = manifest["config"]
                config_desc = Descriptor(cfg["mediaType"], cfg["digest"], cfg["size"])
                layers = [
                    Descriptor(lay["mediaType"], lay["digest"], lay["size"], lay.get("annotations") or {})
                    for lay in manifest.get("layers") or []
                ]
                return ResolvedImage(
                    image, desc, manifest, config_desc, self.read_json(config_desc.digest), layers
                )
            raise InvalidArgument(f"image {image.name}: unsupported media type {desc.media_type}")
        raise InvalidArgument(f"image {image.name}: index nesting too deep")

    def config(self, name: str, platform: str | None = None) -> ImageConfig:
        return self.resolve(name, platform).runtime_config

    def read_file(self, resolved: ResolvedImage, path: str) -> bytes | None:
        """A regular file of the image's root filesystem, searched from the top layer down."""
        member = path.lstrip("/")
        parent, _, base = member.rpartition("/")
        whiteout = (f"{parent}/" if parent else "") + ".wh." + base
        for layer in reversed(resolved.layers):
            compression = mediatypes.layer_compression(layer.media_type)
            if compression is None:
                continue
            raw = _ChunkReader(self.stream_blob(layer.digest))
            stream: io.RawIOBase = raw
            if compression == "zstd":
                import zstandard

                stream = zstandard.ZstdDecompressor().stream_reader(raw)
            mode = "r|gz" if compression == "gzip" else "r|"
            import tarfile

            with tarfile.open(fileobj=stream, mode=mode) as tar:
                for entry in tar:
                    name = entry.name.removeprefix("./").rstrip("/")
                    if name == whiteout:
                        return None
                    if name == member and entry.isfile():
                        f = tar.extractfile(entry)
                        return f.read() if f else None
        return None

    # unpack --------------------------------------------------------------------------

    def is_unpacked(self, resolved: ResolvedImage, snapshotter: str) -> bool:
        snaps = self._client._stub("snapshots")
        try:
            snaps.Stat(snaps.pb.StatSnapshotRequest(snapshotter=snapshotter, key=resolved.chain_id))
            return True
        except NotFound:
            return False

    def unpack(self, resolved: ResolvedImage, snapshotter: str = "overlayfs") -> str:
        """Ensure the committed snapshot chain of the image exists; returns its chain ID."""
        snaps = self._client._stub("snapshots")
        diff = self._client._stub("diff")
        if len(resolved.layers) != len(resolved.diff_ids):
            raise InvalidArgument(
                f"image {resolved.image.name}: {len(resolved.layers)} layers but "
                f"{len(resolved.diff_ids)} diff IDs in its config"
            )
        ids = chain_ids(resolved.diff_ids)
        with self._client.lease():
            parent = ""
            for layer, chain in zip(resolved.layers, ids, strict=True):
                try:
                    snaps.Stat(snaps.pb.StatSnapshotRequest(snapshotter=snapshotter, key=chain))
                    parent = chain
                    continue
                except NotFound:
                    pass
                key = f"extract-{os.urandom(6).hex()} {chain}"
                prepared = snaps.Prepare(
                    snaps.pb.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent)
                )
                try:
                    request = diff.pb.ApplyRequest(mounts=prepared.mounts)
                    request.diff.media_type = layer.media_type
                    request.diff.digest = layer.digest
                    request.diff.size = layer.size
                    diff.Apply(request)
                    try:
                        snaps.Commit(snaps.pb.CommitSnapshotRequest(snapshotter=snapshotter, name=chain, key=key))
                    except AlreadyExists:
                        pass
                finally:
                    try:
                        snaps.Remove(snaps.pb.RemoveSnapshotRequest(snapshotter=snapshotter, key=key))
                    except NotFound:
                        pass
                parent = chain
            label = f"containerd.io/gc.ref.snapshot.{snapshotter}"
            content = self._content
            info = content.pb.Info(digest=resolved.config_descriptor.digest)
            info.labels[label] = ids[-1]
            request = content.pb.UpdateRequest(info=info)
            request.update_mask.paths.append(f"labels.{label}")
            content.Update(request)
        return ids[-1]

    # archives and registries (runtimed extension services) -----------------------------

    def import_archive(
        self, source, *, name: str | None = None, progress: Callable[[int, int], None] | None = None,
        snapshotter: str = "overlayfs", platform: str | None = None, all_platforms: bool = False,
    ) -> list[Image]:
        """Load an OCI layout or docker-archive tar (a path or a binary file object)."""
        from ctl.client import archives

        return archives.import_archive(
            self._client, source, name=name, progress=progress, snapshotter=snapshotter,
            platform=platform, all_platforms=all_platforms,
        )

    def export(
        self, names: list[str], destination, *, progress: Callable[[int, int], None] | None = None,
        platform: str | None = None, all_platforms: bool = False,
    ) -> int:
        """Write the images as one OCI layout tar (docker-archive compatible manifest.json);
        returns the bytes written."""
        from ctl.client import archives

        return archives.export(
            self._client, [self.get(n).name for n in names], destination, progress=progress,
            platform=platform, all_platforms=all_platforms,
        )

    def pull(self, name: str, **kwargs) -> Image:
        from ctl.client import registry

        return registry.pull(self._client, normalize(name), **kwargs)

    def push(self, name: str, **kwargs) -> None:
        from ctl.client import registry

        registry.push(self._client, self.get(name).name, **kwargs)


class _ChunkReader(io.RawIOBase):
    """A file object over an iterator of byte chunks (a Content.Read stream)."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = chunks
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buffer:
            try:
                self._buffer = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buffer))
        b[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


def _matcher(platform: str) -> platforms.Matcher:
    from runtimed.images import platforms

    return platforms.only(platforms.parse(platform))


def _platform_of(entry: dict) -> platforms.Platform | None:
    from runtimed.images import platforms

    plat = entry.get("platform")
    return platforms.Platform.from_json(plat) if plat else None
