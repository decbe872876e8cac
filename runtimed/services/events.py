"""containerd.services.events.v1.Events over `daemon.exchange`."""

from __future__ import annotations

from google.protobuf import empty_pb2

from runtimed import identifiers
from runtimed.api.containerd.services.events.v1 import events_pb2 as pb
from runtimed.api.containerd.services.events.v1 import events_pb2_grpc
from runtimed.errors import InvalidArgument
from runtimed.events.exchange import Event
from runtimed.services.base import namespace, service


def to_envelope(event: Event) -> pb.Envelope:
    envelope = pb.Envelope(namespace=event.namespace, topic=event.topic)
    envelope.timestamp.FromNanoseconds(event.timestamp_ns)
    envelope.event.type_url = event.type_url
    envelope.event.value = event.value
    return envelope


@service
class EventsService(events_pb2_grpc.EventsServicer):
    def __init__(self, exchange):
        self.exchange = exchange

    async def Publish(self, request, context):
        if not request.event.type_url:
            raise InvalidArgument("event must be set (a google.protobuf.Any with a type URL)")
        ns = namespace(context)
        self.exchange.forward(
            Event(_now(), ns, request.topic, request.event.type_url, request.event.value)
        )
        return empty_pb2.Empty()

    async def Forward(self, request, context):
        envelope = request.envelope
        identifiers.validate(envelope.namespace, "namespace")
        if not envelope.event.type_url:
            raise InvalidArgument("envelope event must be set (a google.protobuf.Any with a type URL)")
        try:
            timestamp = envelope.timestamp.ToNanoseconds()
        except ValueError as exc:
            raise InvalidArgument(f"envelope timestamp: {exc}") from None
        self.exchange.forward(
            Event(timestamp or _now(), envelope.namespace,
                  envelope.topic, envelope.event.type_url, envelope.event.value)
        )
        return empty_pb2.Empty()

    async def Subscribe(self, request, context):
        subscription = self.exchange.subscribe(list(request.filters))
        try:
            async for event in subscription:
                yield to_envelope(event)
        finally:
            self.exchange.unsubscribe(subscription)


def _now() -> int:
    import time

    return time.time_ns()


def register(server, daemon) -> None:
    events_pb2_grpc.add_EventsServicer_to_server(EventsService(daemon.exchange), server)
