"""Decode `google.protobuf.Any` payloads (events, metrics) into plain dicts.

containerd clients send bare type URLs (`containerd.events.TaskExit`); the message types
are found in the generated modules, imported on first use only.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

_PACKAGES = ("runtimed.api.containerd.events", "runtimed.api.cgroups", "runtimed.api.containerd.types")


@cache
def _load_generated() -> None:
    for name in _PACKAGES:
        try:
            package = importlib.import_module(name)
        except ImportError:
            continue
        for info in pkgutil.walk_packages(package.__path__, name + "."):
            if info.name.endswith("_pb2"):
                importlib.import_module(info.name)


def decode_any(value) -> dict:
    """The payload as a dict (proto field names); {} when the type is unknown here."""
    if not value.type_url:
        return {}
    from google.protobuf import descriptor_pool, json_format, message_factory

    _load_generated()
    name = value.type_url.rsplit("/", 1)[-1]
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(name)
    except KeyError:
        return {}
    message = message_factory.GetMessageClass(descriptor)()
    message.ParseFromString(value.value)
    return json_format.MessageToDict(message, preserving_proto_field_name=True)
