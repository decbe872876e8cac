"""runtimed's shim client closes a connection no call has used for `idle_close` seconds
(runtimed/runtime/h2client.py) and dials again for the next call; a call in flight keeps
the connection, and calls made right around the idle deadline all go through. A spare's
client (no task id yet) keeps its connection."""

from __future__ import annotations

import asyncio
from pathlib import Path

from runtimed.api.shim.v1 import shim_pb2 as pb
from runtimed.runtime import h2client
from runtimed.runtime.shim import ShimClient

IDLE = 0.05


def test_idle_connections_close_and_calls_dial_again(shims):
    shim = shims(["sleep", "1000"])

    async def scenario():
        client = ShimClient(shim.id, shim.address, shim.bundle)
        assert client.channel.idle_close == h2client.IDLE_CLOSE
        client.channel.idle_close = IDLE
        dials = []
        dial = client.channel._dial

        async def counted():
            dials.append(await dial())
            return dials[-1]

        client.channel._dial = counted
        try:
            await client.call("Create", pb.CreateRequest(id=shim.id, bundle=str(shim.bundle)), 30)
            await client.call("Start", pb.StartRequest(id=shim.id), 10)
            # a call in flight (a Wait) holds the connection however long it takes
            waiting = asyncio.ensure_future(client.call("Wait", pb.WaitRequest(id=shim.id)))
            await asyncio.sleep(IDLE * 6)
            assert len(dials) == 1 and dials[0].usable
            assert (await client.call("State", pb.StateRequest(id=shim.id), 5)).pid
            await client.call("Kill", pb.KillRequest(id=shim.id, signal=9), 5)
            assert (await waiting).exit_status == 137
            # then, idle: closed (the shim sees EOF), and the next call dials again
            for _ in range(200):
                if dials[0].transport.is_closing():
                    break
                await asyncio.sleep(IDLE)
            assert not dials[0].usable and dials[0].transport.is_closing()
            state = await client.call("State", pb.StateRequest(id=shim.id), 5)
            assert state.status == pb.STOPPED and len(dials) == 2
            # calls right around the deadline: each on a usable connection, never failing
            for i in range(60):
                await asyncio.sleep(IDLE * (0.8 + 0.4 * (i % 7) / 6))
                await client.call("State", pb.StateRequest(id=shim.id), 5)
            assert len(dials) > 2
            await client.call("Delete", pb.DeleteRequest(id=shim.id), 10)
        finally:
            await client.close()

    asyncio.run(scenario())


def test_a_spare_client_keeps_its_connection():
    client = ShimClient("", "unix:///nonexistent.sock", Path("/nonexistent"))
    assert client.channel.idle_close is None
    client.id = "claimed"
    assert client.channel.idle_close == h2client.IDLE_CLOSE
