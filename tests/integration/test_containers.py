"""Containers service: records, field masks, the fast List path, ctr's container verbs."""

import json

import grpc
import pytest
from google.protobuf import field_mask_pb2

from runtimed.api.containerd.services.containers.v1 import containers_pb2 as pb
from runtimed.api.containerd.services.containers.v1 import containers_pb2_grpc

SPEC_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/Spec"


def container(cid, **labels):
    c = pb.Container(id=cid, labels=labels, image="docker.io/library/busybox:latest",
                     snapshotter="overlayfs", snapshot_key=cid)
    c.runtime.name = "io.containerd.runc.v2"
    c.spec.type_url = SPEC_TYPE
    c.spec.value = json.dumps({"ociVersion": "1.0.2", "process": {"args": ["sh"]}}).encode()
    return c


def test_list_stays_current_through_updates_and_deletes(daemon):
    stub = containers_pb2_grpc.ContainersStub(daemon.channel())
    for cid in ("a", "b", "c"):
        stub.Create(pb.CreateContainerRequest(container=container(cid, tier="web")))
    assert [c.id for c in stub.List(pb.ListContainersRequest()).containers] == ["a", "b", "c"]

    update = pb.UpdateContainerRequest(container=container("b", tier="db", extra="x"),
                                       update_mask=field_mask_pb2.FieldMask(paths=["labels.tier"]))
    assert dict(stub.Update(update).container.labels) == {"tier": "db"}
    listed = {c.id: dict(c.labels) for c in stub.List(pb.ListContainersRequest()).containers}
    assert listed == {"a": {"tier": "web"}, "b": {"tier": "db"}, "c": {"tier": "web"}}

    stub.Delete(pb.DeleteContainerRequest(id="a"))
    assert [c.id for c in stub.List(pb.ListContainersRequest()).containers] == ["b", "c"]
    filtered = stub.List(pb.ListContainersRequest(filters=["labels.tier==db"])).containers
    assert [c.id for c in filtered] == ["b"]
    streamed = [m.container.id for m in stub.ListStream(pb.ListContainersRequest(filters=["id~=c"]))]
    assert streamed == ["c"]
    got = stub.Get(pb.GetContainerRequest(id="b")).container
    assert got.created_at.ToNanoseconds() < got.updated_at.ToNanoseconds()
    assert json.loads(got.spec.value) == {"ociVersion": "1.0.2", "process": {"args": ["sh"]}}


def test_container_rules_give_clear_statuses(daemon):
    stub = containers_pb2_grpc.ContainersStub(daemon.channel())
    stub.Create(pb.CreateContainerRequest(container=container("a")))
    cases = [
        (lambda: stub.Create(pb.CreateContainerRequest(container=container("a"))),
         grpc.StatusCode.ALREADY_EXISTS, "already exists"),
        (lambda: stub.Create(pb.CreateContainerRequest(container=pb.Container(id="x"))),
         grpc.StatusCode.INVALID_ARGUMENT, "runtime name must be set"),
        (lambda: stub.Create(pb.CreateContainerRequest(container=container("bad id"))),
         grpc.StatusCode.INVALID_ARGUMENT, "container id"),
        (lambda: stub.Get(pb.GetContainerRequest(id="nope")), grpc.StatusCode.NOT_FOUND, "nope"),
        (lambda: stub.Update(pb.UpdateContainerRequest(
            container=container("a"), update_mask=field_mask_pb2.FieldMask(paths=["runtime"]))),
         grpc.StatusCode.INVALID_ARGUMENT, "cannot update 'runtime'"),
        (lambda: stub.List(pb.ListContainersRequest(filters=["id=="])),
         grpc.StatusCode.INVALID_ARGUMENT, "parse error"),
    ]
    for call, code, text in cases:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == code
        assert text in err.value.details()
    changed = container("a")
    changed.snapshotter = "native"
    with pytest.raises(grpc.RpcError) as err:
        stub.Update(pb.UpdateContainerRequest(container=changed))
    assert "snapshotter is immutable" in err.value.details()


def test_ctr_container_verbs(daemon):
    stub = containers_pb2_grpc.ContainersStub(daemon.channel())
    stub.Create(pb.CreateContainerRequest(container=container("web1", app="shop")))
    out = daemon.ctr("containers", "ls").stdout.splitlines()
    assert out[1].split() == ["web1", "docker.io/library/busybox:latest", "io.containerd.runc.v2"]
    info = json.loads(daemon.ctr("containers", "info", "web1").stdout)
    assert info["ID"] == "web1" and info["Labels"] == {"app": "shop"}
    daemon.ctr("containers", "label", "web1", "env=prod")
    assert json.loads(daemon.ctr("containers", "info", "web1").stdout)["Labels"] == {
        "app": "shop", "env": "prod"}
    assert daemon.ctr("containers", "ls", "-q", "labels.env==prod").stdout.split() == ["web1"]
    daemon.ctr("containers", "rm", "web1")
    assert daemon.ctr("containers", "ls", "-q").stdout.split() == []
