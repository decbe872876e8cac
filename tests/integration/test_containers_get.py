"""Containers.Get answers from cached wire encodings: it must stay current through
updates, deletes and re-creation under the same id, and per namespace."""

import grpc
import pytest
from google.protobuf import field_mask_pb2

from runtimed.api.containerd.services.containers.v1 import containers_pb2 as pb
from runtimed.api.containerd.services.containers.v1 import containers_pb2_grpc

SPEC_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/Spec"


def container(cid, image="docker.io/library/busybox:latest", **labels):
    c = pb.Container(id=cid, labels=labels, image=image)
    c.runtime.name = "io.containerd.runc.v2"
    c.spec.type_url = SPEC_TYPE
    c.spec.value = b'{"ociVersion": "1.0.2"}'
    return c


def test_get_stays_current(daemon):
    stub = containers_pb2_grpc.ContainersStub(daemon.channel())
    one, two = [("containerd-namespace", "one")], [("containerd-namespace", "two")]
    stub.Create(pb.CreateContainerRequest(container=container("c", tier="web")), metadata=one)
    stub.Create(pb.CreateContainerRequest(container=container("c", image="alpine")), metadata=two)
    assert dict(stub.Get(pb.GetContainerRequest(id="c"), metadata=one).container.labels) == {
        "tier": "web"}
    assert stub.Get(pb.GetContainerRequest(id="c"), metadata=two).container.image == "alpine"

    stub.Update(pb.UpdateContainerRequest(
        container=container("c", tier="db"),
        update_mask=field_mask_pb2.FieldMask(paths=["labels.tier"])), metadata=one)
    got = stub.Get(pb.GetContainerRequest(id="c"), metadata=one).container
    assert dict(got.labels) == {"tier": "db"}
    assert got.created_at.ToNanoseconds() < got.updated_at.ToNanoseconds()
    assert got.runtime.name == "io.containerd.runc.v2" and got.spec.value == b'{"ociVersion": "1.0.2"}'

    stub.Delete(pb.DeleteContainerRequest(id="c"), metadata=one)
    with pytest.raises(grpc.RpcError) as err:
        stub.Get(pb.GetContainerRequest(id="c"), metadata=one)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    stub.Create(pb.CreateContainerRequest(container=container("c", tier="new")), metadata=one)
    assert dict(stub.Get(pb.GetContainerRequest(id="c"), metadata=one).container.labels) == {
        "tier": "new"}
    assert stub.Get(pb.GetContainerRequest(id="c"), metadata=two).container.image == "alpine"
