"""grpc.health.v1.Health: `SERVING` once the daemon has started."""

from __future__ import annotations

from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def register(server, daemon) -> None:
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)

    async def serving() -> None:
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)

    daemon.on_start.append(serving)
