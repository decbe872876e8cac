"""The event exchange: every component publishes here; subscribers each get their own
bounded queue, so a slow subscriber never blocks publishers or other subscribers.

A subscriber whose queue overflows is not silently skipped over: its stream ends with
`ResourceExhausted` saying how many events it missed, so it can re-list and subscribe
again (exit and OOM events are never dropped without the subscriber being told), and the
exchange counts every dropped event.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
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


@dataclass
class Subscription:
    filter: Filter
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    dropped: int = 0

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            event = await self.queue.get()
            if event is None:
                raise ResourceExhausted(
                    f"event subscriber fell behind and missed {self.dropped} events; "
                    "re-list the objects you track and subscribe again"
                )
            yield event


class Exchange:
    def __init__(self) -> None:
        self._subscribers: list[Subscription] = []
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
        for sub in list(self._subscribers):
            if not sub.filter.match(event.lookup):
                continue
            if sub.dropped:
                sub.dropped += 1
                self.dropped += 1
                continue
            if sub.queue.qsize() >= QUEUE_SIZE - 1:  # keep one slot for the overflow marker
                sub.dropped = 1
                self.dropped += 1
                sub.queue.put_nowait(None)
                log.warning("event subscriber overflowed; it will be told to re-list")
                continue
            sub.queue.put_nowait(event)

    def subscribe(self, filters: list[str] | None = None) -> Subscription:
        sub = Subscription(parse(filters))
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
