"""containerd.services.events.v1.Events over `daemon.exchange`.

Subscribe streams write each event's Envelope as bytes the exchange encoded once for all
subscribers (the method is registered with a pass-through serializer), and a handler
writes everything its subscription holds per wake-up, instead of one generator step per
event through the error-mapping and request-checking wrappers.
"""

from __future__ import annotations

import grpc
from google.protobuf import empty_pb2

from runtimed import identifiers
from runtimed.api.containerd.services.events.v1 import events_pb2 as pb
from runtimed.api.containerd.services.events.v1 import events_pb2_grpc
from runtimed.errors import InvalidArgument
from runtimed.events.exchange import Event
from runtimed.services.base import namespace, service


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
        """Streams serialized Envelopes (bytes) until the client goes away, or ends with
        RESOURCE_EXHAUSTED when this subscriber fell QUEUE_SIZE events behind."""
        subscription = self.exchange.subscribe(list(request.filters))
        try:
            while True:
                for event in await subscription.batch():
                    await context.write(event.envelope)
        finally:
            self.exchange.unsubscribe(subscription)


def _now() -> int:
    import time

    return time.time_ns()


def _as_is(data: bytes) -> bytes:
    return data


def register(server, daemon) -> None:
    servicer = EventsService(daemon.exchange)
    handlers = {
        "Publish": grpc.unary_unary_rpc_method_handler(
            servicer.Publish, request_deserializer=pb.PublishRequest.FromString,
            response_serializer=empty_pb2.Empty.SerializeToString),
        "Forward": grpc.unary_unary_rpc_method_handler(
            servicer.Forward, request_deserializer=pb.ForwardRequest.FromString,
            response_serializer=empty_pb2.Empty.SerializeToString),
        "Subscribe": grpc.unary_stream_rpc_method_handler(
            servicer.Subscribe, request_deserializer=pb.SubscribeRequest.FromString,
            response_serializer=_as_is),
    }
    name = "containerd.services.events.v1.Events"
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)
