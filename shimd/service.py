"""The `runtimed.shim.v1.Shim` gRPC service: translates protobuf to the `Shim` core.

Served with the daemon's own HTTP/2 gRPC server (runtimed/services/h2server.py) on the
shim's asyncio loop, not grpc.aio: the shim stays single-threaded and imports no gRPC core,
so it can fork its create/exec workers itself and costs less memory per container
(docs/shim.md). On the wire it is ordinary gRPC; runtimed talks to it with its own client
(runtimed/runtime/h2client.py).
"""

from __future__ import annotations

import logging
import os

from google.protobuf import empty_pb2
from google.protobuf.message_factory import GetMessageClass
from google.protobuf.timestamp_pb2 import Timestamp

from runtimed.api.shim.v1 import shim_pb2
from runtimed.errors import FailedPrecondition, InvalidArgument, status_of
from runtimed.services import h2server
from shimd import __version__, cgroups
from shimd.metrics import stats_to_any
from shimd.shim import Shim
from shimd.stdio import StdioConfig

log = logging.getLogger("shimd")

EMPTY = empty_pb2.Empty()
SERVICE = "runtimed.shim.v1.Shim"


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    if seconds:
        ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _stdio(message: shim_pb2.Stdio) -> StdioConfig:
    return StdioConfig(message.stdin, message.stdout, message.stderr, message.terminal)


# path -> (method name, server streaming, request parser, response serializer), read
# from the service descriptor once: in the zygote, which imports this module
_ROUTES = {
    f"/{SERVICE}/{method.name}": (method.name, method.server_streaming,
                                  GetMessageClass(method.input_type).FromString,
                                  GetMessageClass(method.output_type).SerializeToString)
    for method in shim_pb2.DESCRIPTOR.services_by_name["Shim"].methods
}


class ShimServer(h2server.Server):
    """h2server's server over one ShimService's methods."""

    def __init__(self, api: ShimService) -> None:
        super().__init__(_Handlers(api), name="the shim")


class _Handlers:
    """The handler table h2server serves (`methods`, and `service` for a path not in it
    yet): each handler is made on its method's first call. A worker calls a few of the
    methods, and every object it makes in its fork costs it pages the zygote shares
    (the whole table was ~0.3 ms of a worker's CPU)."""

    def __init__(self, api: ShimService) -> None:
        self.api = api
        self.methods: dict[str, h2server.MethodHandler] = {}

    def service(self, details) -> h2server.MethodHandler | None:
        route = _ROUTES.get(details.method)
        if route is None:
            return None
        name, streaming, parse, serialize = route
        behaviour = getattr(self.api, name)
        if streaming:
            handler = h2server.unary_stream(self._stream(behaviour), parse, serialize)
        else:
            handler = h2server.unary_unary(self._unary(behaviour), parse, serialize)
        self.methods[details.method] = handler
        return handler

    def _unary(self, method):
        api = self.api

        async def handle(request, context):
            api.active += 1
            try:
                return await method(request)
            except h2server.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status, never UNKNOWN
                await _abort(context, exc)
            finally:
                api.active -= 1

        return handle

    @staticmethod
    def _stream(method):
        async def handle(request, context):
            try:
                async for item in method(request):
                    yield item
            except (h2server.AbortError, GeneratorExit):
                raise
            except Exception as exc:  # noqa: BLE001
                await _abort(context, exc)

        return handle


async def _abort(context, exc: Exception) -> None:
    """The status for an error, through the project's one table (runtimed.errors)."""
    known = status_of(exc)
    if known is not None:
        await context.abort(h2server.StatusCode[known[0]], known[1])
    log.exception("internal error")
    await context.abort(h2server.StatusCode.INTERNAL,
                        f"internal error: {type(exc).__name__}: {exc}")


class ShimService:
    """One method per RPC, request in, response out (Events: an async iterator)."""

    def __init__(self, shim: Shim | None):
        self.shim = shim  # None while a spare shim waits to be claimed
        self.shim_pid = os.getpid()  # the keeper's in a worker (shimd/keeper.py)
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
        shutting_down = request.shutdown and not request.exec_id
        if shutting_down:  # exits once this answer is sent (its call is still active)
            self.shim.shutdown(now=True)
        return shim_pb2.DeleteResponse(
            pid=info.pid, exit_status=info.exit_status, exited_at=_timestamp(info.exited_at),
            event_seq=self.shim.outbox.seq, shutting_down=shutting_down,
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
            return shim_pb2.ConnectResponse(shim_pid=self.shim_pid, version=__version__)
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
