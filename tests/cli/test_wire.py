"""ctl.client.wire: HPACK against the `hpack` package (h2's, a grpclib dependency) and
RFC 7541's examples; the transport against a real runtimed (grpc.aio on the server side):
large messages both ways (flow control), streams cancelled from another thread, deadlines,
a daemon that restarts under a pooled connection, and no grpcio in the client process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtimed import http2
from runtimed.errors import DeadlineExceeded, NotFound
from tests.cli.conftest import REPO

_header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
_header_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20)
_header_lists = st.lists(st.lists(st.tuples(_header_name, _header_text), max_size=8), min_size=1, max_size=6)


@given(_header_lists, st.booleans())
def test_decoder_reads_what_hpack_writes(blocks, huffman):
    """Indexed, incrementally indexed, Huffman-coded and evicted entries, block after block
    on one connection's table, as a server's encoder emits them."""
    import hpack

    encoder = hpack.Encoder()
    encoder.header_table_size = 256  # small, so entries get evicted
    decoder = http2.HeaderDecoder()
    for headers in blocks:
        block = encoder.encode(headers, huffman=huffman)
        assert decoder.decode(block) == headers


def test_decoder_rfc7541_examples():
    decoder = http2.HeaderDecoder()  # C.4: requests with Huffman coding, one table
    assert decoder.decode(bytes.fromhex("828684418cf1e3c2e5f23a6ba0ab90f4ff")) == [
        (":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com")]
    assert decoder.decode(bytes.fromhex("828684be5886a8eb10649cbf")) == [
        (":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com"),
        ("cache-control", "no-cache")]
    with pytest.raises(http2.RpcError):
        decoder.decode(bytes.fromhex("ff"))  # a truncated integer


def test_decoded_blocks_are_kept_only_when_they_leave_the_table_alone():
    """A block of literals decodes the same on any connection (kept, decoded once); one
    that adds to a connection's table adds on every connection that decodes it."""
    literals = http2.encode_headers([(":path", "/a/B"), ("x-name", "value")])
    assert http2.HeaderDecoder().decode(literals) == [(":path", "/a/B"), ("x-name", "value")]
    assert literals in http2._PURE_BLOCKS
    again = http2.HeaderDecoder().decode(literals)
    again.append(("changed", "by the caller"))
    assert http2.HeaderDecoder().decode(literals) == [(":path", "/a/B"), ("x-name", "value")]
    adding = bytes.fromhex("828684418cf1e3c2e5f23a6ba0ab90f4ff")  # RFC 7541 C.4.1
    using = bytes.fromhex("828684be5886a8eb10649cbf")  # C.4.2: entry 62 is C.4.1's
    for _ in range(2):
        decoder = http2.HeaderDecoder()
        assert decoder.decode(adding)[-1] == (":authority", "www.example.com")
        assert decoder.decode(using)[3] == (":authority", "www.example.com")
    assert adding not in http2._PURE_BLOCKS and using not in http2._PURE_BLOCKS


@given(st.lists(st.tuples(_header_name, _header_text), max_size=10))
def test_encoded_headers_decode_with_hpack(headers):
    import hpack

    assert hpack.Decoder().decode(http2.encode_headers(headers)) == headers


def test_client_process_does_not_import_grpc(ctl, busybox):
    code = ("import sys; from ctl.__main__ import main; rc = main(sys.argv[1:]); "
            "assert 'grpc' not in sys.modules, 'grpc imported'; sys.exit(rc)")
    for args in (["version"], ["ps", "-a"], ["images"], ["run", "--rm", busybox, "echo", "hi"]):
        result = subprocess.run([sys.executable, "-c", code, "--address", ctl.address, *args],
                                capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 0, result.stderr


@pytest.fixture
def client(daemon):
    from ctl.client import Client

    with Client(daemon.address) as c:
        yield c


def test_large_messages_both_ways(client, tmp_path):
    """A 5 MB label set goes out (beyond the 64 KiB initial window and 16 KiB frames) and
    comes back in one response message."""
    from runtimed.oci.spec import SpecOptions  # noqa: F401 - the library's public names load

    stub = client._stub("containers")
    pb = stub.pb
    labels = {f"k{i}": "v" * 1000 for i in range(5000)}
    record = pb.Container(id="big", image="none", labels=labels, snapshotter="overlayfs")
    record.runtime.name = "io.containerd.runc.v2"
    record.spec.type_url = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
    record.spec.value = b"{}"
    stub.Create(pb.CreateContainerRequest(container=record))
    try:
        assert client.containers.get("big").labels == labels
    finally:
        stub.Delete(pb.DeleteContainerRequest(id="big"))
    with pytest.raises(NotFound):
        client.containers.get("big")


def test_client_streaming_upload(client, test_images):
    """archive Import streams the tar in chunks (client-streaming, flow-controlled)."""
    from ctl.client import archives

    path = test_images["busybox"].archive
    assert os.path.getsize(path) > 256 << 10
    with open(path, "rb") as f:
        names = archives.import_archive(client, f)
    assert test_images["busybox"].name in [image.name for image in names]


def test_stream_cancelled_from_another_thread(client):
    events = client.events()
    received = []

    def consume():
        received.extend(events)

    reader = threading.Thread(target=consume)
    reader.start()
    time.sleep(0.2)
    client.create_namespace("wire-test")
    client.remove_namespace("wire-test")
    deadline = time.monotonic() + 10
    while len(received) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    events.cancel()
    reader.join(5)
    assert not reader.is_alive()
    assert [e.topic for e in received[:2]] == ["/namespaces/create", "/namespaces/delete"]
    assert client.version()["version"]  # the client carries on after a cancelled stream


def test_deadline(client, busybox):
    client.containers.create("sleeper", busybox, _sleep())
    try:
        client.tasks.create("sleeper")
        client.tasks.start("sleeper")
        with pytest.raises(DeadlineExceeded):
            client.tasks.wait("sleeper", timeout=0.3)
        assert client.tasks.get("sleeper").status == "RUNNING"
    finally:
        client.containers.remove("sleeper", force=True)


def _sleep():
    from runtimed.oci.spec import SpecOptions

    return SpecOptions(args=["sleep", "60"], network="host")


def test_pooled_connection_survives_daemon_restart(client, daemon):
    assert client.version()["version"]
    daemon.restart()
    assert client.version()["version"]
    client.create_namespace("after-restart")
    client.remove_namespace("after-restart")


def test_unreachable_daemon(tmp_path):
    from ctl.client import Client
    from runtimed.errors import Unavailable

    with Client(str(tmp_path / "none.sock")) as c, pytest.raises(Unavailable) as info:
        c.version()
    assert "is the daemon running" in str(info.value)


def test_forked_child_dials_its_own_connection(client):
    """The pooled connection is the parent's: a child that reused it would interleave its
    frames with the parent's on one HTTP/2 connection."""
    assert client.version()["version"]
    pooled = list(client._connection.channel._idle)
    assert pooled
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fresh = client._connection.channel._idle == [] and client.version()["version"]
            code = 0 if fresh and client._connection.channel._idle[0] is not pooled[0] else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert client.version()["version"]
    assert client._connection.channel._idle == pooled  # the parent's survived the child


def test_one_client_many_threads(client):
    """Calls from many threads share a Client: each takes a pooled connection of its own."""
    from concurrent.futures import ThreadPoolExecutor

    def work(n: int) -> int:
        for _ in range(10):
            assert client.version()["version"]
            assert client.containers.list() == []
            client.list_namespaces()
        return n

    with ThreadPoolExecutor(16) as pool:
        assert sorted(pool.map(work, range(32))) == list(range(32))
    assert 1 <= len(client._connection.channel._idle) <= 16


def test_started_calls_run_together_and_answer_in_any_order(client, busybox):
    """`Stub.<Method>.start` sends a unary request at once, each on a connection of its
    own; `result()` reads the answer whenever asked, a typed error included; `cancel()`
    closes the connection of an answer nobody reads, and the channel goes on."""
    tasks, containers = client._stub("tasks"), client._stub("containers")
    missing_task = tasks.Get.start(tasks.pb.GetRequest(container_id="nosuch"))
    missing = containers.Get.start(containers.pb.GetContainerRequest(id="nosuch"))
    listed = containers.List.start(containers.pb.ListContainersRequest())
    assert listed.then(lambda r: len(r.containers)).result() == 0
    with pytest.raises(NotFound):
        missing.result()
    with pytest.raises(NotFound):
        missing_task.then(lambda r: pytest.fail("converted an error")).result()
    fds = len(os.listdir("/proc/self/fd"))
    abandoned = containers.Get.start(containers.pb.GetContainerRequest(id="nosuch"))
    abandoned.cancel()
    abandoned.cancel()  # once is enough
    assert len(os.listdir("/proc/self/fd")) <= fds  # its connection (a pooled one) closed
    answered = containers.List.start(containers.pb.ListContainersRequest())
    answered.result()
    answered.cancel()  # after result(): the pooled connection stays usable
    assert client.containers.list() == [] and client.version()["version"]
