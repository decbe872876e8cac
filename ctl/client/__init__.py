"""The Python client library for runtimed (and any containerd v1 API server).

The names below are loaded on first use (PEP 562), so importing one submodule, as the
command line does, does not import the whole library.
"""

from __future__ import annotations

_EXPORTS = {
    "Client": "ctl.client.client",
    "DEFAULT_ADDRESS": "ctl.client.client",
    "RunningContainer": "ctl.client.client",
    "CreateOptions": "ctl.client.containers",
    "Stdio": "ctl.client.cio",
    "Mount": "runtimed.oci.spec",
    "SpecOptions": "runtimed.oci.spec",
}

__all__ = ["Client", "CreateOptions", "DEFAULT_ADDRESS", "Mount", "RunningContainer", "SpecOptions", "Stdio"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ctl.client' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
