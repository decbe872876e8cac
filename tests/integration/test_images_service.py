"""Images and Leases services over gRPC on a real runtimed: CRUD, field masks, filters,
events, namespaces that still hold images or content."""

from __future__ import annotations

import hashlib
import json
import queue
import threading

import grpc
import pytest

from runtimed.api.containerd.events import content_pb2 as content_events
from runtimed.api.containerd.events import image_pb2 as image_events
from runtimed.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from runtimed.api.containerd.services.events.v1 import events_pb2, events_pb2_grpc
from runtimed.api.containerd.services.images.v1 import images_pb2 as pb
from runtimed.api.containerd.services.images.v1 import images_pb2_grpc
from runtimed.api.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from runtimed.api.containerd.services.namespaces.v1 import namespace_pb2, namespace_pb2_grpc
from runtimed.api.containerd.types import descriptor_pb2

MD = [("containerd-namespace", "default")]
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write(channel, data: bytes, labels=None, metadata=MD) -> str:
    stub = content_pb2_grpc.ContentStub(channel)
    req = content_pb2.WriteContentRequest(
        action=content_pb2.COMMIT, ref=f"w-{digest_of(data)}", data=data, total=len(data),
        expected=digest_of(data), labels=labels or {},
    )
    reply = next(stub.Write(iter([req]), metadata=metadata))
    return reply.digest


def image(name: str, digest: str, size: int = 10, **labels) -> pb.Image:
    return pb.Image(
        name=name, labels=labels,
        target=descriptor_pb2.Descriptor(media_type=MANIFEST, digest=digest, size=size),
    )


class Events:
    """Collects events from Events.Subscribe in a thread."""

    def __init__(self, channel, filters):
        self.items: queue.Queue = queue.Queue()
        # connected first: calls started while a channel connects may leave in any order,
        # and a Create sent before the Subscribe would publish its event to nobody
        grpc.channel_ready_future(channel).result(timeout=10)
        self.call = events_pb2_grpc.EventsStub(channel).Subscribe(
            events_pb2.SubscribeRequest(filters=filters)
        )
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for envelope in self.call:
                self.items.put(envelope)
        except grpc.RpcError:
            pass

    def next(self):
        return self.items.get(timeout=10)

    def close(self):
        self.call.cancel()
        self.thread.join(5)


def test_images_crud_masks_filters_events(daemon):
    with daemon.channel() as channel:
        stub = images_pb2_grpc.ImagesStub(channel)
        events = Events(channel, ['topic~="^/images/"'])
        try:
            d1 = digest_of(b"one")
            created = stub.Create(pb.CreateImageRequest(image=image("a:1", d1, color="red")), metadata=MD).image
            assert created.created_at.seconds > 0 and created.target.digest == d1
            ev = events.next()
            assert ev.topic == "/images/create" and ev.namespace == "default"
            assert ev.event.type_url == "containerd.services.images.v1.ImageCreate"
            msg = image_events.ImageCreate.FromString(ev.event.value)
            assert (msg.name, dict(msg.labels)) == ("a:1", {"color": "red"})

            with pytest.raises(grpc.RpcError) as err:
                stub.Create(pb.CreateImageRequest(image=image("a:1", d1)), metadata=MD)
            assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
            with pytest.raises(grpc.RpcError) as err:
                stub.Create(pb.CreateImageRequest(image=image("bad", "sha256:123")), metadata=MD)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            stub.Create(pb.CreateImageRequest(image=image("b:2", digest_of(b"two"), shape="round")), metadata=MD)
            events.next()

            names = lambda *f: [i.name for i in stub.List(pb.ListImagesRequest(filters=list(f)), metadata=MD).images]  # noqa: E731
            assert names() == ["a:1", "b:2"]
            assert names("name==b:2") == ["b:2"]
            assert names(f"target.digest=={d1}") == ["a:1"]
            assert names("labels.color==red", "labels.shape==round") == ["a:1", "b:2"]
            assert names(f"target.mediatype=={MANIFEST}") == ["a:1", "b:2"]

            # with a mask only the named label changes
            upd = stub.Update(pb.UpdateImageRequest(
                image=image("a:1", digest_of(b"ignored"), size=99, color="blue", extra="x"),
                update_mask={"paths": ["labels.color"]}), metadata=MD).image
            assert dict(upd.labels) == {"color": "blue"} and upd.target.digest == d1
            assert upd.created_at == created.created_at and upd.updated_at != created.updated_at
            assert events.next().topic == "/images/update"
            # without a mask the record is replaced
            upd = stub.Update(pb.UpdateImageRequest(image=image("a:1", digest_of(b"new"), size=7)), metadata=MD).image
            assert dict(upd.labels) == {} and upd.target.digest == digest_of(b"new") and upd.target.size == 7
            events.next()
            with pytest.raises(grpc.RpcError) as err:
                stub.Update(pb.UpdateImageRequest(image=image("a:1", d1), update_mask={"paths": ["name"]}), metadata=MD)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            got = stub.Get(pb.GetImageRequest(name="a:1"), metadata=MD).image
            assert got.target.size == 7
            stub.Delete(pb.DeleteImageRequest(name="a:1", sync=True), metadata=MD)
            ev = events.next()
            msg = image_events.ImageDelete.FromString(ev.event.value)
            assert ev.topic == "/images/delete" and msg.name == "a:1"
            for call in (lambda: stub.Get(pb.GetImageRequest(name="a:1"), metadata=MD),
                         lambda: stub.Delete(pb.DeleteImageRequest(name="a:1"), metadata=MD)):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert names() == ["b:2"]
            assert stub.List(pb.ListImagesRequest(), metadata=[("containerd-namespace", "x")]).images == []
        finally:
            events.close()


def test_image_delete_sync_collects_and_publishes_content_delete(daemon):
    with daemon.channel() as channel:
        layer = write(channel, b"layer bytes")
        config = write(channel, b'{"config": 1}')
        manifest_bytes = json.dumps({
            "schemaVersion": 2, "mediaType": MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 13},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": 11}],
        }).encode()
        manifest = write(channel, manifest_bytes)
        stub = images_pb2_grpc.ImagesStub(channel)
        stub.Create(pb.CreateImageRequest(image=image("img", manifest, len(manifest_bytes))), metadata=MD)
        content = content_pb2_grpc.ContentStub(channel)
        listed = lambda: {i.digest for r in content.List(content_pb2.ListContentRequest(), metadata=MD) for i in r.info}  # noqa: E731
        assert listed() == {layer, config, manifest}
        stub.Delete(pb.DeleteImageRequest(name="img", sync=True), metadata=MD)
        assert listed() == set()

        events = Events(channel, ['topic=="/content/delete"'])
        try:
            d = write(channel, b"to delete")
            content.Delete(content_pb2.DeleteContentRequest(digest=d), metadata=MD)
            msg = content_events.ContentDelete.FromString(events.next().event.value)
            assert msg.digest == d
        finally:
            events.close()


def test_namespace_with_images_or_content_is_not_deleted(daemon):
    with daemon.channel() as channel:
        ns = namespace_pb2_grpc.NamespacesStub(channel)
        md = [("containerd-namespace", "busy")]
        d = write(channel, b"held", metadata=md)
        with pytest.raises(grpc.RpcError) as err:
            ns.Delete(namespace_pb2.DeleteNamespaceRequest(name="busy"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "blobs" in err.value.details()
        content_pb2_grpc.ContentStub(channel).Delete(content_pb2.DeleteContentRequest(digest=d), metadata=md)
        ns.Delete(namespace_pb2.DeleteNamespaceRequest(name="busy"))


def test_leases_service(daemon):
    with daemon.channel() as channel:
        stub = leases_pb2_grpc.LeasesStub(channel)
        generated = stub.Create(leases_pb2.CreateRequest(labels={"k": "v"}), metadata=MD).lease
        assert generated.id and generated.created_at.seconds > 0
        stub.Create(leases_pb2.CreateRequest(id="mine"), metadata=MD)
        with pytest.raises(grpc.RpcError) as err:
            stub.Create(leases_pb2.CreateRequest(id="mine"), metadata=MD)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        ids = [x.id for x in stub.List(leases_pb2.ListRequest(filters=["labels.k==v"]), metadata=MD).leases]
        assert ids == [generated.id]

        # content written under the lease (containerd-lease metadata) is recorded in it
        leased_md = [*MD, ("containerd-lease", "mine")]
        d = write(channel, b"leased data", metadata=leased_md)
        resources = stub.ListResources(leases_pb2.ListResourcesRequest(id="mine"), metadata=MD).resources
        assert [(r.type, r.id) for r in resources] == [("content", d)]
        stub.AddResource(leases_pb2.AddResourceRequest(
            id="mine", resource=leases_pb2.Resource(id="snap-1", type="snapshots/overlayfs")), metadata=MD)
        with pytest.raises(grpc.RpcError) as err:
            stub.AddResource(leases_pb2.AddResourceRequest(
                id="mine", resource=leases_pb2.Resource(id="x", type="volumes")), metadata=MD)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        stub.DeleteResource(leases_pb2.DeleteResourceRequest(
            id="mine", resource=leases_pb2.Resource(id="snap-1", type="snapshots/overlayfs")), metadata=MD)
        assert len(stub.ListResources(leases_pb2.ListResourcesRequest(id="mine"), metadata=MD).resources) == 1

        content = content_pb2_grpc.ContentStub(channel)
        stub.Delete(leases_pb2.DeleteRequest(id="mine", sync=True), metadata=MD)
        with pytest.raises(grpc.RpcError) as err:
            content.Info(content_pb2.InfoRequest(digest=d), metadata=MD)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            stub.Delete(leases_pb2.DeleteRequest(id="mine"), metadata=MD)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            write(channel, b"x", metadata=[*MD, ("containerd-lease", "gone")])
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
