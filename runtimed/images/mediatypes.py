"""Media types of image content (OCI and Docker schema 2) and what each kind of blob is.

Shared by import/export, unpack and the registry client, so every part agrees on which
blobs are indexes, manifests, configs and layers, and on the garbage-collection label a
parent puts on each child (containerd's `containerd.io/gc.ref.content.*` scheme).
"""

from __future__ import annotations

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_NONDIST_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
OCI_LAYOUT_VERSION = "1.0.0"

DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_SCHEMA1_MANIFEST = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar"
DOCKER_FOREIGN_LAYER_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

# Annotations naming an image inside an index: OCI's (often only the tag) and containerd's
# (the full reference, which import prefers).
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"

# Content label that records a compressed layer's uncompressed digest (its diff ID).
LABEL_UNCOMPRESSED = "containerd.io/uncompressed"

INDEXES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFESTS = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIGS = frozenset({OCI_CONFIG, DOCKER_CONFIG})
NON_DISTRIBUTABLE = frozenset(
    {
        OCI_LAYER_NONDIST,
        OCI_LAYER_NONDIST_GZIP,
        OCI_LAYER_NONDIST_ZSTD,
        DOCKER_FOREIGN_LAYER,
        DOCKER_FOREIGN_LAYER_GZIP,
    }
)
_COMPRESSION = {
    OCI_LAYER: "",
    OCI_LAYER_NONDIST: "",
    DOCKER_LAYER: "",
    DOCKER_FOREIGN_LAYER: "",
    OCI_LAYER_GZIP: "gzip",
    OCI_LAYER_NONDIST_GZIP: "gzip",
    DOCKER_LAYER_GZIP: "gzip",
    DOCKER_FOREIGN_LAYER_GZIP: "gzip",
    OCI_LAYER_ZSTD: "zstd",
    OCI_LAYER_NONDIST_ZSTD: "zstd",
    DOCKER_LAYER_ZSTD: "zstd",
}


def is_index(media_type: str) -> bool:
    return media_type in INDEXES


def is_manifest(media_type: str) -> bool:
    return media_type in MANIFESTS


def is_config(media_type: str) -> bool:
    return media_type in CONFIGS


def is_layer(media_type: str) -> bool:
    """Known layer types, also with an extra suffix such as `+encrypted`."""
    return _base(media_type) in _COMPRESSION


def layer_compression(media_type: str) -> str | None:
    """'' for a plain tar, 'gzip' or 'zstd'; None when not a layer type we can decompress
    (unknown, or wrapped by a further suffix such as `+encrypted`)."""
    return _COMPRESSION.get(media_type)


def is_non_distributable(media_type: str) -> bool:
    return _base(media_type) in NON_DISTRIBUTABLE


def child_gc_label(child_media_type: str) -> str:
    """The label prefix a parent blob uses to keep a child alive: the caller appends an
    index for manifests and layers (`...m.0`, `...l.3`); a config has exactly one."""
    if is_config(child_media_type):
        return "containerd.io/gc.ref.content.config"
    if is_manifest(child_media_type) or is_index(child_media_type):
        return "containerd.io/gc.ref.content.m."
    if is_layer(child_media_type):
        return "containerd.io/gc.ref.content.l."
    return "containerd.io/gc.ref.content."


def _base(media_type: str) -> str:
    """Drop a trailing `+encrypted` style suffix after the compression suffix."""
    for known in _COMPRESSION:
        if media_type == known or media_type.startswith(known + "+"):
            return known
    return media_type
