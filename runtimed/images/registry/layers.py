"""Unpack while pulling: apply layer N into its snapshot as soon as layers 0..N are in.

The pull calls `LayerPipeline.on_layer` in layer order from its own thread while later
layers still download. Each layer becomes the committed snapshot named by its chain ID,
labelled `containerd.io/snapshot.ref`, exactly as `runtimed.images.unpack.Unpacker` names
them; the Unpacker's pass after the pull then finds every snapshot in place and only adds
its labels (diff IDs, the config's gc reference to the chain), so both ways end the same.
"""

from __future__ import annotations

from runtimed.images.manifest import Descriptor
from runtimed.images.unpack import apply_layer, chain_ids, is_committed


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
        if not is_committed(self.snapshotter, self.ns, chain_id):
            apply_layer(self.content, self.differ, self.snapshotter, self.ns, layer, diff_id,
                        chain_id, parent, self.lease)
            self.applied += 1
        chain.append(chain_id)
