"""containerd.services.snapshots.v1.Snapshots over `daemon.snapshotters` (by name;
an empty name means overlayfs, as containerd clients assume)."""

from __future__ import annotations

import asyncio

from google.protobuf import empty_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from runtimed.api.containerd.types import mount_pb2
from runtimed.errors import InvalidArgument
from runtimed.filters import parse
from runtimed.services.base import lease, namespace, service
from runtimed.snapshots import DEFAULT
from runtimed.snapshots.base import Info, Kind

LIST_BATCH = 100  # infos per streamed List response, as containerd sends them


def _timestamp(ns: int) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def info_to_proto(info: Info) -> pb.Info:
    return pb.Info(name=info.name, parent=info.parent, kind=int(info.kind), labels=info.labels,
                   created_at=_timestamp(info.created_at), updated_at=_timestamp(info.updated_at))


def mounts_to_proto(mounts) -> list[mount_pb2.Mount]:
    return [m.to_proto(mount_pb2.Mount) for m in mounts]


def _lookup(info: Info):
    def lookup(path: tuple[str, ...]) -> str | None:
        if path == ("name",):
            return info.name
        if path == ("parent",):
            return info.parent
        if path == ("kind",):
            return info.kind.name.lower()
        if len(path) == 2 and path[0] == "labels":
            return info.labels.get(path[1])
        return None

    return lookup


@service
class SnapshotsService(snapshots_pb2_grpc.SnapshotsServicer):
    def __init__(self, daemon):
        self.snapshotters = daemon.snapshotters

    def _get(self, name: str):
        name = name or DEFAULT
        sn = self.snapshotters.get(name)
        if sn is None:
            raise InvalidArgument(
                f"snapshotter {name!r} is not loaded (available: "
                f"{', '.join(sorted(self.snapshotters)) or 'none'})"
            )
        return sn

    async def Prepare(self, request, context):
        sn = self._get(request.snapshotter)
        mounts = await asyncio.to_thread(sn.prepare, namespace(context), request.key,
                                         request.parent, dict(request.labels), lease(context))
        return pb.PrepareSnapshotResponse(mounts=mounts_to_proto(mounts))

    async def View(self, request, context):
        sn = self._get(request.snapshotter)
        mounts = await asyncio.to_thread(sn.view, namespace(context), request.key,
                                         request.parent, dict(request.labels), lease(context))
        return pb.ViewSnapshotResponse(mounts=mounts_to_proto(mounts))

    async def Mounts(self, request, context):
        sn = self._get(request.snapshotter)
        mounts = await asyncio.to_thread(sn.mounts, namespace(context), request.key)
        return pb.MountsResponse(mounts=mounts_to_proto(mounts))

    async def Commit(self, request, context):
        sn = self._get(request.snapshotter)
        await asyncio.to_thread(sn.commit, namespace(context), request.name, request.key,
                                dict(request.labels), lease(context))
        return empty_pb2.Empty()

    async def Remove(self, request, context):
        sn = self._get(request.snapshotter)
        await asyncio.to_thread(sn.remove, namespace(context), request.key)
        return empty_pb2.Empty()

    async def Stat(self, request, context):
        sn = self._get(request.snapshotter)
        info = await asyncio.to_thread(sn.stat, namespace(context), request.key)
        return pb.StatSnapshotResponse(info=info_to_proto(info))

    async def Update(self, request, context):
        sn = self._get(request.snapshotter)
        i = request.info
        kind = Kind(i.kind) if i.kind in iter(Kind) else Kind.UNKNOWN  # ignored by update
        info = Info(name=i.name, kind=kind, parent=i.parent, labels=dict(i.labels))
        updated = await asyncio.to_thread(sn.update, namespace(context), info,
                                          list(request.update_mask.paths))
        return pb.UpdateSnapshotResponse(info=info_to_proto(updated))

    async def List(self, request, context):
        sn = self._get(request.snapshotter)
        match = parse(list(request.filters))
        infos = await asyncio.to_thread(lambda: list(sn.walk(namespace(context))))
        batch: list[pb.Info] = []
        for info in infos:
            if not match.match(_lookup(info)):
                continue
            batch.append(info_to_proto(info))
            if len(batch) == LIST_BATCH:
                yield pb.ListSnapshotsResponse(info=batch)
                batch = []
        if batch:
            yield pb.ListSnapshotsResponse(info=batch)

    async def Usage(self, request, context):
        sn = self._get(request.snapshotter)
        usage = await asyncio.to_thread(sn.usage, namespace(context), request.key)
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    async def Cleanup(self, request, context):
        sn = self._get(request.snapshotter)
        await asyncio.to_thread(sn.cleanup)
        return empty_pb2.Empty()


def register(server, daemon) -> None:
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(SnapshotsService(daemon), server)
