"""The gRPC service modules runtimed serves; each exposes `register(server, daemon)`."""

from __future__ import annotations

import importlib

SERVICE_MODULES = [
    "runtimed.services.version",
    "runtimed.services.introspection",
    "runtimed.services.namespaces",
    "runtimed.services.health",
    "runtimed.services.events",
    "runtimed.services.containers",
    "runtimed.services.content",
    "runtimed.services.images",
    "runtimed.services.leases",
    "runtimed.services.tasks",
    "runtimed.services.archives",
    "runtimed.services.volumes",
    "runtimed.services.networks",
    "runtimed.services.registry_transfer",
    "runtimed.services.snapshots",
    "runtimed.services.diff",
    "runtimed.services.build",
]

# containerd's grpc plugin ids where our module name differs
_PLUGIN_IDS = {"health": "healthcheck"}


def plugin_id(module: str) -> str:
    """The `io.containerd.grpc.v1` plugin id introspection reports for a service module."""
    name = module.rsplit(".", 1)[-1]
    return _PLUGIN_IDS.get(name, name)


def register_all(server, daemon) -> None:
    for name in SERVICE_MODULES:
        importlib.import_module(name).register(server, daemon)
