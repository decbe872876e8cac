"""Volumes over the wire: lifecycle, in-use refusal, persistence, prune, populate."""

import json
import os

import grpc
import pytest

from runtimed.api.containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
from runtimed.api.volumes.v1 import volumes_pb2 as pb
from runtimed.api.volumes.v1 import volumes_pb2_grpc

NS = [("containerd-namespace", "vols")]


def volumes(daemon):
    return volumes_pb2_grpc.VolumesStub(daemon.channel())


def create_container_mounting(daemon, cid, source):
    c = containers_pb2.Container(id=cid)
    c.runtime.name = "io.containerd.runc.v2"
    c.spec.type_url = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
    c.spec.value = json.dumps({"ociVersion": "1.0.2", "mounts": [
        {"destination": "/data", "type": "bind", "source": source, "options": ["rbind"]}]}).encode()
    containers_pb2_grpc.ContainersStub(daemon.channel()).Create(
        containers_pb2.CreateContainerRequest(container=c), metadata=NS)


def test_volume_lifecycle_and_in_use_refusal(daemon):
    stub = volumes(daemon)
    vol = stub.Create(pb.CreateVolumeRequest(name="data", labels={"app": "db"}), metadata=NS).volume
    assert vol.mountpoint == f"{daemon.root}/volumes/vols/data/_data"
    assert os.path.isdir(vol.mountpoint)
    # creating it again returns the same volume (docker volume create is idempotent)
    again = stub.Create(pb.CreateVolumeRequest(name="data"), metadata=NS).volume
    assert again.mountpoint == vol.mountpoint and dict(again.labels) == {"app": "db"}
    with open(os.path.join(vol.mountpoint, "f"), "w") as f:
        f.write("x" * 10000)
    create_container_mounting(daemon, "c1", vol.mountpoint)
    got = stub.Get(pb.GetVolumeRequest(name="data"), metadata=NS).volume
    assert list(got.used_by) == ["c1"] and got.size >= 10000

    with pytest.raises(grpc.RpcError) as err:
        stub.Remove(pb.RemoveVolumeRequest(name="data"), metadata=NS)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "in use by container(s) c1" in err.value.details()

    containers_pb2_grpc.ContainersStub(daemon.channel()).Delete(
        containers_pb2.DeleteContainerRequest(id="c1"), metadata=NS)
    # data survives the container and a daemon restart
    daemon.restart()
    stub = volumes(daemon)
    assert [v.name for v in stub.List(pb.ListVolumesRequest(), metadata=NS).volumes] == ["data"]
    with open(os.path.join(vol.mountpoint, "f")) as f:
        assert f.read() == "x" * 10000
    assert stub.Remove(pb.RemoveVolumeRequest(name="data"), metadata=NS).reclaimed >= 10000
    assert not os.path.exists(os.path.dirname(vol.mountpoint))
    with pytest.raises(grpc.RpcError) as err:
        stub.Get(pb.GetVolumeRequest(name="data"), metadata=NS)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_anonymous_volumes_filters_and_prune(daemon):
    stub = volumes(daemon)
    anon = stub.Create(pb.CreateVolumeRequest(), metadata=NS).volume
    assert anon.anonymous and len(anon.name) == 64
    named = stub.Create(pb.CreateVolumeRequest(name="keep", labels={"tier": "gold"}), metadata=NS).volume
    used = stub.Create(pb.CreateVolumeRequest(anonymous=True, name="used"), metadata=NS).volume
    create_container_mounting(daemon, "c2", used.mountpoint + "/sub")
    listed = stub.List(pb.ListVolumesRequest(filters=["labels.tier==gold"]), metadata=NS).volumes
    assert [v.name for v in listed] == ["keep"]
    dangling = stub.List(pb.ListVolumesRequest(filters=["dangling==true"]), metadata=NS).volumes
    assert sorted(v.name for v in dangling) == sorted([anon.name, "keep"])
    pruned = stub.Prune(pb.PruneVolumesRequest(), metadata=NS)
    assert list(pruned.removed) == [anon.name]  # named and in-use volumes stay
    pruned = stub.Prune(pb.PruneVolumesRequest(all=True), metadata=NS)
    assert list(pruned.removed) == ["keep"]
    assert [v.name for v in stub.List(pb.ListVolumesRequest(), metadata=NS).volumes] == ["used"]
    assert named.mountpoint and not os.path.exists(named.mountpoint)
    containers_pb2_grpc.ContainersStub(daemon.channel()).Delete(
        containers_pb2.DeleteContainerRequest(id="c2"), metadata=NS)
    stub.Remove(pb.RemoveVolumeRequest(name="used"), metadata=NS)


def test_bad_volume_requests(daemon):
    stub = volumes(daemon)
    for request, code in [
        (pb.CreateVolumeRequest(name="../etc"), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.CreateVolumeRequest(name="v", driver="nfs"), grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            stub.Create(request, metadata=NS)
        assert err.value.code() == code
    with pytest.raises(grpc.RpcError) as err:
        stub.Remove(pb.RemoveVolumeRequest(name="nope"), metadata=NS)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "volume 'nope' not found" in err.value.details()


def test_orphan_volume_directory_is_repaired_on_start(daemon):
    orphan = daemon.root / "volumes" / "vols" / "half" / "_data"
    orphan.mkdir(parents=True)
    daemon.restart()
    assert not orphan.parent.exists()
