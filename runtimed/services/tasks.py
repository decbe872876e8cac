"""containerd.services.tasks.v1.Tasks over `daemon.tasks` (runtimed.runtime.TaskManager)."""

from __future__ import annotations

import time

from google.protobuf import any_pb2, empty_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from runtimed import filters
from runtimed.api.containerd.runtime.v2.runc.options import oci_pb2
from runtimed.api.containerd.services.tasks.v1 import tasks_pb2 as pb
from runtimed.api.containerd.services.tasks.v1 import tasks_pb2_grpc
from runtimed.api.containerd.types import metrics_pb2
from runtimed.api.containerd.types.task import task_pb2
from runtimed.errors import InvalidArgument, Unimplemented
from runtimed.runtime.tasks import ProcessStatus, Stdio
from runtimed.services.base import namespace, service
from runtimed.snapshots.mount import Mount

EMPTY = empty_pb2.Empty()
SPEC_PROCESS = "types.containerd.io/opencontainers/runtime-spec/1/Process"
SPEC_RESOURCES = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"


def _process(p: ProcessStatus) -> task_pb2.Process:
    return task_pb2.Process(
        container_id=p.container_id, id=p.exec_id or p.container_id, pid=p.pid,
        status=p.status, stdin=p.stdio.stdin, stdout=p.stdio.stdout, stderr=p.stdio.stderr,
        terminal=p.stdio.terminal, exit_status=p.exit_status, exited_at=p.exited_at,
    )


def _json_any(value: any_pb2.Any, expected: str, what: str) -> bytes:
    if not value.value:
        raise InvalidArgument(f"{what} is missing")
    if value.type_url and not value.type_url.endswith(expected.rsplit("/", 1)[-1]):
        raise InvalidArgument(f"{what} has type {value.type_url!r}, expected {expected!r}")
    return value.value


@service
class TasksService(tasks_pb2_grpc.TasksServicer):
    def __init__(self, daemon):
        self.tasks = daemon.tasks

    async def Create(self, request, context):
        if request.checkpoint.digest:
            raise Unimplemented("checkpoint/restore is not supported by runtimed (no CRIU)")
        options = (request.options.type_url, request.options.value) if request.options.value else None
        pid = await self.tasks.create(
            namespace(context), request.container_id,
            [Mount.from_proto(m) for m in request.rootfs],
            Stdio(request.stdin, request.stdout, request.stderr, request.terminal),
            options,
        )
        return pb.CreateTaskResponse(container_id=request.container_id, pid=pid)

    async def Start(self, request, context):
        pid = await self.tasks.start(namespace(context), request.container_id, request.exec_id)
        return pb.StartResponse(pid=pid)

    async def Delete(self, request, context):
        result = await self.tasks.delete(namespace(context), request.container_id)
        return pb.DeleteResponse(id=request.container_id, pid=result.pid,
                                 exit_status=result.exit_status, exited_at=result.exited_at)

    async def DeleteProcess(self, request, context):
        result = await self.tasks.delete_process(
            namespace(context), request.container_id, request.exec_id)
        return pb.DeleteResponse(id=request.exec_id, pid=result.pid,
                                 exit_status=result.exit_status, exited_at=result.exited_at)

    async def Get(self, request, context):
        state = await self.tasks.state(namespace(context), request.container_id, request.exec_id)
        return pb.GetResponse(process=_process(state))

    async def List(self, request, context):
        match = filters.parse([request.filter]) if request.filter else None
        states = await self.tasks.states(namespace(context))
        if match is not None:
            states = [s for s in states if match.match(lambda path, s=s: _task_field(s, path))]
        return pb.ListTasksResponse(tasks=[_process(s) for s in states])

    async def Kill(self, request, context):
        await self.tasks.kill(namespace(context), request.container_id, request.exec_id,
                              request.signal, request.all)
        return EMPTY

    async def Exec(self, request, context):
        if not request.exec_id:
            raise InvalidArgument("exec id must not be empty")
        process = _json_any(request.spec, SPEC_PROCESS, "exec process spec")
        await self.tasks.exec(
            namespace(context), request.container_id, request.exec_id,
            Stdio(request.stdin, request.stdout, request.stderr, request.terminal), process,
        )
        return EMPTY

    async def ResizePty(self, request, context):
        await self.tasks.resize_pty(namespace(context), request.container_id, request.exec_id,
                                    request.width, request.height)
        return EMPTY

    async def CloseIO(self, request, context):
        await self.tasks.close_io(namespace(context), request.container_id, request.exec_id,
                                  request.stdin)
        return EMPTY

    async def Pause(self, request, context):
        await self.tasks.pause(namespace(context), request.container_id)
        return EMPTY

    async def Resume(self, request, context):
        await self.tasks.resume(namespace(context), request.container_id)
        return EMPTY

    async def ListPids(self, request, context):
        pids = await self.tasks.pids(namespace(context), request.container_id)
        infos = []
        for pid, exec_id in pids:
            info = task_pb2.ProcessInfo(pid=pid)
            if exec_id:
                details = oci_pb2.ProcessDetails(exec_id=exec_id)
                info.info.type_url = details.DESCRIPTOR.full_name
                info.info.value = details.SerializeToString()
            infos.append(info)
        return pb.ListPidsResponse(processes=infos)

    async def Checkpoint(self, request, context):
        raise Unimplemented(
            "checkpoint is not supported by runtimed: it needs CRIU, which is not integrated"
        )

    async def Update(self, request, context):
        resources = _json_any(request.resources, SPEC_RESOURCES, "resources")
        await self.tasks.update(namespace(context), request.container_id, resources)
        return EMPTY

    async def Metrics(self, request, context):
        ns = namespace(context)
        match = filters.parse(list(request.filters))
        found = await self.tasks.metrics(
            ns, lambda t: match.match(lambda path: {("id",): t.id, ("namespace",): ns}.get(path))
        )
        stamp = Timestamp()
        stamp.FromNanoseconds(time.time_ns())
        return pb.MetricsResponse(metrics=[
            metrics_pb2.Metric(timestamp=stamp, id=id, data=stats) for id, stats in found
        ])

    async def Wait(self, request, context):
        result = await self.tasks.wait(namespace(context), request.container_id, request.exec_id)
        return pb.WaitResponse(exit_status=result.exit_status, exited_at=result.exited_at)


def _task_field(p: ProcessStatus, path: tuple[str, ...]) -> str | None:
    fields = {
        ("id",): p.container_id, ("container_id",): p.container_id, ("pid",): str(p.pid),
        ("status",): task_pb2.Status.Name(p.status).lower(),
    }
    return fields.get(path)


def register(server, daemon) -> None:
    tasks_pb2_grpc.add_TasksServicer_to_server(TasksService(daemon), server)
