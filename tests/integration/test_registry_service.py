"""runtimed.registry.v1.Registry through a real daemon, against a real registry."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import grpc
import pytest

from runtimed.api.containerd.types import platform_pb2
from runtimed.api.registry.v1 import registry_pb2, registry_pb2_grpc
from runtimed.images.registry.pull import Puller
from runtimed.images.registry.push import Pusher
from tests.conftest import DaemonProcess
from tests.registry_server import PASSWORD, USERNAME, build_image, build_index, open_store

NS = "default"
META = (("containerd-namespace", NS),)


@pytest.fixture
def source(tmp_path):
    """A local content store holding a two-layer image, to seed registries with."""
    store = open_store(tmp_path / "source")
    image = build_image(store, NS, [{"etc/motd": b"hi\n"}, {"bin/data": os.urandom(300_000)}])
    return store, image


def _stub(daemon):
    channel = daemon.channel()
    return channel, registry_pb2_grpc.RegistryStub(channel)


def _pull(stub, reference, **kw):
    responses = list(
        stub.Pull(registry_pb2.PullRequest(reference=reference, **kw), metadata=META, timeout=120)
    )
    assert responses[-1].WhichOneof("response") == "result"
    return [r.progress for r in responses[:-1]], responses[-1].result


def test_pull_streams_progress_and_records_the_image(daemon, registry, source):
    store, image = source
    Pusher(store).push(NS, f"{registry.host}/team/app:v1", image.target)
    channel, stub = _stub(daemon)
    with channel:
        progress, result = _pull(stub, f"{registry.host}/team/app:v1")
    assert result.name == f"{registry.host}/team/app:v1"
    assert result.target.digest == image.target.digest
    big = image.layers[1]
    states = [p.state for p in progress if p.digest == big.digest]
    assert states[0] == "waiting" and states[-1] == "done"
    assert any(p.total == big.size for p in progress if p.digest == big.digest)
    listed = daemon.ctr("images", "ls", "-q").stdout.split()
    assert f"{registry.host}/team/app:v1" in listed
    blobs = daemon.ctr("content", "ls", "-q").stdout.split()
    assert {layer.digest for layer in image.layers} <= set(blobs)
    # the temporary pull lease is gone: the image record alone keeps the blobs
    assert daemon.ctr("leases", "ls", "-q").stdout.split() == []


def test_push_from_daemon_round_trip_identical_digests(daemon, registry, source, tmp_path):
    store, image = source
    Pusher(store).push(NS, f"{registry.host}/team/app:v1", image.target)
    channel, stub = _stub(daemon)
    with channel:
        _pull(stub, f"{registry.host}/team/app:v1")
        responses = list(
            stub.Push(
                registry_pb2.PushRequest(
                    image=f"{registry.host}/team/app:v1", reference=f"{registry.host}/copy/app:v2"
                ),
                metadata=META,
                timeout=120,
            )
        )
    result = responses[-1].result
    assert result.reference == f"{registry.host}/copy/app:v2"
    assert result.target.digest == image.target.digest
    states = {r.progress.digest: r.progress.state for r in responses[:-1]}
    assert states[image.layers[1].digest] == "mounted"  # same registry, other repository
    fresh = open_store(tmp_path / "fresh")
    pulled = Puller(fresh).pull(NS, f"{registry.host}/copy/app:v2")
    assert pulled.target.digest == image.target.digest
    assert b"".join(fresh.read_chunks(NS, image.layers[1].digest)) == b"".join(
        store.read_chunks(NS, image.layers[1].digest)
    )


def test_pull_platform_from_index(daemon, registry, tmp_path):
    store = open_store(tmp_path / "source")
    amd = build_image(store, NS, [{"a": b"amd"}], platform=("linux", "amd64"))
    arm = build_image(store, NS, [{"a": b"arm"}], platform=("linux", "arm64"))
    index = build_index(store, NS, [amd, arm])
    Pusher(store).push(NS, f"{registry.host}/multi:1", index.target)
    channel, stub = _stub(daemon)
    with channel:
        _, result = _pull(
            stub,
            f"{registry.host}/multi:1",
            platforms=[platform_pb2.Platform(os="linux", architecture="arm64")],
        )
    assert [m.digest for m in result.manifests] == [arm.manifests[0].digest]
    blobs = set(daemon.ctr("content", "ls", "-q").stdout.split())
    assert arm.layers[0].digest in blobs and amd.layers[0].digest not in blobs


def test_unknown_image_is_not_found_with_the_reference(daemon, registry):
    channel, stub = _stub(daemon)
    with channel, pytest.raises(grpc.RpcError) as info:
        _pull(stub, f"{registry.host}/no/such:image")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert f"{registry.host}/no/such:image" in info.value.details()
    assert daemon.ctr("leases", "ls", "-q").stdout.split() == []  # nothing to resume


def test_invalid_reference_is_invalid_argument(daemon):
    channel, stub = _stub(daemon)
    with channel, pytest.raises(grpc.RpcError) as info:
        _pull(stub, "Not/Valid")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "lowercase" in info.value.details()


def test_basic_auth_per_call_and_wrong_password(daemon, registry_basic, source):
    store, image = source
    from runtimed.images.registry.credentials import Credentials
    from runtimed.images.registry.push import PushOptions

    Pusher(store).push(
        NS,
        f"{registry_basic.host}/team/app:v1",
        image.target,
        PushOptions(credentials=Credentials(USERNAME, PASSWORD)),
    )
    channel, stub = _stub(daemon)
    with channel:
        with pytest.raises(grpc.RpcError) as info:
            _pull(
                stub,
                f"{registry_basic.host}/team/app:v1",
                options=registry_pb2.TransferOptions(
                    auth=registry_pb2.Auth(username=USERNAME, password="wrong")
                ),
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "refused the credentials" in info.value.details()
        _, result = _pull(
            stub,
            f"{registry_basic.host}/team/app:v1",
            options=registry_pb2.TransferOptions(
                auth=registry_pb2.Auth(username=USERNAME, password=PASSWORD)
            ),
        )
    assert result.target.digest == image.target.digest


@pytest.fixture
def daemon_trusting(registry_tls, leak_check):
    """A daemon whose config trusts the HTTPS registry's CA (per-host `ca`)."""
    base = Path(tempfile.mkdtemp(prefix="rtd-", dir="/tmp"))
    config = base / "runtimed.toml"
    config.write_text(f'[registries."{registry_tls.host}"]\nca = "{registry_tls.ca}"\n')
    proc = DaemonProcess(base, ["--config", str(config)])
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_https_registry_with_ca_from_daemon_config(daemon_trusting, registry_tls, source):
    store, image = source
    from runtimed.images.registry.push import PushOptions

    Pusher(store).push(
        NS, f"{registry_tls.host}/team/app:v1", image.target, PushOptions(ca=str(registry_tls.ca))
    )
    channel, stub = _stub(daemon_trusting)
    with channel:
        _, result = _pull(stub, f"{registry_tls.host}/team/app:v1")
    assert result.target.digest == image.target.digest


def test_pull_unpacks_each_layer_while_later_layers_download(daemon, registry, tmp_path):
    import hashlib

    from runtimed.images.unpack import chain_ids

    store = open_store(tmp_path / "source")
    image = build_image(
        store, NS, [{"etc/motd": b"first\n"}, {"bin/big": os.urandom(48 << 20)}], compress=False
    )
    Pusher(store).push(NS, f"{registry.host}/team/unpack:v1", image.target)
    channel, stub = _stub(daemon)
    with channel:
        progress, result = _pull(
            stub,
            f"{registry.host}/team/unpack:v1",
            unpack=True,
            options=registry_pb2.TransferOptions(concurrency=2),
        )
    first, big = image.layers
    order = [(p.digest, p.state) for p in progress]
    assert order.index((first.digest, "unpacked")) < order.index((big.digest, "done"))
    assert (big.digest, "unpacked") in order
    diff_ids = []
    for layer in image.layers:
        data = b"".join(store.read_chunks(NS, layer.digest))
        diff_ids.append("sha256:" + hashlib.sha256(data).hexdigest())
    snapshots = daemon.ctr("snapshots", "ls").stdout
    for chain_id in chain_ids(diff_ids):
        assert chain_id in snapshots
    assert "complete" in daemon.ctr("images", "check").stdout


def test_pull_resumes_after_daemon_kill9(daemon, registry, tmp_path):
    import time

    from tests.registry_server import CuttingProxy

    store = open_store(tmp_path / "source")
    image = build_image(store, NS, [{"a": b"x"}, {"big": os.urandom(32 << 20)}], compress=False)
    Pusher(store).push(NS, f"{registry.host}/team/app:v1", image.target)
    big = image.layers[1]
    proxy = CuttingProxy(registry.host, after=8 << 20, cuts=1, stall=True)
    try:
        channel, stub = _stub(daemon)
        with channel:
            stream = stub.Pull(
                registry_pb2.PullRequest(reference=f"{proxy.host}/team/app:v1"),
                metadata=META,
                timeout=60,
            )
            for response in stream:
                p = response.progress
                if p.digest == big.digest and p.state == "downloading" and p.offset > 0:
                    break
            time.sleep(0.5)  # let the bytes before the stall land in the ingest
            daemon.kill9()
            stream.cancel()
        daemon.start()
        channel, stub = _stub(daemon)
        with channel:
            _, result = _pull(stub, f"{proxy.host}/team/app:v1")
    finally:
        proxy.close()
    resumed = [r for r in proxy.requests if big.digest in r and "Range: bytes=" in r]
    assert resumed, proxy.requests
    offset = int(resumed[-1].split("Range: bytes=")[1].split("-")[0])
    assert offset > 1 << 20  # most of the first 8 MiB was not fetched again
    assert result.target.digest == image.target.digest
    blobs = daemon.ctr("content", "ls", "-q").stdout.split()
    assert big.digest in blobs


def test_client_cancel_stops_the_pull_and_a_retry_resumes(daemon, registry, tmp_path):
    import time

    from tests.registry_server import CuttingProxy

    store = open_store(tmp_path / "source")
    image = build_image(store, NS, [{"a": b"x"}, {"big": os.urandom(16 << 20)}], compress=False)
    Pusher(store).push(NS, f"{registry.host}/team/app:v1", image.target)
    big = image.layers[1]
    proxy = CuttingProxy(registry.host, after=4 << 20, cuts=1, stall=True)
    try:
        channel, stub = _stub(daemon)
        with channel:
            stream = stub.Pull(
                registry_pb2.PullRequest(reference=f"{proxy.host}/team/app:v1"),
                metadata=META,
                timeout=60,
            )
            for response in stream:
                p = response.progress
                if p.digest == big.digest and p.state == "downloading" and p.offset > 0:
                    break
            stream.cancel()
            time.sleep(0.5)
            # the daemon stopped the transfer: the ingest stays for a resume, no image
            assert f"pull-{big.digest}" in daemon.ctr("content", "active").stdout
            assert daemon.ctr("images", "ls", "-q").stdout.split() == []
            _, result = _pull(stub, f"{proxy.host}/team/app:v1")
    finally:
        proxy.close()
    assert result.target.digest == image.target.digest
    assert any(big.digest in r and "Range: bytes=" in r for r in proxy.requests)
