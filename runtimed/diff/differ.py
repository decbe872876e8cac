"""The Diff service's core: apply a layer blob onto mounts, compute a layer from two mounts.

Like containerd's applier, an overlay mount with an upperdir is written into directly (with
overlay whiteouts) and a read-write bind mount into its source, so unpacking needs no
mount at all; any other mount list is mounted in a temporary directory under
`<root>/tmpmounts`, applied to, and unmounted. Computing a diff reads an overlay upper
directory directly when the left side is exactly its lower layers, else mounts both sides
read-only and compares the trees.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from runtimed.diff import compression
from runtimed.diff.apply import apply_layer
from runtimed.diff.compute import write_overlay_diff, write_tree_diff
from runtimed.diff.staging import STAGED_DIR, StagedLayers
from runtimed.errors import AlreadyExists, InvalidArgument
from runtimed.images.manifest import Descriptor
from runtimed.snapshots.mount import Mount, temp_mount, unmount_all

UNCOMPRESSED_LABEL = "containerd.io/uncompressed"
DEFAULT_DIFF_MEDIA_TYPE = compression.OUTPUT_MEDIA_TYPES[compression.GZIP]


class _HashingSink:
    """Hashes the uncompressed tar on its way to the compressor."""

    def __init__(self, inner):
        self.inner = inner
        self.hash = hashlib.sha256()

    def write(self, data) -> int:
        self.hash.update(data)
        return self.inner.write(data)

    def flush(self) -> None:
        pass


class Differ:
    def __init__(self, content, tmp_dir: str | os.PathLike):
        self.content = content
        self.tmp_dir = Path(tmp_dir)
        self.tmp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._repair()
        self.staged = StagedLayers(self.tmp_dir / STAGED_DIR)
        if (getattr(content, "add_ingest_hook", None) is not None
                and os.environ.get("RUNTIMED_LAYER_STAGING") != "0"):
            content.add_ingest_hook(self.staged.follow)
            content.add_commit_hook(self.staged.offer)

    def _repair(self) -> None:
        """Unmount and remove temporary mount points a crash left behind, and layers it
        left staged."""
        for entry in os.listdir(self.tmp_dir):
            path = self.tmp_dir / entry
            if entry == STAGED_DIR:
                StagedLayers.repair(path)
                continue
            unmount_all(path, detach=True)
            if path.is_dir() and not os.listdir(path):
                os.rmdir(path)

    # -- apply --------------------------------------------------------------------------

    def apply(self, ns: str, desc: Descriptor, mounts: list[Mount]) -> Descriptor:
        """Apply blob `desc` onto `mounts`; returns the uncompressed layer's descriptor."""
        compression.compression_of(desc.media_type)
        with self.content.open_blob(ns, desc.digest) as blob:  # the namespace holds it
            result = (self._apply_staged(desc.digest, mounts)
                      or self.apply_stream(blob, mounts, desc.media_type))
        return Descriptor(compression.OUTPUT_MEDIA_TYPES[compression.NONE], result.digest,
                          result.size)

    def _apply_staged(self, digest: str, mounts: list[Mount]):
        """The layer staged at its commit, moved onto an empty upper directory or bind
        source (diff/staging.py); None when there is none or it does not fit."""
        if len(mounts) != 1:
            return None
        m = mounts[0]
        if m.type == "overlay" and m.option("upperdir"):
            lowers = [p for p in (m.option("lowerdir") or "").split(":") if p]
            return self.staged.apply(digest, m.option("upperdir"), lowers, overlay=True)
        if m.type == "bind" and not m.readonly:
            return self.staged.apply(digest, m.source, [], overlay=False)
        return None

    def apply_stream(self, stream, mounts: list[Mount], media_type: str | None = None):
        if len(mounts) == 1 and mounts[0].type == "overlay" and mounts[0].option("upperdir"):
            m = mounts[0]
            lowers = (m.option("lowerdir") or "").split(":")
            return apply_layer(stream, m.option("upperdir"), overlay=True,
                               parents=[p for p in lowers if p], media_type=media_type)
        if len(mounts) == 1 and mounts[0].type == "bind" and not mounts[0].readonly:
            return apply_layer(stream, mounts[0].source, media_type=media_type)
        if not mounts:
            raise InvalidArgument("no mounts to apply the layer onto")
        with temp_mount(mounts, parent=self.tmp_dir) as root:
            return apply_layer(stream, root, media_type=media_type)

    # -- diff ---------------------------------------------------------------------------

    def diff(self, ns: str, left: list[Mount], right: list[Mount], media_type: str = "",
             ref: str = "", labels: dict[str, str] | None = None,
             lease: str | None = None) -> Descriptor:
        """Write the layer turning `left` into `right` to the content store."""
        media_type = media_type or DEFAULT_DIFF_MEDIA_TYPE
        kind = compression.compression_of(media_type)
        ref = ref or f"diff-{os.urandom(8).hex()}"
        writer = self.content.writer(ns, ref, lease=lease)
        try:
            blob = _HashingSink(writer)
            compressor = compression.Compressor(blob, kind)
            sink = _HashingSink(compressor)
            with self._sides(left, right) as write:
                write(sink)
            compressor.close()
        except BaseException:
            writer.close()
            raise
        diff_id = "sha256:" + sink.hash.hexdigest()
        all_labels = {**(labels or {}), UNCOMPRESSED_LABEL: diff_id}
        try:
            info = writer.commit(labels=all_labels)
        except AlreadyExists:
            info = self.content.info(ns, "sha256:" + blob.hash.hexdigest())
            info.labels = {**info.labels, **all_labels}
            info = self.content.update(ns, info, [f"labels.{k}" for k in all_labels])
        return Descriptor(media_type, info.digest, info.size)

    @contextlib.contextmanager
    def _sides(self, left: list[Mount], right: list[Mount]) -> Iterator:
        upper = _overlay_upper_on(left, right)
        if upper is not None:
            yield lambda out: write_overlay_diff(upper, out)
            return
        with contextlib.ExitStack() as stack:
            if left:
                lower_root = stack.enter_context(temp_mount(_readonly(left), parent=self.tmp_dir))
            else:
                lower_root = Path(stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="empty-", dir=self.tmp_dir)))
            upper_root = stack.enter_context(temp_mount(_readonly(right), parent=self.tmp_dir))
            yield lambda out: write_tree_diff(lower_root, upper_root, out)


def _readonly(mounts: list[Mount]) -> list[Mount]:
    """The same tree, mounted read-only; an overlay's upperdir becomes its top lower
    layer, since an upperdir in use by a container cannot be mounted a second time."""
    out = []
    for m in mounts:
        options = [o for o in m.options if o not in ("rw", "ro")]
        upper = m.option("upperdir")
        if m.type == "overlay" and upper:
            lowers = m.option("lowerdir") or ""
            options = [o for o in options
                       if not o.startswith(("upperdir=", "workdir=", "lowerdir="))]
            options.append("lowerdir=" + ":".join(p for p in (upper, lowers) if p))
        out.append(Mount(m.type, m.source, options + ["ro"], m.target))
    return out


def _lowers(mounts: list[Mount]) -> list[str] | None:
    """The directories a mount list stacks, nearest first, when it is a plain stack."""
    if not mounts:
        return []
    if len(mounts) != 1:
        return None
    m = mounts[0]
    if m.type == "bind":
        return [m.source]
    if m.type == "overlay" and not m.option("upperdir"):
        return (m.option("lowerdir") or "").split(":")
    return None


def _overlay_upper_on(left: list[Mount], right: list[Mount]) -> str | None:
    if len(right) != 1 or right[0].type != "overlay" or not right[0].option("upperdir"):
        return None
    lowers = [p for p in (right[0].option("lowerdir") or "").split(":") if p]
    if _lowers(left) == lowers:
        return right[0].option("upperdir")
    return None
