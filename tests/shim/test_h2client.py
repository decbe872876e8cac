"""runtimed's HTTP/2 gRPC client for its shims (runtimed/runtime/h2client.py), against a
real shim (served by h2server): answers and typed errors, deadlines, requests larger than
the server's flow-control windows, many calls at once on one connection, the event
stream, and a connection that goes away."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import pytest

from runtimed.api.shim.v1 import shim_pb2 as pb
from runtimed.errors import DeadlineExceeded, NotFound, Unavailable
from runtimed.runtime.shim import SERVICE, ShimClient
from tests.shim.conftest import REPO


def run(coro):
    return asyncio.run(coro)


async def _events(client: ShimClient, after: int):
    """The shim's Events stream (runtimed follows the outbox file instead; the shim still
    serves it, and it is the client's server-streaming call)."""
    request = pb.EventsRequest(after=after).SerializeToString()
    async for message in client.channel.stream(f"/{SERVICE}/Events", request):
        yield pb.Event.FromString(message)


def test_calls_errors_and_events(shims):
    shim = shims(["sleep", "1000"])

    async def scenario():
        client = ShimClient(shim.id, shim.address, shim.bundle)
        try:
            connected = await client.call("Connect", pb.ConnectRequest(id=shim.id), 5)
            assert connected.shim_pid == shim.pid
            with pytest.raises(NotFound):  # the shim's NOT_FOUND, typed
                await client.call("State", pb.StateRequest(id=shim.id), 5)
            created = await client.call("Create", pb.CreateRequest(
                id=shim.id, bundle=str(shim.bundle)), 30)
            events = _events(client, 0)
            first = await anext(events)
            assert (first.seq, first.topic, first.pid) == (1, "/tasks/create", created.pid)
            await client.call("Start", pb.StartRequest(id=shim.id), 10)
            assert (await anext(events)).topic == "/tasks/start"
            # 50 calls at once on the one connection
            states = await asyncio.gather(*(
                client.call("State", pb.StateRequest(id=shim.id), 10) for _ in range(50)))
            assert {s.status for s in states} == {pb.RUNNING}
            # a request far larger than the server's 64 KiB windows
            process = json.loads((shim.bundle / "config.json").read_text())["process"]
            process["args"] = ["true"]
            process["env"] = [f"E{i}={'x' * 1000}" for i in range(300)]
            await client.call("Exec", pb.ExecRequest(
                id=shim.id, exec_id="big", process=json.dumps(process).encode()), 10)
            added = await anext(events)
            assert (added.topic, added.exec_id) == ("/tasks/exec-added", "big")
            await events.aclose()  # cancels the stream; the connection carries on
            with pytest.raises(DeadlineExceeded):  # a Wait that outlives its deadline
                await client.call("Wait", pb.WaitRequest(id=shim.id), 0.3)
            assert (await client.call("State", pb.StateRequest(id=shim.id), 5)).pid == created.pid
            # the shim goes away under a waiting call: UNAVAILABLE, typed
            waiting = asyncio.ensure_future(client.call("Wait", pb.WaitRequest(id=shim.id)))
            await asyncio.sleep(0.2)
            os.kill(shim.pid, signal.SIGKILL)
            with pytest.raises(Unavailable):
                await asyncio.wait_for(waiting, 10)
            with pytest.raises(Unavailable):
                await client.call("State", pb.StateRequest(id=shim.id), 5)
        finally:
            await client.close()
            # the container outlived its shim: the runtime removes it (and its cgroup)
            subprocess.run([sys.executable, "-m", "shimd.oci", "--root",
                            str(shim.bundle), "delete", "--force", shim.id],
                           cwd=REPO, capture_output=True, timeout=30)
        with pytest.raises(Unavailable):  # a closed client
            await client.call("State", pb.StateRequest(id=shim.id), 5)

    run(scenario())


def test_a_deadline_is_its_own_error_and_closing_fails_pending_calls(shims):
    shim = shims(["sleep", "1000"])

    async def scenario():
        client = ShimClient(shim.id, shim.address, shim.bundle)
        await client.call("Create", pb.CreateRequest(id=shim.id, bundle=str(shim.bundle)), 30)
        await client.call("Start", pb.StartRequest(id=shim.id), 10)
        with pytest.raises(DeadlineExceeded) as info:
            await client.call("Wait", pb.WaitRequest(id=shim.id), 0.2)
        # the client's timer and the shim's (h2server honours grpc-timeout) both end the
        # call at 0.2 s: whichever fires first answers, typed DeadlineExceeded either way
        assert "no answer in 0.2 s" in str(info.value) or str(info.value) == "Deadline Exceeded"
        waiting = asyncio.ensure_future(client.call("Wait", pb.WaitRequest(id=shim.id)))
        await asyncio.sleep(0.1)
        await client.close()
        with pytest.raises(Unavailable):
            await asyncio.wait_for(waiting, 5)
        # the shim served the cancelled calls' streams and still answers others
        other = ShimClient(shim.id, shim.address, shim.bundle)
        try:
            await other.call("Kill", pb.KillRequest(id=shim.id, signal=9), 5)
            assert (await other.call("Wait", pb.WaitRequest(id=shim.id), 10)).exit_status == 137
        finally:
            await other.close()

    run(scenario())


def test_unreachable_shim_is_unavailable(tmp_path):
    async def scenario():
        client = ShimClient("x", f"unix://{tmp_path}/nobody.sock", tmp_path)
        try:
            with pytest.raises(Unavailable) as info:
                await client.call("State", pb.StateRequest(id="x"), 5)
            assert "failed to connect" in str(info.value)
        finally:
            await client.close()

    run(scenario())
