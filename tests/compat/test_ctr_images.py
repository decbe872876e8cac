"""`ctr images import/ls/rm` and `ctr leases` against a real runtimed, with the GC checks
the content issue asks for: blobs only a deleted image referenced go; shared and leased
blobs stay."""

from __future__ import annotations

import hashlib

import pytest

from runtimed.api.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from tests import testimages


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    return testimages.build(tmp_path_factory.mktemp("images"))


def content_digests(daemon, namespace: str = "default") -> set[str]:
    return set(daemon.ctr("content", "ls", "-q", namespace=namespace).stdout.split())


def blob_exists(daemon, digest: str) -> bool:
    return (daemon.root / "content" / "blobs" / "sha256" / digest.split(":")[1]).exists()


def test_import_ls_rm_collects_everything(daemon, archives):
    busybox = archives["busybox"]
    daemon.ctr("images", "import", "--no-unpack", busybox.archive)
    listing = daemon.ctr("images", "ls").stdout
    assert busybox.name in listing and busybox.target["digest"] in listing
    assert daemon.ctr("images", "ls", "-q").stdout.split() == [busybox.name]
    stored = content_digests(daemon)
    assert set(busybox.blobs) <= stored
    daemon.ctr("images", "rm", "--sync", busybox.name)
    assert daemon.ctr("images", "ls", "-q").stdout.strip() == ""
    assert content_digests(daemon) == set()
    assert not any(blob_exists(daemon, d) for d in stored)


def test_shared_blobs_stay(daemon, archives):
    busybox, multi = archives["busybox"], archives["multiplatform"]
    daemon.ctr("images", "import", "--no-unpack", busybox.archive)
    before = content_digests(daemon)
    daemon.ctr("images", "import", "--no-unpack", multi.archive)
    only_multi = content_digests(daemon) - before
    assert multi.target["digest"] in only_multi
    assert set(busybox.blobs) & set(multi.blobs), "the test images should share busybox blobs"
    daemon.ctr("images", "rm", "--sync", multi.name)
    after = content_digests(daemon)
    assert set(busybox.blobs) <= after
    assert not (only_multi & after)
    assert not any(blob_exists(daemon, d) for d in only_multi)
    assert all(blob_exists(daemon, d) for d in busybox.blobs)


def test_leased_blobs_stay_until_lease_goes(daemon, archives):
    busybox = archives["busybox"]
    daemon.ctr("images", "import", "--no-unpack", busybox.archive)
    daemon.ctr("leases", "create", "--id", "keep", "--expires", "0", "purpose=test")
    assert "purpose=test" in daemon.ctr("leases", "ls").stdout
    manifest = busybox.manifests[0]
    with daemon.channel() as channel:
        leases_pb2_grpc.LeasesStub(channel).AddResource(
            leases_pb2.AddResourceRequest(
                id="keep", resource=leases_pb2.Resource(id=manifest, type="content")
            ),
            metadata=[("containerd-namespace", "default")],
        )
    daemon.ctr("images", "rm", "--sync", busybox.name)
    kept = content_digests(daemon)
    # the manifest is leased; its config and layers hang off it
    assert {manifest, *busybox.configs, *busybox.layers} <= kept
    daemon.ctr("leases", "rm", "--sync", "keep")
    assert content_digests(daemon) == set()
    assert daemon.ctr("leases", "ls", "-q").stdout.strip() == ""


def test_leases_create_ls_rm(daemon):
    daemon.ctr("leases", "create", "--id", "one", "a=1")
    generated = daemon.ctr("leases", "create", "b=2").stdout.split()[0]
    ids = daemon.ctr("leases", "ls", "-q").stdout.split()
    assert sorted(ids) == sorted(["one", generated])
    assert "one" not in daemon.ctr("leases", "ls", "-q", namespace="elsewhere").stdout
    daemon.ctr("leases", "rm", "one")
    assert daemon.ctr("leases", "ls", "-q").stdout.split() == [generated]
    missing = daemon.ctr("leases", "rm", "one", check=False)
    assert missing.returncode != 0 and "not found" in missing.stderr
    # ids as containerd clients generate them ("<ns>-<base64url>") are accepted
    daemon.ctr("leases", "create", "--id", "126241456-_Xv7")
    assert "126241456-_Xv7" in daemon.ctr("leases", "ls", "-q").stdout.split()


def test_same_image_in_two_namespaces(daemon, archives):
    busybox = archives["busybox"]
    daemon.ctr("images", "import", "--no-unpack", busybox.archive, namespace="a")
    daemon.ctr("images", "import", "--no-unpack", busybox.archive, namespace="b")
    assert set(busybox.blobs) <= content_digests(daemon, "b")
    daemon.ctr("images", "rm", "--sync", busybox.name, namespace="a")
    assert content_digests(daemon, "a") == set()
    assert set(busybox.blobs) <= content_digests(daemon, "b")
    assert all(blob_exists(daemon, d) for d in busybox.blobs)
    layer = busybox.layers[0]
    got = daemon.ctr("content", "get", layer, namespace="b", input=b"").stdout
    assert "sha256:" + hashlib.sha256(got).hexdigest() == layer


def test_prune_references_frees_layers(daemon, archives):
    """As in containerd: with the layer labels gone the layers are collectable (an unpacked
    image keeps its files in snapshots)."""
    busybox = archives["busybox"]
    daemon.ctr("images", "import", "--no-unpack", busybox.archive)
    daemon.ctr("content", "prune", "references")
    left = content_digests(daemon)
    assert busybox.manifests[0] in left and busybox.configs[0] in left
    assert not set(busybox.layers) & left
