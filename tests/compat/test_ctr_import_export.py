"""The real `ctr images import/export` against runtimed, crossed with our Archives service:
docker-archive and multi-platform imports, ctr's naming flags, and round trips whose
digests must not change whichever side writes the archive."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from runtimed.api.images.v1 import archive_pb2, archive_pb2_grpc
from tests import testimages

MD = [("containerd-namespace", "default")]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return testimages.build(tmp_path_factory.mktemp("images"))


def listing(daemon, namespace: str = "default") -> dict[str, str]:
    """image name -> target digest, from `ctr images ls`."""
    out = daemon.ctr("images", "ls", namespace=namespace).stdout.splitlines()[1:]
    return {line.split()[0]: line.split()[2] for line in out if line.strip()}


def content(daemon, namespace: str = "default") -> set[str]:
    return set(daemon.ctr("content", "ls", "-q", namespace=namespace).stdout.split())


def test_ctr_import_docker_archive(daemon, images):
    dk = images["busybox-docker"]
    daemon.ctr("images", "import", "--no-unpack", str(dk.path))
    names = listing(daemon)
    assert list(names) == ["docker.io/library/busybox:latest"]
    stored = content(daemon)
    assert set(dk.configs) | set(dk.layers) <= stored
    # our own import of the same docker archive yields the very same manifest digest
    with daemon.channel() as channel:
        reqs = [archive_pb2.ImportRequest(options=archive_pb2.ImportOptions()),
                archive_pb2.ImportRequest(data=dk.path.read_bytes())]
        replies = list(archive_pb2_grpc.ArchivesStub(channel).Import(
            iter(reqs), metadata=[("containerd-namespace", "ours")]))
    ours = replies[-1].result.images[0]
    assert ours.name == "docker.io/library/busybox:latest"
    assert ours.target.digest == names["docker.io/library/busybox:latest"]


def test_ctr_import_multiplatform_and_naming_flags(daemon, images):
    mp = images["multiplatform"]
    daemon.ctr("images", "import", "--no-unpack", "--all-platforms", "--digests",
               "--base-name", "docker.io/runtimed/multiplatform",
               "--index-name", "example.com/idx:1", str(mp.path))
    names = listing(daemon)
    digest = mp.target["digest"]
    assert names == {
        mp.name: digest,
        f"docker.io/runtimed/multiplatform@{digest}": digest,
        "example.com/idx:1": names["example.com/idx:1"],
    }
    assert set(mp.blobs) <= content(daemon)


@pytest.mark.parametrize("key", ["busybox", "multilayer", "multiplatform"])
def test_ctr_export_imports_back_identically(daemon, images, key, tmp_path):
    image = images[key]
    daemon.ctr("images", "import", "--no-unpack", "--all-platforms", str(image.path))
    out = tmp_path / "exported.tar"
    daemon.ctr("images", "export", "--all-platforms", str(out), image.name)
    with tarfile.open(out) as tf:
        assert {"oci-layout", "index.json"} <= set(tf.getnames())
    daemon.ctr("images", "import", "--no-unpack", "--all-platforms", str(out), namespace="copy")
    assert listing(daemon, "copy") == {image.name: image.target["digest"]}
    assert set(image.blobs) <= content(daemon, "copy")


def test_our_export_imports_with_ctr_and_back(daemon, images, tmp_path):
    bb = images["busybox"]
    daemon.ctr("images", "import", "--no-unpack", str(bb.path))
    with daemon.channel() as channel:
        stub = archive_pb2_grpc.ArchivesStub(channel)
        data = b"".join(r.data for r in stub.Export(
            archive_pb2.ExportRequest(names=[bb.name]), metadata=MD))
    archive = tmp_path / "ours.tar"
    archive.write_bytes(data)
    daemon.ctr("images", "import", "--no-unpack", str(archive), namespace="fromours")
    assert listing(daemon, "fromours") == {bb.name: bb.target["digest"]}
    # ctr's export of the same image carries the same blobs and names as ours
    theirs = tmp_path / "theirs.tar"
    daemon.ctr("images", "export", str(theirs), bb.name)

    def summary(raw: bytes):
        with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
            index = json.loads(tf.extractfile("index.json").read())
            blobs = sorted(n for n in tf.getnames() if n.startswith("blobs/sha256/"))
            docker = json.loads(tf.extractfile("manifest.json").read())
        return ([(m["digest"], m["annotations"]) for m in index["manifests"]], blobs,
                [(d["Config"], d["RepoTags"], d["Layers"]) for d in docker])

    assert summary(data) == summary(theirs.read_bytes())
