"""Image archive import/export over real content, image and lease stores on a temp root."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from runtimed.content.store import ContentStore
from runtimed.errors import InvalidArgument, NotFound
from runtimed.images import mediatypes
from runtimed.images.archive import Archives, ExportOptions, ImportOptions
from runtimed.images.manifest import MAX_JSON_SIZE
from runtimed.metadata.db import Database
from runtimed.metadata.gc import GarbageCollector
from runtimed.metadata.images import ImageStore
from runtimed.metadata.leases import LeaseStore
from tests import testimages

NS = "default"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return testimages.build(tmp_path_factory.mktemp("testimages"))


@pytest.fixture
def env(tmp_path):
    db = Database(tmp_path / "meta.db")
    leases = LeaseStore(db)
    content = ContentStore(tmp_path, db, leases)
    image_store = ImageStore(db)
    gc = GarbageCollector(db, content)
    leases.gc = content.gc = image_store.gc = gc
    yield Archives(content, image_store, leases, gc)
    gc.close()
    db.close()


def snapshot(a: Archives, ns: str = NS):
    """Everything an import could leave behind, for 'store unchanged' checks."""
    a.gc.collect()
    return (
        sorted(i.digest for i in a.content.list(ns)),
        sorted(i.name for i in a.images.list(ns)),
        sorted(lease.id for lease in a.leases.list(ns)),
        sorted(s.ref for s in a.content.list_statuses(ns)),
        sorted(p.name for p in (a.content.blobs / "sha256").iterdir()),
    )


def read_members(path: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    out = []
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            f = tf.extractfile(m) if m.isreg() else None
            out.append((m, f.read() if f else None))
    return out


def write_tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def blob_member(digest: str) -> str:
    return "blobs/sha256/" + digest.split(":")[1]


def do_import(a: Archives, data: bytes | Path, **opts):
    raw = data.read_bytes() if isinstance(data, Path) else data
    return a.import_archive(NS, io.BytesIO(raw), ImportOptions(**opts))


# -- import -----------------------------------------------------------------------------


def test_import_busybox_oci_layout(env, images):
    bb = images["busybox"]
    events = []
    result = env.import_archive(NS, open(bb.path, "rb"), ImportOptions(), events.append)
    assert [(i.name, i.target.digest) for i in result] == [(bb.name, bb.target["digest"])]
    record = env.images.get(NS, bb.name)
    assert record.target.digest == bb.target["digest"]
    assert record.target.media_type == mediatypes.OCI_MANIFEST
    assert record.target.annotations[mediatypes.ANNOTATION_IMAGE_NAME] == bb.name
    stored = {i.digest for i in env.content.list(NS)}
    assert set(bb.blobs) <= stored
    # the temporary lease is gone, yet the image keeps its blobs through a collection
    assert env.leases.list(NS) == []
    env.gc.collect()
    assert set(bb.blobs) <= {i.digest for i in env.content.list(NS)}
    manifest = env.content.info(NS, bb.manifests[0])
    assert manifest.labels["containerd.io/gc.ref.content.config"] == bb.configs[0]
    assert manifest.labels["containerd.io/gc.ref.content.l.0"] == bb.layers[0]
    assert {e.ref for e in events if e.action == "blob"} >= set(bb.blobs)
    assert [e.ref for e in events if e.action == "image"] == [bb.name]
    assert any(e.action == "read" and e.offset == bb.path.stat().st_size for e in events)


def test_import_is_idempotent_and_updates_existing_name(env, images):
    do_import(env, images["busybox"].path)
    first = env.images.get(NS, images["busybox"].name)
    do_import(env, images["busybox"].path)
    again = env.images.get(NS, images["busybox"].name)
    assert again.target.digest == first.target.digest
    assert again.created_at == first.created_at


def test_import_multilayer(env, images):
    ml = images["multilayer"]
    do_import(env, ml.path)
    assert env.images.get(NS, ml.name).target.digest == ml.target["digest"]
    assert len(ml.layers) == 3
    assert set(ml.blobs) <= {i.digest for i in env.content.list(NS)}


def test_import_multiplatform_keeps_whole_index(env, images):
    mp = images["multiplatform"]
    do_import(env, mp.path)
    record = env.images.get(NS, mp.name)
    assert record.target.media_type == mediatypes.OCI_INDEX
    env.gc.collect()
    # every platform's blobs stay: unpack picks the platform later
    assert set(mp.blobs) <= {i.digest for i in env.content.list(NS)}


def _drop_arm64_layer(mp) -> tuple[bytes, str]:
    arm64_layer = mp.layers[-1]  # testimages lists amd64 first, arm64 second
    members = [(i, d) for i, d in read_members(mp.path) if i.name != blob_member(arm64_layer)]
    return write_tar(members), arm64_layer


def test_import_verifies_only_requested_platforms(env, images):
    data, arm64_layer = _drop_arm64_layer(images["multiplatform"])
    do_import(env, data)  # host platform (amd64) is complete: accepted, as containerd does
    env.images.delete(NS, images["multiplatform"].name)
    env.gc.collect()
    before = snapshot(env)
    with pytest.raises(InvalidArgument, match=f"{arm64_layer}.*missing from the archive"):
        do_import(env, data, all_platforms=True)
    assert snapshot(env) == before
    with pytest.raises(InvalidArgument, match="missing from the archive"):
        do_import(env, data, platform="linux/arm64")


def test_import_docker_archive(env, images):
    dk = images["busybox-docker"]
    (result,) = do_import(env, dk.path)
    assert result.name == "docker.io/library/busybox:latest"
    assert result.target.media_type == mediatypes.DOCKER_MANIFEST
    manifest = json.loads(env.content.open_blob(NS, result.target.digest).read())
    assert manifest["mediaType"] == mediatypes.DOCKER_MANIFEST
    assert manifest["config"] == {
        "mediaType": mediatypes.DOCKER_CONFIG,
        "digest": dk.configs[0],
        "size": env.content.info(NS, dk.configs[0]).size,
    }
    assert [layer["digest"] for layer in manifest["layers"]] == dk.layers
    assert manifest["layers"][0]["mediaType"] == mediatypes.DOCKER_LAYER  # uncompressed tar
    # the config is byte-identical to the OCI image's: same image, other packaging
    assert dk.configs == images["busybox"].configs
    assert result.target.annotations[mediatypes.ANNOTATION_REF_NAME] == "latest"


def test_import_names_base_name_digests_index_name(env, images):
    bb = images["busybox"]
    members = read_members(bb.path)
    index = {"schemaVersion": 2, "manifests": [
        {**bb.target, "annotations": {mediatypes.ANNOTATION_REF_NAME: "v1"}}]}
    data = write_tar([(i, json.dumps(index).encode() if i.name == "index.json" else d)
                      for i, d in members])
    result = do_import(env, data, base_name="example.com/foo/bar", digests=True,
                       index_name="example.com/foo/index:1")
    names = {i.name for i in result}
    digest = bb.target["digest"]
    assert names == {"example.com/foo/bar:v1", f"example.com/foo/bar@{digest}",
                     "example.com/foo/index:1"}
    assert env.images.get(NS, "example.com/foo/index:1").target.media_type == mediatypes.OCI_INDEX
    # without a base name a tag-only name gets import-<date>
    (plain,) = do_import(env, data)
    assert plain.name.startswith("import-") and plain.name.endswith(":v1")
    # a base name filters out full OCI ref names that are not under it (containerd's own
    # io.containerd.image.name annotation is taken as it is, as containerd does)
    index["manifests"][0]["annotations"] = {mediatypes.ANNOTATION_REF_NAME: "example.com/elsewhere:v1"}
    data = write_tar([(i, json.dumps(index).encode() if i.name == "index.json" else d)
                      for i, d in members])
    assert do_import(env, data, base_name="example.com/foo/bar") == []
    assert [i.name for i in do_import(env, bb.path, base_name="example.com/other")] == [bb.name]


# -- malformed archives: refused, naming the problem, store unchanged -------------------


def _corrupt(images, kind: str) -> tuple[bytes, str]:
    bb = images["busybox"]
    members = read_members(bb.path)
    layer, manifest = blob_member(bb.layers[0]), blob_member(bb.manifests[0])
    if kind == "missing blob":
        return write_tar([(i, d) for i, d in members if i.name != layer]), "missing from the archive"
    if kind == "bad json":
        bad = b'{"schemaVersion": 2, "config": '
        name = blob_member("sha256:" + hashlib.sha256(bad).hexdigest())
        index = {"schemaVersion": 2, "manifests": [{
            "mediaType": mediatypes.OCI_MANIFEST, "digest": "sha256:" + hashlib.sha256(bad).hexdigest(),
            "size": len(bad), "annotations": {mediatypes.ANNOTATION_IMAGE_NAME: "x.io/bad:json"}}]}
        out = [(i, json.dumps(index).encode() if i.name == "index.json" else d) for i, d in members]
        return write_tar([*out, reg(name, bad)]), "invalid JSON"
    if kind == "digest mismatch":
        return write_tar([(i, d[:-1] + bytes([d[-1] ^ 1]) if i.name == layer else d)
                          for i, d in members]), f"{layer}: content does not match"
    if kind == "size mismatch":
        index = json.loads(dict((i.name, d) for i, d in members)["index.json"])
        index["manifests"][0]["size"] += 1
        return write_tar([(i, json.dumps(index).encode() if i.name == "index.json" else d)
                          for i, d in members]), "descriptor says"
    if kind == "path traversal":
        return write_tar([*members, reg("blobs/../../evil", b"x")]), "path traversal"
    if kind == "absolute name":
        return write_tar([*members, reg("/etc/evil", b"x")]), "absolute names"
    if kind == "escaping symlink":
        info = tarfile.TarInfo("blobs/sha256/link")
        info.type, info.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
        return write_tar([*members, (info, None)]), "points outside the archive"
    if kind == "hard link":
        info = tarfile.TarInfo("blobs/sha256/hard")
        info.type, info.linkname = tarfile.LNKTYPE, manifest
        return write_tar([*members, (info, None)]), "hard link entries are not allowed"
    if kind == "device":
        info = tarfile.TarInfo("dev")
        info.type = tarfile.CHRTYPE
        return write_tar([*members, (info, None)]), "special file"
    if kind == "oversized json":
        big = b'{"schemaVersion":2,"manifests":[],"annotations":{"x":"' + b"a" * MAX_JSON_SIZE + b'"}}'
        return write_tar([(i, big if i.name == "index.json" else d) for i, d in members]), "exceeds"
    if kind == "bad layout version":
        return write_tar([(i, b'{"imageLayoutVersion":"9.9"}' if i.name == "oci-layout" else d)
                          for i, d in members]), "unsupported imageLayoutVersion"
    if kind == "not a tar":
        return b"this is not a tar archive at all" * 100, "not a readable tar archive"
    if kind == "truncated":
        return bb.path.read_bytes()[: 700 * 1024], "not a readable tar archive"
    if kind == "unknown format":
        return write_tar([reg("hello.txt", b"hi")]), "unrecognized image archive"
    if kind == "bad blob name":
        return write_tar([*members, reg("blobs/sha256/xyz", b"x")]), "blobs/sha256/xyz"
    raise AssertionError(kind)


MALFORMED = ["missing blob", "bad json", "digest mismatch", "size mismatch", "path traversal",
             "absolute name", "escaping symlink", "hard link", "device", "oversized json",
             "bad layout version", "not a tar", "truncated", "unknown format", "bad blob name"]


@pytest.mark.parametrize("kind", MALFORMED)
def test_malformed_archive_refused_store_unchanged(env, images, kind):
    # already there and must survive: an image in this namespace (sharing only the config
    # with busybox.tar) and one in another namespace (sharing every blob on disk)
    do_import(env, images["busybox-docker"].path)
    env.import_archive("other", open(images["multilayer"].path, "rb"))
    before = snapshot(env), snapshot(env, "other")
    data, message = _corrupt(images, kind)
    with pytest.raises(InvalidArgument, match=message):
        do_import(env, data)
    assert (snapshot(env), snapshot(env, "other")) == before


def test_malformed_docker_archive(env, images):
    members = read_members(images["busybox-docker"].path)
    entries = json.loads(dict((i.name, d) for i, d in members)["manifest.json"])
    entries[0]["Layers"].append("nope/layer.tar")
    data = write_tar([(i, json.dumps(entries).encode() if i.name == "manifest.json" else d)
                      for i, d in members])
    before = snapshot(env)
    with pytest.raises(InvalidArgument, match="layer 'nope/layer.tar' is missing"):
        do_import(env, data)
    assert snapshot(env) == before


def test_docker_archive_inner_symlink_is_an_alias(env, images):
    """Old `docker save` links duplicate layers to one file; inside the archive that is fine."""
    members = read_members(images["busybox-docker"].path)
    entries = json.loads(dict((i.name, d) for i, d in members)["manifest.json"])
    original = entries[0]["Layers"][0]
    link = tarfile.TarInfo("alias/layer.tar")
    link.type, link.linkname = tarfile.SYMTYPE, "../" + original
    entries[0]["Layers"][0] = "alias/layer.tar"
    data = write_tar([*[(i, json.dumps(entries).encode() if i.name == "manifest.json" else d)
                        for i, d in members], (link, None)])
    (result,) = do_import(env, data)
    manifest = json.loads(env.content.open_blob(NS, result.target.digest).read())
    assert manifest["layers"][0]["digest"] == images["busybox-docker"].layers[0]


# -- export -------------------------------------------------------------------------------


def test_export_then_import_gives_identical_digests(env, images):
    for key in ("busybox", "multilayer", "multiplatform"):
        do_import(env, images[key].path)
    names = [images[k].name for k in ("busybox", "multilayer", "multiplatform")]
    out = b"".join(env.export_chunks(NS, names, ExportOptions(all_platforms=True)))
    assert out == b"".join(env.export_chunks(NS, names, ExportOptions(all_platforms=True)))
    with tarfile.open(fileobj=io.BytesIO(out)) as tf:
        listed = set(tf.getnames())
    assert {"oci-layout", "index.json", "manifest.json"} <= listed
    result = env.import_archive("other", io.BytesIO(out), ImportOptions(all_platforms=True))
    assert {(i.name, i.target.digest) for i in result} == {
        (images[k].name, images[k].target["digest"]) for k in ("busybox", "multilayer", "multiplatform")}
    want = set().union(*(images[k].blobs for k in ("busybox", "multilayer", "multiplatform")))
    assert want <= {i.digest for i in env.content.list("other")}


def test_export_default_platform_only(env, images):
    mp = images["multiplatform"]
    do_import(env, mp.path)
    out = b"".join(env.export_chunks(NS, [mp.name]))
    with tarfile.open(fileobj=io.BytesIO(out)) as tf:
        names = set(tf.getnames())
        docker = json.loads(tf.extractfile("manifest.json").read())
    arm64_layer = blob_member(mp.layers[-1])
    assert arm64_layer not in names
    assert blob_member(mp.layers[0]) in names
    assert docker[0]["RepoTags"] == ["runtimed/multiplatform:latest"]
    assert docker[0]["Config"] == blob_member(mp.configs[0])
    # and it imports back for the host platform
    (back,) = env.import_archive("other", io.BytesIO(out))
    assert back.target.digest == mp.target["digest"]


def test_export_docker_archive_imports_as_docker(env, images):
    bb = images["busybox"]
    do_import(env, bb.path)
    out = b"".join(env.export_chunks(NS, [bb.name], ExportOptions(docker=True)))
    with tarfile.open(fileobj=io.BytesIO(out)) as tf:
        names = set(tf.getnames())
        repositories = json.loads(tf.extractfile("repositories").read())
    assert "oci-layout" not in names and "manifest.json" in names
    assert repositories == {"busybox": {"latest": bb.configs[0].split(":")[1]}}
    (back,) = env.import_archive("other", io.BytesIO(out))
    assert back.name == bb.name
    manifest = json.loads(env.content.open_blob("other", back.target.digest).read())
    assert manifest["config"]["digest"] == bb.configs[0]
    assert [x["digest"] for x in manifest["layers"]] == bb.layers
    assert manifest["layers"][0]["mediaType"] == mediatypes.DOCKER_LAYER_GZIP


def test_export_unknown_image(env):
    with pytest.raises(NotFound, match="nope"):
        env.export_chunks(NS, ["docker.io/library/nope:latest"])


class Trickle:
    """A reader that hands out odd-sized pieces, as a gRPC stream of a client's choosing
    does: headers, member data and padding straddle them."""

    def __init__(self, data: bytes, sizes: tuple[int, ...]):
        self.data = memoryview(data)
        self.sizes = sizes
        self.n = 0

    def read(self, size: int = -1) -> memoryview:
        size = min(size, self.sizes[self.n % len(self.sizes)])
        self.n += 1
        piece, self.data = self.data[:size], self.data[size:]
        return piece


@pytest.mark.parametrize("sizes", [(512,), (3, 700, 511, 65537), (1 << 20, 5)])
def test_import_from_pieces_of_any_size(env, images, sizes):
    bb = images["multilayer"]
    (result,) = env.import_archive(NS, Trickle(bb.path.read_bytes(), sizes), ImportOptions())
    assert (result.name, result.target.digest) == (bb.name, bb.target["digest"])
    for layer in bb.layers:
        assert env.content.info(NS, layer).digest == layer


@pytest.mark.parametrize("compress", ["bz2", "xz"])
def test_import_bzip2_and_xz_compressed_archives(env, images, compress):
    import bz2
    import lzma

    bb = images["busybox"]
    pack = bz2.compress if compress == "bz2" else lzma.compress
    (result,) = do_import(env, pack(bb.path.read_bytes()))
    assert (result.name, result.target.digest) == (bb.name, bb.target["digest"])


def test_import_gzip_compressed_archive(env, images):
    import gzip

    bb = images["busybox"]
    (result,) = do_import(env, gzip.compress(bb.path.read_bytes(), mtime=0))
    assert (result.name, result.target.digest) == (bb.name, bb.target["digest"])


def test_docker_archive_with_several_images(env, images):
    members = read_members(images["busybox-docker"].path)
    entries = json.loads(dict((i.name, d) for i, d in members)["manifest.json"])
    entries[0]["RepoTags"] = ["busybox:latest", "example.com/team/busybox:1.0"]
    entries.append({**entries[0], "RepoTags": None})  # untagged: imported, but unnamed
    data = write_tar([(i, json.dumps(entries).encode() if i.name == "manifest.json" else d)
                      for i, d in members])
    result = do_import(env, data, digests=True, base_name="example.com/team/busybox")
    names = {i.name for i in result}
    digest = result[0].target.digest
    assert names == {"docker.io/library/busybox:latest", "example.com/team/busybox:1.0",
                     f"example.com/team/busybox@{digest}"}
    assert {i.target.digest for i in result} == {digest}


def test_bad_platform_refused_before_reading(env):
    class Untouchable(io.RawIOBase):
        def readinto(self, buffer):
            raise AssertionError("the archive was read")

    with pytest.raises(InvalidArgument, match="platform"):
        env.import_archive(NS, Untouchable(), ImportOptions(platform="linux/*"))
    assert env.leases.list(NS) == []
