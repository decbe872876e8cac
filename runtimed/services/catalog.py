"""The list of gRPC service modules runtimed serves; each exposes `register(server, daemon)`."""

from __future__ import annotations

import importlib

SERVICE_MODULES = [
    "runtimed.services.version",
    "runtimed.services.introspection",
    "runtimed.services.namespaces",
    "runtimed.services.health",
]


def register_all(server, daemon) -> None:
    for name in SERVICE_MODULES:
        importlib.import_module(name).register(server, daemon)
