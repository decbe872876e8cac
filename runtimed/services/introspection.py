"""containerd.services.introspection.v1.Introspection: what this daemon offers.

Clients probe plugins by containerd's plugin types and ids (Docker and nerdctl look for
`io.containerd.snapshotter.v1` / `overlayfs`, ctr prints the list), so runtimed describes
its components in those terms. A component that is not wired into the daemon is absent;
one that failed to initialise carries `init_err`.
"""

from __future__ import annotations

import platform as host_platform

from runtimed.api.containerd.services.introspection.v1 import (
    introspection_pb2 as pb,
)
from runtimed.api.containerd.services.introspection.v1 import (
    introspection_pb2_grpc,
)
from runtimed.api.containerd.types import platform_pb2
from runtimed.filters import parse
from runtimed.services import catalog
from runtimed.services.base import service

GRPC = "io.containerd.grpc.v1"

# (plugin type, id, daemon attribute that must exist, requires)
CORE_PLUGINS = [
    ("io.containerd.content.v1", "content", "content", []),
    ("io.containerd.metadata.v1", "sqlite", "db", ["io.containerd.content.v1", "io.containerd.snapshotter.v1"]),
    ("io.containerd.gc.v1", "scheduler", "gc", ["io.containerd.metadata.v1"]),
    ("io.containerd.lease.v1", "manager", "leases", ["io.containerd.metadata.v1"]),
    ("io.containerd.differ.v1", "walking", "snapshotters", ["io.containerd.metadata.v1"]),
    ("io.containerd.runtime.v2", "task", "tasks", ["io.containerd.metadata.v1"]),
    ("io.containerd.event.v1", "exchange", "exchange", []),
]

_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


def host_platform_proto() -> platform_pb2.Platform:
    machine = host_platform.machine()
    return platform_pb2.Platform(os="linux", architecture=_ARCH.get(machine, machine))


def _exchange_counters(exchange) -> dict[str, str]:
    """The events counters, so dropped events are visible (`ctr plugins ls -d`)."""
    return {"published": str(exchange.published), "dropped": str(exchange.dropped),
            "subscribers": str(exchange.subscribers)}


def plugins(daemon) -> list[pb.Plugin]:
    found: list[pb.Plugin] = []
    for kind, plugin_id, attribute, requires in CORE_PLUGINS:
        if getattr(daemon, attribute, None) is not None:
            plugin = pb.Plugin(type=kind, id=plugin_id, requires=requires)
            if kind == "io.containerd.runtime.v2":
                plugin.platforms.append(host_platform_proto())
            if kind == "io.containerd.event.v1":
                plugin.exports.update(_exchange_counters(daemon.exchange))
            found.append(plugin)
    for name, snapshotter in sorted((getattr(daemon, "snapshotters", None) or {}).items()):
        plugin = pb.Plugin(type="io.containerd.snapshotter.v1", id=name)
        plugin.platforms.append(host_platform_proto())
        plugin.exports["root"] = str(getattr(snapshotter, "root", ""))
        found.append(plugin)
    for module in catalog.SERVICE_MODULES:
        found.append(pb.Plugin(type=GRPC, id=catalog.plugin_id(module)))
    return found


def _lookup(plugin: pb.Plugin):
    def lookup(path: tuple[str, ...]) -> str | None:
        if path == ("type",):
            return plugin.type
        if path == ("id",):
            return plugin.id
        if path == ("capabilities",):
            return ",".join(plugin.capabilities) if plugin.capabilities else None
        if path == ("platforms",):
            return ",".join(f"{p.os}/{p.architecture}" for p in plugin.platforms) or None
        return None

    return lookup


@service
class IntrospectionService(introspection_pb2_grpc.IntrospectionServicer):
    def __init__(self, daemon):
        self.daemon = daemon

    async def Plugins(self, request, context):
        selected = parse(list(request.filters))
        return pb.PluginsResponse(
            plugins=[p for p in plugins(self.daemon) if selected.match(_lookup(p))]
        )

    async def Server(self, request, context):
        return pb.ServerResponse(uuid=self.daemon.uuid)


def register(server, daemon) -> None:
    introspection_pb2_grpc.add_IntrospectionServicer_to_server(IntrospectionService(daemon), server)
