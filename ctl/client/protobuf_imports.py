"""Import google.protobuf without the pure-Python implementation that upb never runs, and
`lazy_module` for ctl's own modules that only some commands need.

With the upb backend (protobuf's default) messages and descriptors are C objects, yet
`descriptor_pool` and `internal.builder`, which every generated `_pb2` module imports,
import `python_message` eagerly, and with it text_format, the Python decoders, encoders and
containers (pickle, copy), and the Python descriptor database: ~10 ms of CPU, a sixth of
`ctl version`. `defer_pure_python()`, called before protobuf is first imported, registers
those modules lazily (`importlib.util.LazyLoader`): one is executed on the first use of one
of its attributes, so whatever does use one still gets it, only later.

`LAZY_MESSAGES` (set by the ctl program, not for the library's embedders): a generated
module's message classes are built on first use too. Each `_pb2` module builds a class for
every message of its file at import (~40 µs each); a `ctl run` imports seven service
modules, ~160 classes, and uses ~30 of them: ~5 ms of its CPU.
"""

from __future__ import annotations

import sys

DEFERRED = (
    "google.protobuf.internal.python_message",
    "google.protobuf.descriptor_database",
    "google.protobuf.text_encoding",
    "google.protobuf.internal.python_edition_defaults",
)

LAZY_MESSAGES = False


def lazy_module(name: str):
    """The module `name`, executed on the first use of one of its attributes (importlib's
    LazyLoader); None when there is no such module. For what only some paths need."""
    module = sys.modules.get(name)
    if module is not None:
        return module
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return None
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    # `from package import module` reads the package's attribute; without it the import
    # system would look at the module's __spec__, which loads it
    package, _, attribute = name.rpartition(".")
    setattr(sys.modules[package], attribute, module)
    return module


def defer_pure_python() -> None:
    if "google.protobuf.descriptor_pool" in sys.modules:
        return  # protobuf is in use already: nothing left to save
    from google.protobuf.internal import api_implementation

    if api_implementation.Type() != "upb":
        return  # the Python (or C++) backend uses these modules at once
    for name in DEFERRED:
        lazy_module(name)
    if LAZY_MESSAGES:
        _build_messages_on_first_use()


def _build_messages_on_first_use() -> None:
    """Generated modules get their enums, services and descriptors as usual, and a module
    `__getattr__` (PEP 562) that builds a message class when it is first asked for, with
    protobuf's own builder: the same class, registered the same way. upb keeps one class
    per descriptor, so a class made earlier another way (`GetMessageClass`, a nested type)
    is the one returned."""
    from google.protobuf.internal import builder

    build_top = builder.BuildTopDescriptorsAndMessages
    if getattr(build_top, "lazy", False):
        return

    def build_top_lazily(file_des, module_name: str, module: dict) -> None:
        build_top(_WithoutMessages(file_des), module_name, module)
        messages = file_des.message_types_by_name

        def __getattr__(name: str):
            des = messages.get(name)
            if des is None:
                raise AttributeError(f"module {module['__name__']!r} has no attribute {name!r}")
            cls = module[name] = builder._BuildMessage(module_name, des, "")
            return cls

        module["__getattr__"] = __getattr__

    build_top_lazily.lazy = True
    builder.BuildTopDescriptorsAndMessages = build_top_lazily


class _WithoutMessages:
    """A file descriptor whose messages are hidden from the eager builder."""

    message_types_by_name: dict = {}

    def __init__(self, file_des):
        self._file_des = file_des

    def __getattr__(self, name: str):
        return getattr(self._file_des, name)
