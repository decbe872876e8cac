"""The event exchange: every component publishes here; subscribers each get their own
bounded queue, so a slow subscriber never blocks publishers or other subscribers.

A subscriber whose queue overflows is not silently skipped over: its stream ends with
`ResourceExhausted` saying how many events it missed, so it can re-list and subscribe
again (exit and OOM events are never dropped without the subscriber being told), and the
exchange counts every dropped event.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from google.protobuf import symbol_database
from google.protobuf.message import Message

from runtimed.errors import InvalidArgument, ResourceExhausted
from runtimed.filters import Filter, parse

log = logging.getLogger("runtimed.events")

QUEUE_SIZE = 4096


@dataclass(frozen=True)
class Event:
    """An envelope's content. `type_url` is the bare full name of the event message, as
    containerd registers event types (no type.googleapis.com/ prefix)."""

    timestamp_ns: int
    namespace: str
    topic: str
    type_url: str
    value: bytes
    message: Message | None = None

    @classmethod
    def of(cls, namespace: str, topic: str, message: Message, timestamp_ns: int | None = None) -> Event:
        return cls(timestamp_ns or time.time_ns(), namespace, topic,
                   message.DESCRIPTOR.full_name, message.SerializeToString(), message)

    @functools.cached_property
    def envelope(self) -> bytes:
        """The serialized containerd Envelope, encoded once however many subscribers
        receive it (Subscribe streams write these bytes as they are)."""
        from runtimed.api.containerd.services.events.v1 import events_pb2

        envelope = events_pb2.Envelope(namespace=self.namespace, topic=self.topic)
        envelope.timestamp.FromNanoseconds(self.timestamp_ns)
        envelope.event.type_url = self.type_url
        envelope.event.value = self.value
        return envelope.SerializeToString()

    def decoded(self) -> Message | None:
        """The event message, when its type is one this process knows."""
        if self.message is not None:
            return self.message
        try:
            cls = symbol_database.Default().GetSymbol(self.type_url.rsplit("/", 1)[-1])
        except KeyError:
            return None
        message = cls()
        message.ParseFromString(self.value)
        return message

    def lookup(self, path: tuple[str, ...]) -> str | None:
        if path == ("namespace",):
            return self.namespace
        if path == ("topic",):
            return self.topic
        if path and path[0] == "event":
            message = self.decoded()
            return _message_field(message, path[1:]) if message is not None else None
        return None


def _message_field(message: Message, path: tuple[str, ...]) -> str | None:
    value = message
    for name in path:
        if isinstance(value, Message):
            descriptor = value.DESCRIPTOR.fields_by_name.get(name)
            if descriptor is None:
                return None
            value = getattr(value, name)
        elif hasattr(value, "get"):  # map field (labels)
            value = value.get(name)
            if value is None:
                return None
        else:
            return None
    if isinstance(value, Message):
        return None
    return str(value) if not isinstance(value, str) else value


@dataclass(eq=False)
class Subscription:
    """A subscriber's bounded queue. Events wait in a deque; the reader sleeps on one
    future that the first event after a drain wakes, so a burst costs one wake-up, and
    `batch` hands over everything queued at once."""

    filter: Filter
    pending: deque = field(default_factory=deque)
    dropped: int = 0
    _waiter: asyncio.Future | None = None
    # the reader's loop, looked up once: on 3.11 asyncio.get_running_loop() makes a
    # getpid() system call each time, which was one per delivery
    _loop: asyncio.AbstractEventLoop | None = None

    def put(self, event: Event | None) -> None:
        """Queue an event (None: the overflow marker); on the event loop's thread."""
        self.pending.append(event)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def batch(self) -> list[Event]:
        """Every event queued now (at least one, waiting for it), in order. Raises
        ResourceExhausted once the events before the overflow are handed over."""
        while not self.pending:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.pending[0] is None:
            raise ResourceExhausted(
                f"event subscriber fell behind and missed {self.dropped} events; "
                "re-list the objects you track and subscribe again"
            )
        events = []
        pending = self.pending
        while pending and pending[0] is not None:
            events.append(pending.popleft())
        return events

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            for event in await self.batch():
                yield event


class Exchange:
    def __init__(self) -> None:
        self._subscribers: list[Subscription] = []
        self._filters: dict[tuple[str, ...], Filter] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self.published = 0
        self.dropped = 0

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliveries happen on the daemon's event loop; publish works from any thread."""
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def publish(self, namespace: str, topic: str, message: Message) -> Event:
        return self.forward(Event.of(namespace, topic, message))

    def forward(self, event: Event) -> Event:
        """Deliver an event as it is (Publish and Forward RPCs, events relayed from shims)."""
        topic = event.topic
        if not topic.startswith("/") or "//" in topic or topic.endswith("/") and topic != "/":
            raise InvalidArgument(f"event topic {topic!r} must be an absolute path like /tasks/exit")
        if self._loop is not None and threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(self._deliver, event)
        else:
            self._deliver(event)
        return event

    def _deliver(self, event: Event) -> None:
        self.published += 1
        matched: dict[int, bool] = {}  # subscribers with the same filters share one Filter
        for sub in self._subscribers[:]:
            key = id(sub.filter)
            match = matched.get(key)
            if match is None:
                match = matched[key] = sub.filter.match(event.lookup)
            if not match:
                continue
            if sub.dropped:
                sub.dropped += 1
                self.dropped += 1
                continue
            if len(sub.pending) >= QUEUE_SIZE - 1:  # keep one slot for the overflow marker
                sub.dropped = 1
                self.dropped += 1
                sub.put(None)
                log.warning("event subscriber overflowed; it will be told to re-list")
                continue
            sub.put(event)

    def subscribe(self, filters: list[str] | None = None) -> Subscription:
        key = tuple(filters or ())
        parsed = self._filters.get(key)
        if parsed is None:
            parsed = parse(filters)
            if len(self._filters) < 256:
                self._filters[key] = parsed
        sub = Subscription(parsed)
        self._subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        try:
            self._subscribers.remove(sub)
        except ValueError:
            pass

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)
