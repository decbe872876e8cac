"""The `runtimed.shim.v1.Shim` gRPC service: translates protobuf to the `Shim` core."""

from __future__ import annotations

from google.protobuf import empty_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from runtimed.api.shim.v1 import shim_pb2, shim_pb2_grpc
from runtimed.errors import InvalidArgument
from runtimed.services.base import service
from shimd import cgroups
from shimd.metrics import stats_to_any
from shimd.shim import Shim
from shimd.stdio import StdioConfig

EMPTY = empty_pb2.Empty()


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    if seconds:
        ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _stdio(message: shim_pb2.Stdio) -> StdioConfig:
    return StdioConfig(message.stdin, message.stdout, message.stderr, message.terminal)


@service
class ShimService(shim_pb2_grpc.ShimServicer):
    def __init__(self, shim: Shim):
        self.shim = shim

    def _check(self, id: str) -> None:
        if id and id != self.shim.id:
            raise InvalidArgument(f"this shim serves container {self.shim.id!r}, not {id!r}")

    async def Create(self, request, context):
        self._check(request.id)
        pid = await self.shim.create(_stdio(request.stdio), request.runtime)
        return shim_pb2.CreateResponse(pid=pid)

    async def Start(self, request, context):
        self._check(request.id)
        return shim_pb2.StartResponse(pid=await self.shim.start(request.exec_id))

    async def State(self, request, context):
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

    async def Kill(self, request, context):
        self._check(request.id)
        await self.shim.kill(request.exec_id, request.signal, request.all)
        return EMPTY

    async def Exec(self, request, context):
        self._check(request.id)
        await self.shim.exec(request.exec_id, _stdio(request.stdio), request.process)
        return EMPTY

    async def Wait(self, request, context):
        self._check(request.id)
        info = await self.shim.wait(request.exec_id)
        return shim_pb2.WaitResponse(
            pid=info.pid, exit_status=info.exit_status, exited_at=_timestamp(info.exited_at)
        )

    async def Delete(self, request, context):
        self._check(request.id)
        info = await self.shim.delete(request.exec_id, request.force)
        return shim_pb2.DeleteResponse(
            pid=info.pid, exit_status=info.exit_status, exited_at=_timestamp(info.exited_at),
            event_seq=self.shim.outbox.seq,
        )

    async def Pids(self, request, context):
        self._check(request.id)
        return shim_pb2.PidsResponse(
            processes=[
                shim_pb2.ProcessInfo(pid=pid, exec_id=exec_id)
                for pid, exec_id in await self.shim.pids()
            ]
        )

    async def Pause(self, request, context):
        self._check(request.id)
        await self.shim.pause()
        return EMPTY

    async def Resume(self, request, context):
        self._check(request.id)
        await self.shim.resume()
        return EMPTY

    async def Update(self, request, context):
        self._check(request.id)
        await self.shim.update(request.resources)
        return EMPTY

    async def Stats(self, request, context):
        self._check(request.id)
        stats = await self.shim.stats()
        return shim_pb2.StatsResponse(stats=stats_to_any(stats, v2=cgroups.is_v2()))

    async def ResizePty(self, request, context):
        self._check(request.id)
        self.shim.resize_pty(request.exec_id, request.width, request.height)
        return EMPTY

    async def CloseIO(self, request, context):
        self._check(request.id)
        self.shim.close_io(request.exec_id, request.stdin)
        return EMPTY

    async def Connect(self, request, context):
        self._check(request.id)
        shim_pid, task_pid, version = self.shim.connect()
        return shim_pb2.ConnectResponse(shim_pid=shim_pid, task_pid=task_pid, version=version)

    async def Shutdown(self, request, context):
        self._check(request.id)
        self.shim.shutdown(request.now)
        return EMPTY

    async def Events(self, request, context):
        seq = request.after
        while True:
            for event in await self.shim.outbox.wait(seq):
                seq = event["seq"]
                yield _event(event)

    async def Ack(self, request, context):
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


def register(server, shim: Shim) -> None:
    shim_pb2_grpc.add_ShimServicer_to_server(ShimService(shim), server)

