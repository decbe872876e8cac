"""containerd.services.version.v1.Version: which daemon a client talks to."""

from __future__ import annotations

from runtimed import __version__
from runtimed.api.containerd.services.version.v1 import version_pb2, version_pb2_grpc
from runtimed.services.base import service

REVISION = "runtimed"


@service
class VersionService(version_pb2_grpc.VersionServicer):
    async def Version(self, request, context):
        return version_pb2.VersionResponse(version=__version__, revision=REVISION)


def register(server, daemon) -> None:
    version_pb2_grpc.add_VersionServicer_to_server(VersionService(), server)
