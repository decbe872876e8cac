"""Import google.protobuf without the pure-Python implementation that upb never runs.

With the upb backend (protobuf's default) messages and descriptors are C objects, yet
`descriptor_pool` and `internal.builder`, which every generated `_pb2` module imports,
import `python_message` eagerly, and with it text_format, the Python decoders, encoders and
containers (pickle, copy), and the Python descriptor database: ~10 ms of CPU, a sixth of
`ctl version`. `defer_pure_python()`, called before protobuf is first imported, registers
those modules lazily (`importlib.util.LazyLoader`): one is executed on the first use of one
of its attributes, so whatever does use one still gets it, only later.
"""

from __future__ import annotations

import sys

DEFERRED = (
    "google.protobuf.internal.python_message",
    "google.protobuf.descriptor_database",
    "google.protobuf.text_encoding",
    "google.protobuf.internal.python_edition_defaults",
)


def defer_pure_python() -> None:
    if "google.protobuf.descriptor_pool" in sys.modules:
        return  # protobuf is in use already: nothing left to save
    import importlib.util

    from google.protobuf.internal import api_implementation

    if api_implementation.Type() != "upb":
        return  # the Python (or C++) backend uses these modules at once
    for name in DEFERRED:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            continue
        spec.loader = importlib.util.LazyLoader(spec.loader)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        # `from package import module` reads the package's attribute; without it the
        # import system would look at the module's __spec__, which loads it
        package, _, attribute = name.rpartition(".")
        setattr(sys.modules[package], attribute, module)
