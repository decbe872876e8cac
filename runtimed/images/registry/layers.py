"""Unpack while pulling: apply layer N into its snapshot as soon as layers 0..N are in.

The pull calls `LayerPipeline.on_layer` in layer order from its own thread while later
layers still download. Each layer becomes the committed snapshot named by its chain ID,
labelled `containerd.io/snapshot.ref`, exactly as `runtimed.images.unpack.Unpacker` names
them; the Unpacker's pass after the pull then finds every snapshot in place and only adds
its labels (diff IDs, the config's gc reference to the chain), so both ways end the same.
"""

from __future__ import annotations

import logging
import os

from runtimed.errors import AlreadyExists, FailedPrecondition, NotFound
from runtimed.images.manifest import Descriptor
from runtimed.images.unpack import chain_ids

log = logging.getLogger("runtimed.registry")

SNAPSHOT_REF_LABEL = "containerd.io/snapshot.ref"


class LayerPipeline:
    """Applies one manifest's layers in order, each on the snapshot of the one below."""

    def __init__(self, content, snapshotter, differ, ns: str, lease: str | None):
        self.content = content
        self.snapshotter = snapshotter
        self.differ = differ
        self.ns = ns
        self.lease = lease
        self._chains: dict[str, list[str]] = {}  # manifest digest -> chain IDs so far
        self.applied = 0

    def on_layer(self, manifest: Descriptor, index: int, layer: Descriptor, diff_id: str) -> None:
        chain = self._chains.setdefault(manifest.digest, [])
        if len(chain) != index or not diff_id:
            return  # out of order or unknown diff ID: the Unpacker's pass does this layer
        chain_id = chain_ids([*chain[-1:], diff_id])[-1] if chain else diff_id
        parent = chain[-1] if chain else ""
        if not self._committed(chain_id):
            self._apply(layer, diff_id, chain_id, parent)
            self.applied += 1
        chain.append(chain_id)

    def _committed(self, chain_id: str) -> bool:
        try:
            return self.snapshotter.stat(self.ns, chain_id).kind.name == "COMMITTED"
        except NotFound:
            return False

    def _apply(self, layer: Descriptor, diff_id: str, chain_id: str, parent: str) -> None:
        key = f"extract-{os.urandom(6).hex()} {chain_id}"
        labels = {SNAPSHOT_REF_LABEL: chain_id}
        mounts = self.snapshotter.prepare(self.ns, key, parent, labels=labels, lease=self.lease)
        try:
            with self.content.open_blob(self.ns, layer.digest) as blob:
                result = self.differ.apply_stream(blob, mounts, layer.media_type)
            if result.digest != diff_id:
                raise FailedPrecondition(
                    f"layer {layer.digest}: extracted content has diff ID {result.digest}, "
                    f"the image config says {diff_id}"
                )
            try:
                self.snapshotter.commit(self.ns, chain_id, key, labels=labels, lease=self.lease)
                return
            except AlreadyExists:
                pass  # unpacked meanwhile by another pull: same content
        except BaseException:
            self._remove(key)
            raise
        self._remove(key)

    def _remove(self, key: str) -> None:
        try:
            self.snapshotter.remove(self.ns, key)
        except NotFound:
            pass
        except Exception:  # noqa: BLE001 - the original error matters more
            log.exception("removing unpack snapshot %r", key)
