"""Unpack an image: its layers applied in order into committed snapshots named by chain ID.

What containerd clients look for afterwards, and so what this writes:

- each committed snapshot is named by the layer's chain ID (identity of the stack of
  diff IDs below and including it) and labelled `containerd.io/snapshot.ref`, so a second
  unpack, or `ctr run`'s "is it unpacked?" check (Stat of the top chain ID), finds it;
- each layer blob gets `containerd.io/uncompressed` = its diff ID;
- the config blob gets `containerd.io/gc.ref.snapshot.<snapshotter>` = the top chain ID,
  which keeps the whole chain alive for as long as the image is.

Existing snapshots are reused. The work runs under a lease (the caller's, or a temporary
one), so a garbage collection in the middle cannot take half-built chains away.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from datetime import UTC

from runtimed.diff.differ import UNCOMPRESSED_LABEL
from runtimed.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from runtimed.images import mediatypes, platforms
from runtimed.images.manifest import Descriptor, parse_config, parse_index, parse_manifest
from runtimed.snapshots import DEFAULT
from runtimed.snapshots.base import SNAPSHOT_REF_LABEL

log = logging.getLogger("runtimed.images.unpack")

GC_SNAPSHOT_LABEL = "containerd.io/gc.ref.snapshot."
MAX_BLOB_JSON = 8 << 20


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI chain IDs: ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    out: list[str] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            text = f"{out[-1]} {diff_id}".encode()
            out.append("sha256:" + hashlib.sha256(text).hexdigest())
    return out


@dataclass
class UnpackResult:
    chain_id: str  # the top snapshot: what a container's rootfs is prepared on
    layers: int
    applied: int  # layers that had to be extracted (the others existed already)


class Unpacker:
    def __init__(self, content, images, snapshotters: dict, differ, leases=None):
        self.content = content
        self.images = images
        self.snapshotters = snapshotters
        self.differ = differ
        self.leases = leases

    def unpack(self, ns: str, image, snapshotter: str | None = None,
               platform: str | None = None, lease: str | None = None) -> UnpackResult:
        """Unpack image `image` (a name or an image record) for `platform` (default:
        this host) into `snapshotter` (default overlayfs)."""
        name = snapshotter or DEFAULT
        sn = self.snapshotters.get(name)
        if sn is None:
            raise NotFound(f"snapshotter {name!r} is not available "
                           f"(have: {', '.join(sorted(self.snapshotters)) or 'none'})")
        record = self.images.get(ns, image) if isinstance(image, str) else image
        target = record.target
        manifest = self._manifest(ns, Descriptor(target.media_type, target.digest, target.size),
                                  platform)
        config = parse_config(self._read(ns, manifest.config), f"config {manifest.config.digest}")
        diff_ids = list((config.get("rootfs") or {}).get("diff_ids") or [])
        if len(diff_ids) != len(manifest.layers):
            raise InvalidArgument(
                f"image {record.name!r}: config lists {len(diff_ids)} diff IDs for "
                f"{len(manifest.layers)} layers"
            )
        chain = chain_ids(diff_ids)
        own_lease = None
        if lease is None and self.leases is not None:
            own_lease = self.leases.create(ns, labels={"containerd.io/gc.expire": _expiry()}).id
            lease = own_lease
        try:
            applied = 0
            for i, layer in enumerate(manifest.layers):
                if is_committed(sn, ns, chain[i]):
                    continue
                apply_layer(self.content, self.differ, sn, ns, layer, diff_ids[i], chain[i],
                            chain[i - 1] if i else "", lease)
                applied += 1
            for layer, diff_id in zip(manifest.layers, diff_ids, strict=True):
                self._label(ns, layer.digest, {UNCOMPRESSED_LABEL: diff_id})
            if chain:
                self._label(ns, manifest.config.digest, {GC_SNAPSHOT_LABEL + name: chain[-1]})
        finally:
            if own_lease is not None:
                self.leases.delete(ns, own_lease)
        return UnpackResult(chain[-1] if chain else "", len(chain), applied)

    # -- steps --------------------------------------------------------------------------

    def _label(self, ns: str, digest: str, labels: dict[str, str]) -> None:
        info = self.content.info(ns, digest)
        if all(info.labels.get(k) == v for k, v in labels.items()):
            return
        info.labels = {**info.labels, **labels}
        self.content.update(ns, info, [f"labels.{k}" for k in labels])

    def _read(self, ns: str, desc: Descriptor) -> bytes:
        if desc.size > MAX_BLOB_JSON:
            raise InvalidArgument(f"{desc.media_type} {desc.digest} is {desc.size} bytes: too large")
        with self.content.open_blob(ns, desc.digest) as f:
            return f.read()

    def _manifest(self, ns: str, desc: Descriptor, platform: str | None):
        matcher = platforms.only(platforms.parse(platform)) if platform else platforms.default()
        for _ in range(4):  # an index may point to an index
            if mediatypes.is_manifest(desc.media_type):
                return parse_manifest(self._read(ns, desc), desc.media_type)
            if not mediatypes.is_index(desc.media_type):
                raise InvalidArgument(f"cannot unpack {desc.media_type or 'a blob'} {desc.digest}: "
                                      "not a manifest or an index")
            index = parse_index(self._read(ns, desc), desc.media_type)
            candidates = [m for m in index.manifests
                          if m.platform is None or matcher.match(m.platform)]
            if not candidates:
                raise NotFound(f"no manifest for platform {matcher} in index {desc.digest}")
            with_platform = [m for m in candidates if m.platform is not None]
            if with_platform:
                best = platforms.sort_best_first(matcher, [m.platform for m in with_platform])[0]
                desc = next(m for m in with_platform if m.platform == best)
            else:
                desc = candidates[0]
        raise FailedPrecondition(f"indexes nested too deeply under {desc.digest}")


def is_committed(sn, ns: str, chain_id: str) -> bool:
    try:
        return sn.stat(ns, chain_id).kind.name == "COMMITTED"
    except NotFound:
        return False


def apply_layer(content, differ, sn, ns: str, layer: Descriptor, diff_id: str, chain_id: str,
                parent: str, lease: str | None) -> None:
    """Apply one layer blob on `parent` and commit it as the snapshot named `chain_id`,
    labelled as containerd names unpacked layers. Used by unpack and by pull, which
    applies layer N as soon as it and the layers below it are in."""
    key = f"extract-{os.urandom(6).hex()} {chain_id}"
    labels = {SNAPSHOT_REF_LABEL: chain_id}
    mounts = sn.prepare(ns, key, parent, labels=labels, lease=lease)
    try:
        with content.open_blob(ns, layer.digest) as blob:
            result = differ.apply_stream(blob, mounts, layer.media_type)
        if result.digest != diff_id:
            raise InvalidArgument(
                f"layer {layer.digest}: extracted content has diff ID {result.digest}, "
                f"the image config says {diff_id}"
            )
        try:
            sn.commit(ns, chain_id, key, labels=labels, lease=lease)
        except AlreadyExists:
            pass  # unpacked meanwhile by someone else: theirs is the same content
        else:
            return
    except BaseException:
        _remove_quietly(sn, ns, key)
        raise
    _remove_quietly(sn, ns, key)


def _expiry() -> str:
    from datetime import datetime, timedelta

    return (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _remove_quietly(sn, ns: str, key: str) -> None:
    try:
        sn.remove(ns, key)
    except NotFound:
        pass
    except Exception:  # noqa: BLE001 - the original error matters more; cleanup will retry
        log.exception("removing unpack snapshot %r", key)
