"""Descriptors, manifests and indexes: parsed, validated, and walked from an index down.

An image is a tree of content-addressed JSON documents (index → manifests → config and
layers). Everything here refuses malformed JSON with InvalidArgument naming the document
and the field, so import and pull report *which* blob is wrong, and caps JSON size so a
hostile document cannot exhaust memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from runtimed.content.digests import validate as validate_digest
from runtimed.errors import InvalidArgument
from runtimed.images import mediatypes
from runtimed.images.platforms import Matcher, Platform

MAX_JSON_SIZE = 8 << 20  # manifests, indexes and configs larger than this are refused


@dataclass
class Descriptor:
    """A pointer to a blob: media type, digest and size (plus optional metadata)."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    urls: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        """The OCI JSON object, keys in the order Go's image-spec types marshal them, so
        documents we write byte-match containerd's."""
        out: dict = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(sorted(self.annotations.items()))
        if self.platform is not None:
            out["platform"] = self.platform.to_json()
        return out

    @classmethod
    def from_json(cls, obj: object, where: str) -> Descriptor:
        if not isinstance(obj, dict):
            raise InvalidArgument(f"{where}: descriptor must be a JSON object")
        media_type = obj.get("mediaType", "")
        digest = obj.get("digest")
        size = obj.get("size")
        if not isinstance(media_type, str):
            raise InvalidArgument(f"{where}: mediaType must be a string")
        if not isinstance(digest, str):
            raise InvalidArgument(f"{where}: digest missing or not a string")
        try:
            validate_digest(digest)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{where}: {exc}") from None
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidArgument(f"{where}: size must be a non-negative integer")
        annotations = obj.get("annotations") or {}
        if not isinstance(annotations, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
        ):
            raise InvalidArgument(f"{where}: annotations must map strings to strings")
        urls = obj.get("urls") or []
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise InvalidArgument(f"{where}: urls must be a list of strings")
        platform = None
        if obj.get("platform") is not None:
            try:
                platform = Platform.from_json(obj["platform"])
            except InvalidArgument as exc:
                raise InvalidArgument(f"{where}: {exc}") from None
        return cls(media_type, digest, size, dict(annotations), platform, list(urls))


@dataclass
class Manifest:
    media_type: str
    config: Descriptor
    layers: list[Descriptor]
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass
class Index:
    media_type: str
    manifests: list[Descriptor]
    annotations: dict[str, str] = field(default_factory=dict)


def load_json(data: bytes, what: str) -> dict:
    """Decode a JSON object of at most MAX_JSON_SIZE bytes, or InvalidArgument naming `what`."""
    if len(data) > MAX_JSON_SIZE:
        raise InvalidArgument(f"{what}: JSON of {len(data)} bytes exceeds the {MAX_JSON_SIZE} byte limit")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{what}: invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidArgument(f"{what}: expected a JSON object, got {type(obj).__name__}")
    return obj


def dump_json(obj: object) -> bytes:
    """Compact JSON as Go's encoding/json writes it (no spaces, UTF-8, `<>&` escaped)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


def _check_document(doc: dict, media_type: str, what: str) -> None:
    """Refuse a document whose own shape or mediaType contradicts its descriptor's."""
    if doc.get("fsLayers") is not None:
        raise InvalidArgument(f"{what}: Docker schema 1 manifests are not supported")
    declared = doc.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise InvalidArgument(f"{what}: mediaType must be a string")
    if mediatypes.is_manifest(media_type) and (
        "manifests" in doc or (declared and mediatypes.is_index(declared))
    ):
        raise InvalidArgument(f"{what}: expected a manifest ({media_type}) but found an index")
    if mediatypes.is_index(media_type) and (
        "config" in doc or "layers" in doc or (declared and mediatypes.is_manifest(declared))
    ):
        raise InvalidArgument(f"{what}: expected an index ({media_type}) but found a manifest")
    if doc.get("schemaVersion") != 2:
        raise InvalidArgument(f"{what}: schemaVersion must be 2, got {doc.get('schemaVersion')!r}")


def _annotations(doc: dict, what: str) -> dict[str, str]:
    value = doc.get("annotations") or {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidArgument(f"{what}: annotations must map strings to strings")
    return value


def parse_manifest(data: bytes, media_type: str = mediatypes.OCI_MANIFEST, what: str = "manifest") -> Manifest:
    doc = load_json(data, what)
    _check_document(doc, media_type, what)
    if "config" not in doc:
        raise InvalidArgument(f"{what}: no config descriptor")
    config = Descriptor.from_json(doc["config"], f"{what}: config")
    layers = doc.get("layers") or []
    if not isinstance(layers, list):
        raise InvalidArgument(f"{what}: layers must be a list")
    return Manifest(
        doc.get("mediaType") or media_type,
        config,
        [Descriptor.from_json(layer, f"{what}: layers[{i}]") for i, layer in enumerate(layers)],
        _annotations(doc, what),
    )


def parse_index(data: bytes, media_type: str = mediatypes.OCI_INDEX, what: str = "index") -> Index:
    doc = load_json(data, what)
    _check_document(doc, media_type, what)
    manifests = doc.get("manifests") or []
    if not isinstance(manifests, list):
        raise InvalidArgument(f"{what}: manifests must be a list")
    return Index(
        doc.get("mediaType") or media_type,
        [Descriptor.from_json(m, f"{what}: manifests[{i}]") for i, m in enumerate(manifests)],
        _annotations(doc, what),
    )


def parse_config(data: bytes, what: str = "config") -> dict:
    """An image config: a JSON object whose rootfs.diff_ids, when present, are digests."""
    doc = load_json(data, what)
    rootfs = doc.get("rootfs")
    if rootfs is not None:
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(diff_ids, list):
            raise InvalidArgument(f"{what}: rootfs.diff_ids must be a list")
        for i, diff_id in enumerate(diff_ids):
            if not isinstance(diff_id, str):
                raise InvalidArgument(f"{what}: rootfs.diff_ids[{i}] must be a string")
            try:
                validate_digest(diff_id)
            except InvalidArgument as exc:
                raise InvalidArgument(f"{what}: rootfs.diff_ids[{i}]: {exc}") from None
    for key in ("os", "architecture", "variant"):
        if key in doc and not isinstance(doc[key], str):
            raise InvalidArgument(f"{what}: {key} must be a string")
    return doc


def config_platform(config: dict) -> Platform | None:
    """The platform an image config declares, normalised; None when it names no OS."""
    from runtimed.images.platforms import normalize

    if not config.get("os"):
        return None
    return normalize(
        Platform(config["os"], config.get("architecture", ""), config.get("variant", ""))
    )


def children(desc: Descriptor, data: bytes) -> list[Descriptor]:
    """The descriptors a manifest or index points to; [] for configs, layers, unknown types."""
    what = f"{desc.media_type or 'blob'} {desc.digest}"
    if mediatypes.is_manifest(desc.media_type):
        m = parse_manifest(data, desc.media_type, what)
        return [m.config, *m.layers]
    if mediatypes.is_index(desc.media_type):
        return parse_index(data, desc.media_type, what).manifests
    return []


def gc_labels(children_: list[Descriptor]) -> dict[str, str]:
    """The `containerd.io/gc.ref.content.*` labels a parent blob carries for its children."""
    labels: dict[str, str] = {}
    counters: dict[str, int] = {}
    for child in children_:
        prefix = mediatypes.child_gc_label(child.media_type)
        if prefix.endswith("."):
            n = counters.get(prefix, 0)
            counters[prefix] = n + 1
            labels[f"{prefix}{n}"] = child.digest
        else:
            labels[prefix] = child.digest
    return labels


@dataclass
class Node:
    """One blob reached by `walk`: `children` are those walked into (after platform
    filtering), `all_children` every descriptor the document names."""

    descriptor: Descriptor
    children: list[Descriptor]
    all_children: list[Descriptor] = field(default_factory=list)


def walk(
    read: Callable[[Descriptor], bytes],
    root: Descriptor,
    matcher: Matcher | None = None,
) -> Iterator[Node]:
    """Depth-first over the tree under `root`, each blob once; `read` returns a manifest's
    or index's bytes. An index's children that declare a platform `matcher` refuses are
    skipped (children without a platform are kept), as containerd's FilterPlatforms does.
    JSON configs are read and validated too, so a broken config fails here, not at unpack.
    """
    seen: set[str] = set()
    stack = [root]
    while stack:
        desc = stack.pop()
        if desc.digest in seen:
            continue
        seen.add(desc.digest)
        everything: list[Descriptor] = []
        if mediatypes.is_manifest(desc.media_type) or mediatypes.is_index(desc.media_type):
            everything = children(desc, read(desc))
        elif mediatypes.is_config(desc.media_type):
            parse_config(read(desc), f"config {desc.digest}")
        kids = everything
        if matcher is not None and mediatypes.is_index(desc.media_type):
            kids = [k for k in kids if k.platform is None or matcher.match(k.platform)]
        yield Node(desc, kids, everything)
        stack.extend(reversed(kids))
