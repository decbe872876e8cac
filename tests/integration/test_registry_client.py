"""Pull and push cores against a real docker-registry on loopback (no daemon needed)."""

from __future__ import annotations

import hashlib
import os

import pytest

from runtimed.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from runtimed.images import mediatypes, platforms
from runtimed.images.platforms import Platform
from runtimed.images.registry import credentials
from runtimed.images.registry.credentials import Credentials
from runtimed.images.registry.hosts import RegistryHosts
from runtimed.images.registry.pull import Puller, PullOptions
from runtimed.images.registry.push import Pusher, PushOptions
from tests.registry_server import (
    PASSWORD,
    USERNAME,
    CuttingProxy,
    build_image,
    build_index,
    open_store,
)

NS = "default"


@pytest.fixture
def stores(tmp_path):
    """Two content stores: `src` holds images to push, `dst` receives pulls."""
    return open_store(tmp_path / "src"), open_store(tmp_path / "dst")


def _image(store, size=4096, platform=("linux", "amd64"), **kw):
    return build_image(
        store,
        NS,
        [{"etc/hello": b"hello\n"}, {"data/blob": os.urandom(size)}],
        platform=platform,
        **kw,
    )


def _blob(store, digest) -> bytes:
    return b"".join(store.read_chunks(NS, digest))


def _roundtrip(stores, host, options_kw, *, docker=False, push_kw=None, image=None):
    src, dst = stores
    image = image or _image(src, docker=docker)
    events = []
    pushed = Pusher(src).push(
        NS,
        f"{host}/team/app:v1",
        image.target,
        PushOptions(**options_kw, **(push_kw or {})),
        events.append,
    )
    assert pushed.digest == image.target.digest
    pulled = Puller(dst).pull(NS, f"{host}/team/app:v1", PullOptions(**options_kw))
    assert pulled.target.digest == image.target.digest
    assert pulled.target.media_type == image.target.media_type
    for layer in image.layers:
        assert _blob(dst, layer.digest) == _blob(src, layer.digest)
        diff = dst.info(NS, layer.digest).labels[mediatypes.LABEL_UNCOMPRESSED]
        assert diff == src.info(NS, layer.digest).labels[mediatypes.LABEL_UNCOMPRESSED]
    assert _blob(dst, image.target.digest) == _blob(src, image.target.digest)
    return image, pulled, events


def test_push_then_pull_plain_http_identical_digests(registry, stores):
    image, pulled, events = _roundtrip(stores, registry.host, {})
    assert {e.state for e in events if e.digest in {ly.digest for ly in image.layers}} >= {
        "uploading",
        "done",
    }
    dst = stores[1]
    labels = dst.info(NS, image.target.digest).labels
    assert labels["containerd.io/distribution.source.127.0.0.1"] == "team/app"
    assert labels["containerd.io/gc.ref.content.l.1"] == image.layers[1].digest
    assert pulled.name == f"{registry.host}/team/app:v1"


def test_docker_schema2_round_trip(registry, stores):
    image, pulled, _ = _roundtrip(stores, registry.host, {}, docker=True)
    assert pulled.target.media_type == mediatypes.DOCKER_MANIFEST


def test_https_with_self_signed_ca(registry_tls, stores):
    _roundtrip(stores, registry_tls.host, {"ca": str(registry_tls.ca)})


def test_https_untrusted_ca_is_refused_not_downgraded(registry_tls, stores, tmp_path):
    # a loopback host falls back to HTTP only when the server answers in HTTP; a
    # certificate it cannot verify is an error that says how to trust the registry
    with pytest.raises(Unavailable, match="CERTIFICATE_VERIFY_FAILED.*registry's CA"):
        Puller(stores[1]).pull(NS, f"{registry_tls.host}/team/app:v1")
    # insecure: TLS without verification works
    image = _image(stores[0])
    Pusher(stores[0]).push(
        NS, f"{registry_tls.host}/team/app:v1", image.target, PushOptions(insecure=True)
    )
    pulled = Puller(stores[1]).pull(
        NS, f"{registry_tls.host}/team/app:v1", PullOptions(insecure=True)
    )
    assert pulled.target.digest == image.target.digest


def test_basic_auth_with_config_json(registry_basic, stores, tmp_path):
    config = tmp_path / "docker" / "config.json"
    credentials.store(registry_basic.host, USERNAME, PASSWORD, config)
    _roundtrip(stores, registry_basic.host, {"credentials_file": config})


def test_basic_auth_wrong_password_is_a_clear_error(registry_basic, stores):
    image = _image(stores[0])
    bad = Credentials(USERNAME, "wrong")
    with pytest.raises(PermissionDenied, match="refused the credentials") as info:
        Pusher(stores[0]).push(
            NS, f"{registry_basic.host}/team/app:v1", image.target, PushOptions(credentials=bad)
        )
    assert registry_basic.host in str(info.value)
    with pytest.raises(PermissionDenied, match="authentication required"):
        Puller(stores[1]).pull(
            NS,
            f"{registry_basic.host}/team/app:v1",
            PullOptions(credentials_file="/nonexistent/config.json"),
        )


def test_token_auth(registry_token, stores):
    creds = Credentials(USERNAME, PASSWORD)
    _roundtrip(stores, registry_token.host, {"ca": str(registry_token.ca), "credentials": creds})
    requests = registry_token.token_server.requests
    assert any("repository:team/app:pull,push" in r["scopes"] for r in requests)
    assert all(r["user"] == USERNAME for r in requests)
    assert len(requests) == 2  # one token per operation, shared by the concurrent requests


def test_token_auth_wrong_password(registry_token, stores):
    image = _image(stores[0])
    with pytest.raises(PermissionDenied, match="token server .* refused user 'tester'"):
        Pusher(stores[0]).push(
            NS,
            f"{registry_token.host}/team/app:v1",
            image.target,
            PushOptions(ca=str(registry_token.ca), credentials=Credentials(USERNAME, "nope")),
        )


def test_multi_platform_index_pulls_the_right_platform(registry, stores):
    src, dst = stores
    amd = _image(src, platform=("linux", "amd64"))
    arm = _image(src, platform=("linux", "arm64"))
    index = build_index(src, NS, [amd, arm])
    Pusher(src).push(NS, f"{registry.host}/multi:1", index.target, PushOptions())
    arm_only = platforms.only(Platform("linux", "arm64"))
    result = Puller(dst).pull(NS, f"{registry.host}/multi:1", PullOptions(platforms=arm_only))
    assert result.target.digest == index.target.digest
    assert [m.digest for m in result.manifests] == [arm.manifests[0].digest]
    for layer in arm.layers:
        assert dst.exists(NS, layer.digest)
    assert not dst.exists(NS, amd.layers[1].digest)
    assert not dst.exists(NS, amd.manifests[0].digest)
    # --all-platforms fetches the rest
    both = Puller(dst).pull(NS, f"{registry.host}/multi:1", PullOptions(all_platforms=True))
    assert {m.digest for m in both.manifests} == {amd.manifests[0].digest, arm.manifests[0].digest}
    assert dst.exists(NS, amd.layers[1].digest)
    # a platform the index lacks: NotFound naming what it offers
    with pytest.raises(NotFound, match="linux/amd64, linux/arm64"):
        Puller(open_store(dst.root.parent.parent / "third")).pull(
            NS,
            f"{registry.host}/multi:1",
            PullOptions(platforms=platforms.only(Platform("linux", "s390x"))),
        )


def test_push_with_platform_pushes_only_that_manifest(registry, stores):
    src, dst = stores
    amd = _image(src, platform=("linux", "amd64"))
    arm = _image(src, platform=("linux", "arm64"))
    index = build_index(src, NS, [amd, arm])
    pushed = Pusher(src).push(
        NS,
        f"{registry.host}/one:1",
        index.target,
        PushOptions(platforms=platforms.only(Platform("linux", "arm64"))),
    )
    assert pushed.digest == arm.manifests[0].digest
    result = Puller(dst).pull(NS, f"{registry.host}/one:1", PullOptions(all_platforms=True))
    assert result.target.digest == arm.manifests[0].digest


def test_unknown_image_is_not_found_naming_the_reference(registry, stores):
    src, dst = stores
    with pytest.raises(NotFound, match=f"{registry.host}/nothing/here:v9"):
        Puller(dst).pull(NS, f"{registry.host}/nothing/here:v9")
    image = _image(src)
    Pusher(src).push(NS, f"{registry.host}/team/app:v1", image.target)
    with pytest.raises(NotFound, match=f"{registry.host}/team/app:missing"):
        Puller(dst).pull(NS, f"{registry.host}/team/app:missing")
    assert dst.list(NS) == []


def test_corrupted_blob_is_rejected_and_nothing_stored(registry, stores):
    src, dst = stores
    image = _image(src, size=200_000)
    Pusher(src).push(NS, f"{registry.host}/team/app:v1", image.target)
    victim = registry.blob_path(image.layers[1].digest)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(FailedPrecondition, match="refused, nothing stored") as info:
        Puller(dst).pull(NS, f"{registry.host}/team/app:v1", PullOptions(concurrency=1))
    assert image.layers[1].digest in str(info.value)
    assert not dst.exists(NS, image.layers[1].digest)
    assert not dst.exists(NS, image.target.digest)
    assert dst.list_statuses(NS) == []
    assert not any((dst.root / "ingest").iterdir())


def test_cut_connection_mid_layer_resumes_with_range(registry, stores):
    src, dst = stores
    size = int(os.environ.get("RUNTIMED_TEST_RESUME_MB", "200")) << 20
    image = _image(src, size=size, compress=False)
    Pusher(src).push(NS, f"{registry.host}/big:1", image.target)
    proxy = CuttingProxy(registry.host, after=size // 3, cuts=2)
    try:
        result = Puller(dst).pull(NS, f"{proxy.host}/big:1", PullOptions(concurrency=2))
    finally:
        proxy.close()
    assert proxy.cuts == 2
    big = image.layers[1]
    assert any("Range: bytes=" in r and big.digest in r for r in proxy.requests), proxy.requests
    assert result.target.digest == image.target.digest
    digest = hashlib.sha256()
    for chunk in dst.read_chunks(NS, big.digest):
        digest.update(chunk)
    assert "sha256:" + digest.hexdigest() == big.digest


def test_interrupted_ingest_resumes_on_next_pull(registry, stores):
    src, dst = stores
    image = _image(src, size=3 << 20, compress=False)
    Pusher(src).push(NS, f"{registry.host}/team/app:v1", image.target)
    big = image.layers[1]
    half = b"".join(src.read_chunks(NS, big.digest, 0, big.size // 2))
    writer = dst.writer(NS, f"pull-{big.digest}", total=big.size, expected=big.digest)
    writer.write(half)
    writer.close()  # as if the daemon died mid-download
    proxy = CuttingProxy(registry.host, after=1 << 40, cuts=0)
    try:
        Puller(dst).pull(NS, f"{proxy.host}/team/app:v1")
    finally:
        proxy.close()
    assert any(f"Range: bytes={len(half)}-" in r for r in proxy.requests), proxy.requests
    assert _blob(dst, big.digest) == _blob(src, big.digest)


def test_push_skips_existing_blobs_and_mounts_across_repositories(registry, stores):
    src, dst = stores
    image = _image(src)
    Pusher(src).push(NS, f"{registry.host}/first/app:1", image.target)
    events = []
    Pusher(src).push(NS, f"{registry.host}/first/app:2", image.target, None, events.append)
    layer_states = {
        e.digest: e.state for e in events if e.digest in {ly.digest for ly in image.layers}
    }
    assert set(layer_states.values()) == {"exists"}
    # pulled blobs remember their source repository: pushing elsewhere mounts them
    Puller(dst).pull(NS, f"{registry.host}/first/app:1")
    events = []
    Pusher(dst).push(NS, f"{registry.host}/second/app:1", image.target, None, events.append)
    layer_states = {
        e.digest: e.state for e in events if e.digest in {ly.digest for ly in image.layers}
    }
    assert set(layer_states.values()) == {"mounted"}
    again = Puller(open_store(dst.root.parent.parent / "third")).pull(
        NS, f"{registry.host}/second/app:1"
    )
    assert again.target.digest == image.target.digest


def test_chunked_upload(registry, stores):
    image, _, events = _roundtrip(
        stores, registry.host, {}, push_kw={"monolithic_max": 1000, "chunk_size": 777}
    )
    big = image.layers[1]
    offsets = [e.offset for e in events if e.digest == big.digest and e.state == "uploading"]
    assert 777 in offsets and 2 * 777 in offsets  # went up in PATCHes of 777 bytes


def test_mirror_serves_pulls(registry, stores):
    src, dst = stores
    image = _image(src)
    Pusher(src).push(NS, f"{registry.host}/team/app:v1", image.target)
    # the origin is a dead loopback port: only the mirror can answer
    hosts = RegistryHosts({"localhost:9": {"mirrors": [f"http://{registry.host}"]}})
    result = Puller(dst, hosts).pull(NS, "localhost:9/team/app:v1")
    assert result.target.digest == image.target.digest


def test_concurrent_pulls_of_one_image_share_blobs(registry, stores):
    import concurrent.futures

    src, dst = stores
    image = _image(src, size=2 << 20)
    Pusher(src).push(NS, f"{registry.host}/team/app:v1", image.target)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(
            pool.map(lambda _: Puller(dst).pull(NS, f"{registry.host}/team/app:v1"), range(3))
        )
    assert {r.target.digest for r in results} == {image.target.digest}
    assert _blob(dst, image.layers[1].digest) == _blob(src, image.layers[1].digest)


def test_stalled_download_resumes_after_the_progress_timeout(registry, stores):
    src, dst = stores
    image = _image(src, size=4 << 20, compress=False)
    Pusher(src).push(NS, f"{registry.host}/team/app:v1", image.target)
    proxy = CuttingProxy(registry.host, after=1 << 20, cuts=1, stall=True)
    try:
        result = Puller(dst).pull(NS, f"{proxy.host}/team/app:v1", PullOptions(progress_timeout=1))
    finally:
        proxy.close()
    assert proxy.cuts == 1
    assert any("Range: bytes=" in r for r in proxy.requests), proxy.requests
    assert result.target.digest == image.target.digest


def test_progress_and_overall_deadlines(registry, stores):
    src, dst = stores
    image = _image(src, size=8 << 20, compress=False)
    Pusher(src).push(NS, f"{registry.host}/team/app:v1", image.target)
    proxy = CuttingProxy(registry.host, after=1 << 20, cuts=100, stall=True)
    try:
        with pytest.raises(DeadlineExceeded, match="no data for 0.5s"):
            Puller(dst).pull(
                NS,
                f"{proxy.host}/team/app:v1",
                PullOptions(progress_timeout=0.5, resume_attempts=1),
            )
        # a fresh store: the first attempt's ingest would let this one resume
        fresh = open_store(dst.root.parent.parent / "fresh")
        with pytest.raises(DeadlineExceeded, match="1.5s deadline"):
            Puller(fresh).pull(
                NS,
                f"{proxy.host}/team/app:v1",
                PullOptions(progress_timeout=0.5, timeout=1.5, resume_attempts=100),
            )
    finally:
        proxy.close()
    assert not dst.exists(NS, image.layers[1].digest)
    assert not dst.exists(NS, image.target.digest)


def test_push_of_a_partly_pulled_index_names_the_fix(registry, stores):
    src, dst = stores
    amd = _image(src, platform=("linux", "amd64"))
    arm = _image(src, platform=("linux", "arm64"))
    index = build_index(src, NS, [amd, arm])
    Pusher(src).push(NS, f"{registry.host}/multi:1", index.target)
    arm_only = platforms.only(Platform("linux", "arm64"))
    Puller(dst).pull(NS, f"{registry.host}/multi:1", PullOptions(platforms=arm_only))
    with pytest.raises(FailedPrecondition, match="--platform"):
        Pusher(dst).push(NS, f"{registry.host}/copy:1", index.target)
    pushed = Pusher(dst).push(
        NS, f"{registry.host}/copy:1", index.target, PushOptions(platforms=arm_only)
    )
    assert pushed.digest == arm.manifests[0].digest


def test_layer_not_matching_the_config_diff_id_is_refused(registry, stores):
    src, dst = stores
    lie = "sha256:" + "0" * 64
    image = build_image(src, NS, [{"a": b"x"}, {"b": b"y"}], diff_ids=[lie, lie])
    Pusher(src).push(NS, f"{registry.host}/liar:1", image.target)
    with pytest.raises(FailedPrecondition, match="image config lists " + lie):
        Puller(dst).pull(NS, f"{registry.host}/liar:1")
    assert not any(dst.exists(NS, layer.digest) for layer in image.layers)
    assert not dst.exists(NS, image.target.digest)


def test_endless_manifest_body_is_refused(stores):
    """A hostile registry that promises 100 bytes and never stops sending."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    digest = "sha256:" + "ab" * 32

    class Hostile(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self.send_response(200)
            self.send_header("Content-Type", mediatypes.OCI_MANIFEST)
            self.send_header("Docker-Content-Digest", digest)
            self.send_header("Content-Length", "100")
            self.end_headers()

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", mediatypes.OCI_MANIFEST)
            self.end_headers()
            try:
                for _ in range(10_000):
                    self.wfile.write(b" " * 65536)
            except OSError:
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(FailedPrecondition, match="more than 100 bytes"):
            Puller(stores[1]).pull(NS, f"127.0.0.1:{server.server_address[1]}/evil:1")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert stores[1].list(NS) == []


def test_zstd_layers_get_their_diff_id_while_streaming(registry, stores):
    src, dst = stores
    image = _image(src, size=100_000, compress="zstd")
    assert image.layers[0].media_type == mediatypes.OCI_LAYER_ZSTD
    _, pulled, _ = _roundtrip(stores, registry.host, {}, image=image)
    assert pulled.target.digest == image.target.digest


def test_pull_by_digest_and_a_mismatching_pin(registry, stores):
    src, dst = stores
    image = _image(src)
    Pusher(src).push(NS, f"{registry.host}/team/app:v1", image.target)
    pinned = Puller(dst).pull(NS, f"{registry.host}/team/app@{image.target.digest}")
    assert pinned.target.digest == image.target.digest
    assert pinned.name == f"{registry.host}/team/app@{image.target.digest}"
    other = "sha256:" + "12" * 32
    with pytest.raises(NotFound, match=f"team/app:v1@{other}"):
        Puller(dst).pull(NS, f"{registry.host}/team/app:v1@{other}")
