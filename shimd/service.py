"""The `runtimed.shim.v1.Shim` gRPC service: translates protobuf to the `Shim` core.

Served with grpclib (pure-Python gRPC over HTTP/2 on the shim's asyncio loop), not
grpc.aio: the shim stays single-threaded and imports no gRPC core, so it can fork its
create/exec workers itself and costs less memory per container (docs/shim.md). On the
wire it is ordinary gRPC; runtimed talks to it with grpc.aio.
"""

from __future__ import annotations

import asyncio
import logging
import os

from google.protobuf import empty_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server
from h2.settings import SettingCodes

from runtimed.api.shim.v1 import shim_pb2
from runtimed.errors import FailedPrecondition, InvalidArgument, status_of
from shimd import __version__, cgroups
from shimd.metrics import stats_to_any
from shimd.shim import Shim
from shimd.stdio import StdioConfig

log = logging.getLogger("shimd")

EMPTY = empty_pb2.Empty()
SERVICE = "runtimed.shim.v1.Shim"
# h2 caps a connection at 100 concurrent streams; runtimed multiplexes every call to a
# shim on one connection (the Events stream, one Wait per waiting client, ...), and a call
# over the cap waits for a free slot. grpc-core and containerd's ttrpc shim set no cap.
MAX_STREAMS = 1 << 16


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    if seconds:
        ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _stdio(message: shim_pb2.Stdio) -> StdioConfig:
    return StdioConfig(message.stdin, message.stdout, message.stderr, message.terminal)


class ShimServer(Server):
    """grpclib's server with the per-connection stream cap raised to MAX_STREAMS; counts
    its open connections (`connections`)."""

    connections = 0

    def _protocol_factory(self):
        protocol = super()._protocol_factory()
        connection_made, connection_lost = protocol.connection_made, protocol.connection_lost

        def made(transport) -> None:
            self.connections += 1
            connection_made(_Coalescing(transport))
            protocol.connection._connection.update_settings(
                {SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS})
            protocol.connection.flush()

        def lost(exc) -> None:
            self.connections -= 1
            connection_lost(exc)

        protocol.connection_made, protocol.connection_lost = made, lost
        return protocol


class _Coalescing:
    """A connection's transport whose writes during one pass of the loop leave as one: a
    unary answer is three writes (headers, message, trailers) and an event one more,
    each a send() that woke runtimed on its own. The bytes go out in order, at the
    loop's next pass at the latest; close() sends what is pending first."""

    def __init__(self, transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self._transport.is_closing():
            self._transport.write(b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


def _grpc_error(exc: Exception) -> GRPCError:
    """The status for an error, through the project's one table (runtimed.errors)."""
    known = status_of(exc)
    if known is not None:
        return GRPCError(Status[known[0]], known[1])
    log.exception("internal error")
    return GRPCError(Status.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


class ShimService:
    """One method per RPC, request in, response out (Events: an async iterator)."""

    def __init__(self, shim: Shim | None):
        self.shim = shim  # None while a spare shim waits to be claimed
        self.active = 0  # unary calls in flight: Shutdown waits for their answers

    def _check(self, id: str) -> None:
        if self.shim is None:
            raise FailedPrecondition("this is a spare shim: it serves no container yet")
        if id and id != self.shim.id:
            raise InvalidArgument(f"this shim serves container {self.shim.id!r}, not {id!r}")

    async def Create(self, request):
        self._check(request.id)
        pid = await self.shim.create(_stdio(request.stdio), request.runtime)
        return shim_pb2.CreateResponse(pid=pid)

    async def Start(self, request):
        self._check(request.id)
        return shim_pb2.StartResponse(pid=await self.shim.start(request.exec_id))

    async def State(self, request):
        self._check(request.id)
        process, stdio = self.shim.state(request.exec_id)
        return shim_pb2.StateResponse(
            id=self.shim.id,
            exec_id=request.exec_id,
            bundle=str(self.shim.bundle),
            pid=process.pid,
            status=int(process.status),
            stdio=shim_pb2.Stdio(
                stdin=stdio.stdin, stdout=stdio.stdout, stderr=stdio.stderr,
                terminal=stdio.terminal,
            ),
            exit_status=process.exit_status,
            exited_at=_timestamp(process.exited_at),
        )

    async def Kill(self, request):
        self._check(request.id)
        await self.shim.kill(request.exec_id, request.signal, request.all)
        return EMPTY

    async def Exec(self, request):
        self._check(request.id)
        await self.shim.exec(request.exec_id, _stdio(request.stdio), request.process)
        return EMPTY

    async def Wait(self, request):
        self._check(request.id)
        info = await self.shim.wait(request.exec_id)
        return shim_pb2.WaitResponse(
            pid=info.pid, exit_status=info.exit_status, exited_at=_timestamp(info.exited_at)
        )

    async def Delete(self, request):
        self._check(request.id)
        info = await self.shim.delete(request.exec_id, request.force)
        return shim_pb2.DeleteResponse(
            pid=info.pid, exit_status=info.exit_status, exited_at=_timestamp(info.exited_at),
            event_seq=self.shim.outbox.seq,
        )

    async def Pids(self, request):
        self._check(request.id)
        return shim_pb2.PidsResponse(
            processes=[
                shim_pb2.ProcessInfo(pid=pid, exec_id=exec_id)
                for pid, exec_id in await self.shim.pids()
            ]
        )

    async def Pause(self, request):
        self._check(request.id)
        await self.shim.pause()
        return EMPTY

    async def Resume(self, request):
        self._check(request.id)
        await self.shim.resume()
        return EMPTY

    async def Update(self, request):
        self._check(request.id)
        await self.shim.update(request.resources)
        return EMPTY

    async def Stats(self, request):
        self._check(request.id)
        stats = await self.shim.stats()
        return shim_pb2.StatsResponse(stats=stats_to_any(stats, v2=cgroups.is_v2()))

    async def ResizePty(self, request):
        self._check(request.id)
        self.shim.resize_pty(request.exec_id, request.width, request.height)
        return EMPTY

    async def CloseIO(self, request):
        self._check(request.id)
        self.shim.close_io(request.exec_id, request.stdin)
        return EMPTY

    async def Connect(self, request):
        if self.shim is None and not request.id:  # runtimed connecting to its spare
            return shim_pb2.ConnectResponse(shim_pid=os.getpid(), version=__version__)
        self._check(request.id)
        shim_pid, task_pid, version = self.shim.connect()
        return shim_pb2.ConnectResponse(shim_pid=shim_pid, task_pid=task_pid, version=version)

    async def Shutdown(self, request):
        self._check(request.id)
        self.shim.shutdown(request.now)
        return EMPTY

    async def Events(self, request):
        self._check("")
        seq = request.after
        while True:
            for event in await self.shim.outbox.wait(seq):
                seq = event["seq"]
                yield _event(event)

    async def Ack(self, request):
        self._check("")
        self.shim.ack(request.seq)
        return EMPTY

    # --- grpclib's side ------------------------------------------------------------

    def __mapping__(self) -> dict[str, Handler]:
        """grpclib's handler table, from the service descriptor in shim_pb2."""
        from google.protobuf.message_factory import GetMessageClass

        table = {}
        for method in shim_pb2.DESCRIPTOR.services_by_name["Shim"].methods:
            streaming = method.server_streaming
            handle = (self._stream if streaming else self._unary)(getattr(self, method.name))
            cardinality = Cardinality.UNARY_STREAM if streaming else Cardinality.UNARY_UNARY
            table[f"/{SERVICE}/{method.name}"] = Handler(
                handle, cardinality, GetMessageClass(method.input_type),
                GetMessageClass(method.output_type),
            )
        return table

    def _unary(self, method):
        async def handle(stream) -> None:
            request = await _receive(stream)
            self.active += 1
            try:
                try:
                    reply = await method(request)
                except GRPCError:
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped to a status, never UNKNOWN
                    raise _grpc_error(exc) from None
                await stream.send_message(reply)
                # the trailers too before the call counts as answered: a Shutdown closes
                # the connection once no call is active, and must not cut its own answer
                await stream.send_trailing_metadata()
            finally:
                self.active -= 1

        return handle

    def _stream(self, method):
        async def handle(stream) -> None:
            request = await _receive(stream)
            try:
                async for item in method(request):
                    await stream.send_message(item)
            except GRPCError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise _grpc_error(exc) from None

        return handle


async def _receive(stream):
    """The request; a body that does not parse is INTERNAL with the parse error, as
    gRPC-Go (and so containerd, and runtimed's own services) answer it."""
    try:
        request = await stream.recv_message()
    except GRPCError:
        raise
    except Exception as exc:  # noqa: BLE001 - the codec's parse error
        raise GRPCError(Status.INTERNAL, f"malformed request: {exc}") from None
    if request is None:
        raise GRPCError(Status.INTERNAL, "malformed request: no message")
    return request


def _event(event: dict) -> shim_pb2.Event:
    return shim_pb2.Event(
        seq=event["seq"],
        topic=event["topic"],
        id=event.get("id", ""),
        exec_id=event.get("exec_id", ""),
        pid=event.get("pid", 0),
        exit_status=event.get("exit_status", 0),
        exited_at=_timestamp(event.get("exited_at", 0)),
        timestamp=_timestamp(event.get("timestamp", 0)),
    )
