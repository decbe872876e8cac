"""Hostile requests that must be refused with the right status and leave no trace: bad IDs,
huge labels, unknown namespaces, wrong type URLs, invalid OCI specs, a blob whose bytes do
not match its digest, a pull from a registry that is not there. After each refusal the
metadata (every row of meta.db), the blobs, volumes and snapshot directories, the bundles
and the mounts are exactly as before."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3

import grpc
import pytest

from runtimed.api.containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
from runtimed.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from runtimed.api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from runtimed.api.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from runtimed.api.containerd.services.namespaces.v1 import namespace_pb2, namespace_pb2_grpc
from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from runtimed.api.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from runtimed.api.containerd.types import descriptor_pb2, mount_pb2
from runtimed.api.registry.v1 import registry_pb2, registry_pb2_grpc
from runtimed.api.volumes.v1 import volumes_pb2, volumes_pb2_grpc
from tests.conftest import mounts_under
from tests.shim.conftest import make_rootfs
from tests.torture import stats
from tests.torture.helpers import md, version

SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
HUGE = "v" * (1 << 20)
BAD_IDS = ["", "../escape", "a/b", "x" * 300, "-lead", "sp ace", "nul\x00"]


def fingerprint(daemon, tables: tuple[str, ...] = ()) -> dict:
    """Everything a refused request must leave alone (but rows of `tables`)."""
    db = sqlite3.connect(f"file:{daemon.root / 'meta.db'}?mode=ro", uri=True)
    try:
        rows = "\n".join(row for row in db.iterdump()
                         if not row.startswith(tuple(f'INSERT INTO "{t}"' for t in tables)))
    finally:
        db.close()
    files = sorted(
        os.path.relpath(os.path.join(d, f), daemon.base)
        for top in (daemon.root / "content" / "blobs", daemon.root / "volumes",
                    daemon.root / "snapshots", daemon.state / "tasks")
        for d, dirs, fs in os.walk(top) for f in fs + dirs
    )
    return {"db": hashlib.sha256(rows.encode()).hexdigest(), "files": files,
            "mounts": sorted(mounts_under(daemon.base))}


@pytest.fixture
def stubs(daemon, ns):
    with daemon.channel() as channel:
        namespace_pb2_grpc.NamespacesStub(channel).Create(
            namespace_pb2.CreateNamespaceRequest(namespace=namespace_pb2.Namespace(name=ns)))
        yield channel


def refused(daemon, codes: set[grpc.StatusCode], call, tables: tuple[str, ...] = ()) -> str:
    """Run `call`; it must fail with one of `codes` and change nothing (but rows of
    `tables`)."""
    before = fingerprint(daemon, tables)
    with pytest.raises(grpc.RpcError) as info:
        call()
    stats.record("inputs")
    assert info.value.code() in codes, (info.value.code(), info.value.details())
    assert fingerprint(daemon, tables) == before
    return info.value.details()


INVALID = {grpc.StatusCode.INVALID_ARGUMENT}


def container(id: str, spec: bytes = b"{}", type_url: str = SPEC_URL, labels=None):
    c = containers_pb2.Container(id=id, labels=labels or {}, snapshotter="overlayfs")
    c.runtime.name = "io.containerd.runc.v2"
    c.spec.type_url = type_url
    c.spec.value = spec
    return containers_pb2.CreateContainerRequest(container=c)


def test_bad_ids_and_huge_labels_are_refused(daemon, stubs, ns):
    containers = containers_pb2_grpc.ContainersStub(stubs)
    leases = leases_pb2_grpc.LeasesStub(stubs)  # any non-empty id, as containerd
    volumes = volumes_pb2_grpc.VolumesStub(stubs)
    namespaces = namespace_pb2_grpc.NamespacesStub(stubs)
    for bad in BAD_IDS:
        refused(daemon, INVALID, lambda b=bad: containers.Create(container(b), metadata=md(ns)))
        if bad:  # an empty name asks for a generated one
            refused(daemon, INVALID, lambda b=bad: volumes.Create(
                volumes_pb2.CreateVolumeRequest(name=b), metadata=md(ns)))
        refused(daemon, INVALID, lambda b=bad: namespaces.Create(
            namespace_pb2.CreateNamespaceRequest(namespace=namespace_pb2.Namespace(name=b))))
    for labels in ({"k": HUGE}, {HUGE[:5000]: "v"}, {"": "v"}):
        refused(daemon, INVALID, lambda lb=labels: containers.Create(
            container("ok", labels=lb), metadata=md(ns)))
        refused(daemon, INVALID, lambda lb=labels: leases.Create(
            leases_pb2.CreateRequest(id="l1", labels=lb), metadata=md(ns)))
        refused(daemon, INVALID, lambda lb=labels: namespaces.Update(
            namespace_pb2.UpdateNamespaceRequest(
                namespace=namespace_pb2.Namespace(name=ns, labels=lb))))
    assert not (daemon.base.parent / "escape").exists()


def test_unknown_namespaces_are_not_created_by_reads_or_refusals(daemon, stubs):
    images = images_pb2_grpc.ImagesStub(stubs)
    containers = containers_pb2_grpc.ContainersStub(stubs)
    tasks = tasks_pb2_grpc.TasksStub(stubs)
    ghost = md("trt-ghost")
    found = {grpc.StatusCode.NOT_FOUND}
    refused(daemon, found, lambda: images.Get(images_pb2.GetImageRequest(name="x"),
                                              metadata=ghost))
    refused(daemon, found, lambda: containers.Get(
        containers_pb2.GetContainerRequest(id="x"), metadata=ghost))
    refused(daemon, found, lambda: tasks.Start(tasks_pb2.StartRequest(container_id="x"),
                                               metadata=ghost))
    refused(daemon, INVALID, lambda: images.List(images_pb2.ListImagesRequest(),
                                                 metadata=md("Bad/Namespace")))
    names = [n.name for n in namespace_pb2_grpc.NamespacesStub(stubs).List(
        namespace_pb2.ListNamespacesRequest()).namespaces]
    assert "trt-ghost" not in names


def test_wrong_type_urls_and_invalid_specs_are_refused(daemon, stubs, ns, tmp_path):
    containers = containers_pb2_grpc.ContainersStub(stubs)
    tasks = tasks_pb2_grpc.TasksStub(stubs)
    images = images_pb2_grpc.ImagesStub(stubs)
    refused(daemon, INVALID, lambda: images.Create(images_pb2.CreateImageRequest(
        image=images_pb2.Image(name="x", target=descriptor_pb2.Descriptor(
            media_type="m", digest="sha256:nothex", size=1))), metadata=md(ns)))
    # records are stored as given (containerd does not read a spec before Tasks.Create)...
    specs = {
        "wrongurl": (b"{}", "types.googleapis.com/google.protobuf.Empty"),
        "notjson": (b"{not json", SPEC_URL),
        "noprocess": (json.dumps({"ociVersion": "1.0.2", "root": {"path": "rootfs"}}).encode(),
                      SPEC_URL),
        "badargs": (json.dumps({"ociVersion": "1.0.2", "process": {"args": 5, "cwd": "/"},
                                "root": {"path": "rootfs"}}).encode(), SPEC_URL),
    }
    for id, (value, url) in specs.items():
        containers.Create(container(id, value, url), metadata=md(ns))
    # ...and a task is never made from them: a clear refusal, no bundle, no mount, no shim
    codes = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}
    make_rootfs(tmp_path / "rootfs")
    good = [mount_pb2.Mount(type="bind", source=str(tmp_path / "rootfs"), options=["rbind"])]
    missing = [mount_pb2.Mount(type="bind", source="/nonexistent-rootfs", options=["rbind"])]
    for rootfs in (missing, good):
        for id in specs:
            details = refused(daemon, codes, lambda i=id, r=rootfs: tasks.Create(
                tasks_pb2.CreateTaskRequest(container_id=i, rootfs=r), metadata=md(ns),
                timeout=60))
            assert details
    for id in specs:
        containers.Delete(containers_pb2.DeleteContainerRequest(id=id), metadata=md(ns))


def test_a_blob_not_matching_its_digest_is_never_visible(daemon, stubs, ns):
    content = content_pb2_grpc.ContentStub(stubs)
    data = os.urandom(1 << 16)
    lie = "sha256:" + hashlib.sha256(b"something else").hexdigest()

    def write():
        requests = [
            content_pb2.WriteContentRequest(action=content_pb2.WRITE, ref="liar", data=data,
                                            expected=lie, total=len(data)),
            content_pb2.WriteContentRequest(action=content_pb2.COMMIT, ref="liar",
                                            offset=len(data), expected=lie, total=len(data)),
        ]
        for _ in content.Write(iter(requests), metadata=md(ns), timeout=30):
            pass

    before = fingerprint(daemon)
    with pytest.raises(grpc.RpcError) as info:
        write()
    stats.record("inputs")
    assert info.value.code() in {grpc.StatusCode.FAILED_PRECONDITION,
                                 grpc.StatusCode.INVALID_ARGUMENT}
    assert fingerprint(daemon)["files"] == before["files"]  # the open ingest is metadata-free
    with pytest.raises(grpc.RpcError) as info:
        content.Info(content_pb2.InfoRequest(digest=lie), metadata=md(ns))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    content.Abort(content_pb2.AbortRequest(ref="liar"), metadata=md(ns))


def test_snapshot_and_pull_refusals(daemon, stubs, ns):
    snapshots = snapshots_pb2_grpc.SnapshotsStub(stubs)
    refused(daemon, {grpc.StatusCode.NOT_FOUND}, lambda: snapshots.Prepare(
        snapshots_pb2.PrepareSnapshotRequest(snapshotter="overlayfs", key="k",
                                             parent="no-such-parent"), metadata=md(ns)))
    refused(daemon, INVALID | {grpc.StatusCode.NOT_FOUND}, lambda: snapshots.Prepare(
        snapshots_pb2.PrepareSnapshotRequest(snapshotter="../../etc", key="k"), metadata=md(ns)))
    registry = registry_pb2_grpc.RegistryStub(stubs)

    def pull(reference: str):
        request = registry_pb2.PullRequest(reference=reference, unpack=True)
        request.options.plain_http = True
        for _ in registry.Pull(request, metadata=md(ns), timeout=60):
            pass

    # nothing listens on port 1 of loopback: no traffic leaves this machine. A transient
    # failure leaves the pull's lease to expire (an hour), keeping partial downloads for a
    # retry (runtimed/images/registry/transfer.py); nothing else.
    refused(daemon, {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION},
            lambda: pull("127.0.0.1:1/library/busybox:latest"), tables=("leases",))
    refused(daemon, INVALID, lambda: pull("127.0.0.1:1/UPPER//bad:tag:tag"))
    assert version(stubs)


def test_out_of_range_enums_and_timestamps(daemon, stubs, ns):
    """Found by the fuzzer: values the wire allows but Python's types refuse."""
    from runtimed.api.containerd.services.events.v1 import events_pb2, events_pb2_grpc

    snapshots = snapshots_pb2_grpc.SnapshotsStub(stubs)
    snapshots.Prepare(snapshots_pb2.PrepareSnapshotRequest(snapshotter="native", key="s1"),
                      metadata=md(ns))
    request = snapshots_pb2.UpdateSnapshotRequest(snapshotter="native")
    request.info.name, request.info.kind = "s1", -1
    request.info.labels["a"] = "b"
    request.update_mask.paths.append("labels.a")
    info = snapshots.Update(request, metadata=md(ns)).info  # kind is ignored by update
    assert info.labels["a"] == "b"
    events = events_pb2_grpc.EventsStub(stubs)
    forward = events_pb2.ForwardRequest()
    forward.envelope.namespace, forward.envelope.topic = ns, "/x"
    forward.envelope.timestamp.nanos = -1
    forward.envelope.event.type_url = "x"
    refused(daemon, INVALID, lambda: events.Forward(forward))
    snapshots.Remove(snapshots_pb2.RemoveSnapshotRequest(snapshotter="native", key="s1"),
                     metadata=md(ns))
