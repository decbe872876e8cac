"""Mark and sweep over real content, images and leases on a temporary root."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest

from runtimed.content.store import ContentInfo, ContentStore
from runtimed.errors import NotFound
from runtimed.metadata.db import Database
from runtimed.metadata.gc import GarbageCollector, Node, ResourceKind
from runtimed.metadata.images import Descriptor, Image, ImageStore
from runtimed.metadata.leases import LeaseStore, Resource

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"


@pytest.fixture
def env(tmp_path):
    db = Database(tmp_path / "meta.db")
    leases = LeaseStore(db)
    content = ContentStore(tmp_path, db, leases)
    images = ImageStore(db)
    gc = GarbageCollector(db, content)
    yield content, images, leases, gc, tmp_path
    gc.close()
    db.close()


def blob_file(root, digest):
    return root / "content" / "blobs" / "sha256" / digest.split(":")[1]


def make_image(content, ns, layers: list[bytes], name=None, images=None, labels_refs=False):
    """Write layers, a config and a manifest (no gc labels unless asked); return the manifest."""
    layer_descs = []
    for data in layers:
        info = content.write_blob(ns, data)
        layer_descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": info.digest, "size": info.size})
    config = content.write_blob(ns, json.dumps({"layers": [d["digest"] for d in layer_descs]}).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.digest, "size": config.size},
        "layers": layer_descs,
    }
    labels = {}
    if labels_refs:
        labels = {f"containerd.io/gc.ref.content.l.{i}": d["digest"] for i, d in enumerate(layer_descs)}
        labels["containerd.io/gc.ref.content.config"] = config.digest
    m = content.write_blob(ns, json.dumps(manifest).encode(), labels=labels)
    if name:
        images.create(ns, Image(name, Descriptor(MANIFEST, m.digest, m.size)))
    return m, config, [d["digest"] for d in layer_descs]


def test_image_delete_removes_only_its_blobs(env):
    content, images, _, gc, root = env
    shared = b"shared layer"
    m1, c1, l1 = make_image(content, "default", [shared, b"only in one"], "one", images)
    m2, c2, l2 = make_image(content, "default", [shared, b"only in two"], "two", images)
    assert gc.collect().removed == []
    images.delete("default", "one")
    result = gc.collect()
    gone = {n.key for n in result.removed}
    assert gone == {m1.digest, c1.digest, l1[1]}
    for digest in gone:
        assert not blob_file(root, digest).exists()
        with pytest.raises(NotFound):
            content.info("default", digest)
    for digest in [m2.digest, c2.digest, *l2]:
        assert content.exists("default", digest) and blob_file(root, digest).exists()


def test_index_children_and_labels_followed(env):
    content, images, _, gc, _ = env
    m, c, layers = make_image(content, "default", [b"a", b"b"], labels_refs=True)
    index = content.write_blob("default", json.dumps({
        "schemaVersion": 2, "mediaType": INDEX,
        "manifests": [{"mediaType": MANIFEST, "digest": m.digest, "size": m.size}],
    }).encode())
    images.create("default", Image("idx", Descriptor(INDEX, index.digest, index.size)))
    assert gc.collect().removed == []
    images.delete("default", "idx")
    assert {n.key for n in gc.collect().removed} == {index.digest, m.digest, c.digest, *layers}


def test_leased_and_root_content_stays(env):
    content, _, leases, gc, _ = env
    leases.create("default", "keep")
    leased = content.write_blob("default", b"leased", lease="keep")
    rooted = content.write_blob("default", b"rooted", labels={"containerd.io/gc.root": "x"})
    loose = content.write_blob("default", b"loose")
    removed = {n.key for n in gc.collect().removed}
    assert removed == {loose.digest}
    assert content.exists("default", leased.digest) and content.exists("default", rooted.digest)
    leases.delete("default", "keep")
    assert {n.key for n in gc.collect().removed} == {leased.digest}


def test_expired_lease_is_collected_with_its_content(env):
    content, _, leases, gc, _ = env
    past = (datetime.now(UTC) - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    future = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    leases.create("default", "old", {"containerd.io/gc.expire": past})
    leases.create("default", "new", {"containerd.io/gc.expire": future})
    a = content.write_blob("default", b"a", lease="old")
    b = content.write_blob("default", b"b", lease="new")
    removed = set(gc.collect().removed)
    assert removed == {Node("lease", "default", "old"), Node("content", "default", a.digest)}
    assert content.exists("default", b.digest)
    assert [lease.id for lease in leases.list("default")] == ["new"]


def test_shared_blob_across_namespaces_kept_until_last(env):
    content, _, leases, gc, root = env
    leases.create("a", "l")
    info = content.write_blob("a", b"both", lease="l")
    content.write_blob("b", b"both")
    gc.collect()
    assert not content.exists("b", info.digest)
    assert blob_file(root, info.digest).exists()  # still held in namespace a
    leases.delete("a", "l")
    gc.collect()
    assert not blob_file(root, info.digest).exists()


def test_ingests_expire_and_orphans_are_swept(env):
    content, _, leases, gc, root = env
    w = content.writer("default", "open")
    w.write(b"partial")
    assert gc.collect().removed == []  # held by the writer
    w.close()
    assert gc.collect().removed == []  # unleased ingests live for a day
    with content.db.transaction() as tx:
        tx.execute("UPDATE content_ingests SET expires_at = 1")
    result = gc.collect()
    assert result.removed == [Node("ingest", "default", "open")]
    assert any(s.startswith("ingest/") for s in result.swept)
    assert list((root / "content" / "ingest").iterdir()) == []
    (root / "content" / "blobs" / "sha256" / ("0" * 64)).write_bytes(b"stray")
    assert "content/sha256:" + "0" * 64 in gc.collect().swept


def test_one_failed_removal_does_not_stop_gc(env):
    content, _, _, gc, _ = env

    class Broken(ResourceKind):
        kind = "broken"

        def candidates(self, tx):
            return [Node("broken", "default", "x")]

        def remove(self, tx, node):
            raise OSError("device busy")

    gc.register(Broken())
    loose = content.write_blob("default", b"loose")
    result = gc.collect()
    assert Node("content", "default", loose.digest) in result.removed
    assert result.errors and "device busy" in result.errors[0]


def test_plugged_kind_roots_and_references(env):
    """A containers-like kind keeps content alive through its labels."""
    content, _, _, gc, _ = env
    kept = content.write_blob("default", b"kept by container")

    class Containers(ResourceKind):
        kind = "container"

        def roots(self, tx, now):
            yield Node("container", "default", "c1")

        def references(self, tx, node):
            yield Node("content", "default", kept.digest)

    gc.register(Containers())
    assert gc.collect().removed == []


def test_schedule_runs_in_background(env):
    content, images, _, gc, _ = env
    images.gc = gc
    m, _, _ = make_image(content, "default", [b"x"], "img", images)
    images.delete("default", "img")
    deadline = time.monotonic() + 5
    while content.exists("default", m.digest) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not content.exists("default", m.digest)


def test_lease_resources_api(env):
    _, _, leases, _, _ = env
    lease = leases.create("default", None, {"x": "y"})
    assert lease.id
    leases.add_resource("default", lease.id, Resource("sha256:" + "a" * 64, "content"))
    leases.add_resource("default", lease.id, Resource("key1", "snapshots/overlayfs"))
    assert {(r.type, r.id) for r in leases.list_resources("default", lease.id)} == {
        ("content", "sha256:" + "a" * 64), ("snapshots/overlayfs", "key1")}
    leases.delete_resource("default", lease.id, Resource("key1", "snapshots/overlayfs"))
    assert len(leases.list_resources("default", lease.id)) == 1
    assert [x.id for x in leases.list("default", ["labels.x==y"])] == [lease.id]
    with pytest.raises(NotFound):
        leases.add_resource("default", "nope", Resource("k", "ingests"))


def test_client_labels_rule_over_json(env):
    """`ctr content prune references` drops the layer labels of a labelled manifest: the
    layers then go even though the manifest JSON still names them, as in containerd."""
    content, images, _, gc, _ = env
    m, config, layers = make_image(content, "default", [b"l0", b"l1"], "img", images, labels_refs=True)
    assert gc.collect().removed == []
    content.update("default", ContentInfo(m.digest, 0, 0, 0, {}),
                   [f"labels.containerd.io/gc.ref.content.l.{i}" for i in range(2)])
    assert {n.key for n in gc.collect().removed} == set(layers)
    assert content.exists("default", config.digest) and content.exists("default", m.digest)


def test_flat_lease_keeps_only_its_own_objects(env):
    content, _, leases, gc, _ = env
    leases.create("default", "flat", {"containerd.io/gc.flat": "1"})
    m, config, layers = make_image(content, "default", [b"f0"])
    leases.add_resource("default", "flat", Resource(m.digest, "content"))
    removed = {n.key for n in gc.collect().removed}
    assert removed == {config.digest, *layers}
    assert content.exists("default", m.digest)
