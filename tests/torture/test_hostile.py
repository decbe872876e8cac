"""Hostile input: every RPC of every service runtimed serves, fed random bytes and
hypothesis-built messages (from the descriptors: bad IDs, huge labels, unknown namespaces,
wrong type URLs, junk OCI specs). The answer is always a proper status code, never
UNKNOWN, and INTERNAL only for a body that is not the request message at all (what gRPC
itself answers, in Go as in Python); runtimed keeps answering afterwards.

Left out of the random calls, because a valid-looking one acts outside the daemon: the
registry service and Build (a random reference or FROM names a real host on the Internet)
and network create/attach (bridges and veths in the host's network namespace). Pulls get
fixed hostile requests in test_refusals.py and test_registry_hostile.py instead.
"""

from __future__ import annotations

import importlib
import pkgutil

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import runtimed.api
from tests.torture import stats
from tests.torture.helpers import version

EXAMPLES = 12  # per method in CI; the slow variant tries SOAK_EXAMPLES
SOAK_EXAMPLES = 300

NOT_FUZZED = {
    "/runtimed.registry.v1.Registry/Pull",
    "/runtimed.registry.v1.Registry/Push",
    "/runtimed.networks.v1.Networks/Create",
    "/runtimed.networks.v1.Networks/Attach",
    "/runtimed.build.v1.Builder/Build",
}
NOT_SERVED = {"runtimed.shim.v1.Shim"}  # served by each shim, not by runtimed

SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
STRINGS = [
    "", "a", "default", "trt-fuzz", "k8s.io", "UPPER", "-x", "a" * 80, "x" * 5000,
    "../../../../tmp/escape", "/", ".", "..", "a/../b", "\x00", "a\nb", "é", "*", "overlayfs",
    "native", "io.containerd.runc.v2", "runc", "sha256:" + "0" * 64, "sha256:abc",
    "sha512:" + "f" * 128, "docker.io/library/busybox:latest", "busybox", "name==x",
    'labels."a.b"~=[', 'topic~="^/tasks/"', "containerd.io/gc.ref.content", SPEC_URL,
    "types.containerd.io/opencontainers/runtime-spec/1/Process", "containerd.runc.v1.Options",
    "types.googleapis.com/google.protobuf.Empty", "bind", "overlay", "tmpfs",
    "lowerdir=/nonexistent", "ro", "rbind",
]
BLOBS = [
    b"", b"{}", b"null", b"[]", b"{not json", b'{"ociVersion": 5}', b'{"process": []}',
    b'{"process": {"args": []}, "root": {"path": "../../../"}}',
    b'{"linux": {"namespaces": [{"type": "bogus"}]}}', b"\xff" * 64, b"\x0a\x05hello",
]
NAMESPACES = ["trt-fuzz", "default", "trt-fuzz-other", "", "UPPER", "../x", "a" * 80, "-"]


def served_methods() -> list[tuple[str, object]]:
    found = []
    for info in pkgutil.walk_packages(runtimed.api.__path__, "runtimed.api."):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(info.name)
        for service in module.DESCRIPTOR.services_by_name.values():
            if service.full_name in NOT_SERVED:
                continue
            for method in service.methods:
                found.append((f"/{service.full_name}/{method.name}", method))
    from grpc_health.v1 import health_pb2

    for method in health_pb2.DESCRIPTOR.services_by_name["Health"].methods:
        found.append((f"/grpc.health.v1.Health/{method.name}", method))
    return sorted(found, key=lambda item: item[0])


METHODS = served_methods()


# ---- messages from descriptors --------------------------------------------------------

_INTS = {
    FieldDescriptor.TYPE_INT32: (-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_SINT32: (-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_INT64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_SINT64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_UINT32: (0, (1 << 32) - 1),
    FieldDescriptor.TYPE_FIXED32: (0, (1 << 32) - 1),
    FieldDescriptor.TYPE_UINT64: (0, (1 << 64) - 1),
    FieldDescriptor.TYPE_FIXED64: (0, (1 << 64) - 1),
}


def strings() -> st.SearchStrategy[str]:
    return st.sampled_from(STRINGS) | st.text(max_size=12)


def scalar(field: FieldDescriptor) -> st.SearchStrategy:
    t = field.type
    if t in _INTS:
        lo, hi = _INTS[t]
        return st.sampled_from([0, 1, -1 if lo < 0 else 2, lo, hi]) | st.integers(lo, hi)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.floats(width=32 if t == FieldDescriptor.TYPE_FLOAT else 64)
    if t == FieldDescriptor.TYPE_STRING:
        return strings()
    if t == FieldDescriptor.TYPE_BYTES:
        return st.sampled_from(BLOBS) | st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_ENUM:
        return st.integers(-1, len(field.enum_type.values) + 1)
    raise AssertionError(f"unhandled field type {t}")


def message(descriptor, depth: int = 0) -> st.SearchStrategy:
    cls = message_factory.GetMessageClass(descriptor)
    if descriptor.full_name == "google.protobuf.Any":
        return st.builds(lambda url, value: cls(type_url=url, value=value),
                         st.sampled_from(STRINGS[-12:] + ["", "junk"]) | strings(),
                         st.sampled_from(BLOBS) | st.binary(max_size=64))
    if descriptor.full_name == "google.protobuf.Timestamp":
        return st.builds(lambda s, n: cls(seconds=s, nanos=n),
                         st.integers(-(1 << 40), 1 << 40), st.integers(-5, 10**9 + 5))
    if depth > 3:
        return st.just(cls())
    fields = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key = field.message_type.fields_by_name["key"]
            value = field.message_type.fields_by_name["value"]
            fields[field.name] = st.dictionaries(
                scalar(key), _value(value, depth + 1), max_size=3)
        elif field.is_repeated:
            fields[field.name] = st.lists(_value(field, depth + 1), max_size=3)
        else:
            fields[field.name] = _value(field, depth + 1)
    return st.fixed_dictionaries({}, optional=fields).map(lambda values: _build(cls, values))


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy:
    if field.message_type is not None:
        return message(field.message_type, depth)
    return scalar(field)


def _build(cls, values: dict):
    msg = cls()
    for name, value in values.items():
        field = cls.DESCRIPTOR.fields_by_name[name]
        target = getattr(msg, name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            for k, v in value.items():
                if field.message_type.fields_by_name["value"].message_type is not None:
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif field.is_repeated:
            for v in value:
                if field.message_type is not None:
                    target.add().CopyFrom(v)
                else:
                    target.append(v)
        elif field.message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


# ---- calling a method with anything ------------------------------------------------------

def call(channel: grpc.Channel, path: str, method, bodies: list[bytes],
         namespace: str) -> tuple[grpc.StatusCode, str]:
    """Send serialized `bodies` (one unless the method streams requests); the final code."""
    metadata = (("containerd-namespace", namespace),) if namespace else ()
    identity = {"request_serializer": None, "response_deserializer": None}
    client_stream, server_stream = method.client_streaming, method.server_streaming
    timeout = 1 if server_stream else 20
    try:
        if not client_stream and not server_stream:
            channel.unary_unary(path, **identity)(bodies[0], metadata=metadata, timeout=timeout)
        elif not client_stream:
            for i, _ in enumerate(channel.unary_stream(path, **identity)(
                    bodies[0], metadata=metadata, timeout=timeout)):
                if i > 50:
                    break
        elif not server_stream:
            channel.stream_unary(path, **identity)(iter(bodies), metadata=metadata,
                                                   timeout=timeout)
        else:
            for i, _ in enumerate(channel.stream_stream(path, **identity)(
                    iter(bodies), metadata=metadata, timeout=timeout)):
                if i > 50:
                    break
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def parses(method, body: bytes) -> bool:
    cls = message_factory.GetMessageClass(method.input_type)
    try:
        cls.FromString(body)
    except Exception:  # noqa: BLE001 - any parse failure
        return False
    return True


def check_answer(path: str, method, bodies: list[bytes], code, details: str) -> None:
    stats.record("inputs")
    assert code != grpc.StatusCode.UNKNOWN, f"{path}: UNKNOWN ({details}) for {bodies!r:.300}"
    if code == grpc.StatusCode.INTERNAL:
        assert not all(parses(method, b) for b in bodies), \
            f"{path}: INTERNAL ({details}) for a well-formed request {bodies!r:.300}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        assert method.server_streaming, f"{path}: no answer in time for {bodies!r:.300}"


@pytest.fixture(scope="module")
def channel(shared_daemon):
    with shared_daemon.channel() as ch:
        yield ch
    assert shared_daemon.proc.poll() is None, "runtimed died:\n" + shared_daemon.log_text()


FUZZED = [(path, m) for path, m in METHODS if path not in NOT_FUZZED]


def fuzz_messages(channel, path: str, method, examples: int) -> None:
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def fuzz(data):
        count = data.draw(st.integers(1, 3)) if method.client_streaming else 1
        bodies = [data.draw(message(method.input_type)).SerializeToString()
                  for _ in range(count)]
        namespace = data.draw(st.sampled_from(NAMESPACES))
        code, details = call(channel, path, method, bodies, namespace)
        check_answer(path, method, bodies, code, details)

    fuzz()
    assert version(channel), "runtimed stopped answering"


def fuzz_bytes(channel, path: str, method, examples: int) -> None:
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=st.binary(max_size=512) | st.sampled_from(
        [b"\xff" * 16, b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x80\x80\x80\x80\x01"]))
    def fuzz(body):
        code, details = call(channel, path, method, [body], "trt-fuzz")
        check_answer(path, method, [body], code, details)

    fuzz()
    assert version(channel), "runtimed stopped answering"


IDS = [p for p, _ in FUZZED]


@pytest.mark.parametrize("path,method", FUZZED, ids=IDS)
def test_random_messages(channel, path, method):
    fuzz_messages(channel, path, method, EXAMPLES)


@pytest.mark.parametrize("path,method", FUZZED, ids=IDS)
def test_random_bytes(channel, path, method):
    fuzz_bytes(channel, path, method, EXAMPLES // 2)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("path,method", FUZZED, ids=IDS)
def test_random_input_soak(channel, path, method):
    examples = SOAK_EXAMPLES // 5 if method.server_streaming else SOAK_EXAMPLES  # 1 s each
    fuzz_messages(channel, path, method, examples)
    fuzz_bytes(channel, path, method, examples // 3)
