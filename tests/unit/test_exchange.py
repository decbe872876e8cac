"""The event exchange: filters, ordering, and overflow that is told, never silent."""

import asyncio

import pytest

from runtimed.api.containerd.events import namespace_pb2, task_pb2
from runtimed.errors import InvalidArgument, ResourceExhausted
from runtimed.events import exchange as exchange_module
from runtimed.events.exchange import Event, Exchange


async def take(subscription, count):
    events = []
    async for event in subscription:
        events.append(event)
        if len(events) == count:
            return events


def test_filtered_subscribers_see_only_their_topics_in_order():
    async def scenario():
        ex = Exchange()
        ex.bind(asyncio.get_running_loop())
        tasks = ex.subscribe(['topic~="^/tasks/"'])
        exits = ex.subscribe(['topic=="/tasks/exit",event.exit_status==3'])
        ex.publish("default", "/namespaces/create", namespace_pb2.NamespaceCreate(name="x"))
        ex.publish("default", "/tasks/start", task_pb2.TaskStart(container_id="c", pid=7))
        ex.publish("default", "/tasks/exit", task_pb2.TaskExit(container_id="c", exit_status=0))
        ex.publish("default", "/tasks/exit", task_pb2.TaskExit(container_id="c", exit_status=3))
        got = await asyncio.wait_for(take(tasks, 3), 2)
        assert [e.topic for e in got] == ["/tasks/start", "/tasks/exit", "/tasks/exit"]
        only = await asyncio.wait_for(take(exits, 1), 2)
        assert only[0].decoded().exit_status == 3
        assert only[0].type_url == "containerd.events.TaskExit"

    asyncio.run(scenario())


def test_events_from_unknown_types_are_forwarded_verbatim():
    ev = Event(1, "ns", "/custom/thing", "example.Unknown", b"\x08\x01")
    assert ev.decoded() is None
    assert ev.lookup(("event", "x")) is None
    assert ev.lookup(("topic",)) == "/custom/thing"


def test_bad_topic_is_invalid_argument():
    with pytest.raises(InvalidArgument):
        Exchange().publish("default", "tasks/exit", task_pb2.TaskExit())


def test_overflowing_subscriber_is_told_and_others_unaffected(monkeypatch):
    monkeypatch.setattr(exchange_module, "QUEUE_SIZE", 8)

    async def scenario():
        ex = Exchange()
        ex.bind(asyncio.get_running_loop())
        slow = ex.subscribe()
        fast = ex.subscribe()
        received = []

        async def drain():
            async for event in fast:
                received.append(event)
                if len(received) == 20:
                    return

        drainer = asyncio.create_task(drain())
        for i in range(20):
            ex.publish("default", "/tasks/exit", task_pb2.TaskExit(pid=i))
            await asyncio.sleep(0)
        await asyncio.wait_for(drainer, 2)
        assert [e.decoded().pid for e in received] == list(range(20))
        seen = []
        with pytest.raises(ResourceExhausted, match="missed"):
            async for event in slow:
                seen.append(event)
        assert len(seen) == 7  # delivered before the overflow marker
        assert ex.dropped == 20 - 7

    asyncio.run(scenario())
