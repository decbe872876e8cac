"""Hostile registry responses to the daemon's Registry.Pull, from a tiny HTTP registry on
127.0.0.1 (and a second "host" on 127.0.0.2): blobs that do not match their digest, an
endless layer body, a redirect to another host (which must never see the credentials) and
a redirect loop. Refusals are clear and leave no image and no blob behind."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest

from runtimed.api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from runtimed.api.registry.v1 import registry_pb2, registry_pb2_grpc
from tests.testimages import host_arch
from tests.torture import stats
from tests.torture.helpers import blob_path, corrupt_blobs, md, metadata_problems, version

USER, PASSWORD = "trt", "s3cret"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_image() -> dict[str, bytes]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        payload = b"hello from a hostile registry\n"
        info = tarfile.TarInfo("hello.txt")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    layer = gzip.compress(raw.getvalue(), mtime=0)
    config = json.dumps({"architecture": host_arch(), "os": "linux", "config": {},
                         "rootfs": {"type": "layers",
                                    "diff_ids": [digest(raw.getvalue())]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digest(layer), "size": len(layer)}],
    }).encode()
    return {"manifest": manifest, "config": config, "layer": layer}


IMAGE = make_image()
BLOBS = {digest(IMAGE["config"]): IMAGE["config"], digest(IMAGE["layer"]): IMAGE["layer"]}
LAYER = digest(IMAGE["layer"])


class Registry:
    """Serves one image under /v2/<mode>/..., misbehaving as <mode> says."""

    def __init__(self):
        self.other_host_headers: list[dict] = []
        self.stop = threading.Event()
        registry = self

        class OtherHost(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                registry.other_host_headers.append(dict(self.headers))
                body = BLOBS[self.path.rsplit("/", 1)[-1]]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _authorized(self) -> bool:
                import base64

                expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                if self.headers.get("Authorization") == expected:
                    return True
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="trt"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return False

            def _send(self, body: bytes, content_type: str = "application/octet-stream",
                      head: bool = False) -> None:
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Docker-Content-Digest", digest(body))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def do_HEAD(self):  # noqa: N802
                self.do_GET(head=True)

            def do_GET(self, head: bool = False):  # noqa: N802
                if not self._authorized():
                    return
                parts = self.path.split("/")  # "", "v2", mode, kind, ref
                if self.path == "/v2/" or len(parts) < 5:
                    return self._send(b"{}", "application/json", head)
                mode, kind, ref = parts[2], parts[3], parts[4]
                if kind == "manifests":
                    return self._send(IMAGE["manifest"], json.loads(IMAGE["manifest"])["mediaType"],
                                      head)
                if ref not in BLOBS:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if ref != LAYER or mode == "good":
                    return self._send(BLOBS[ref], head=head)
                if mode == "wrongdigest":
                    body = bytearray(BLOBS[ref])
                    body[len(body) // 2] ^= 0xFF
                    return self._send(bytes(body), head=head)
                if mode == "endless":
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.close_connection = True
                    chunk = b"\0" * 65536
                    try:
                        for _ in range(16384):  # 1 GiB at most
                            if registry.stop.is_set():
                                break
                            self.wfile.write(chunk)
                    except OSError:
                        pass
                    return
                if mode == "redirect":
                    location = f"http://127.0.0.2:{registry.other_port}/blobs/{ref}"
                elif mode == "loop":
                    location = self.path
                self.send_response(307)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.other = ThreadingHTTPServer(("127.0.0.2", 0), OtherHost)
        self.port = self.server.server_address[1]
        self.other_port = self.other.server_address[1]
        for server in (self.server, self.other):
            threading.Thread(target=server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        for server in (self.server, self.other):
            server.shutdown()
            server.server_close()


@pytest.fixture
def registry():
    r = Registry()
    yield r
    r.close()


def pull(channel, ns: str, reference: str) -> None:
    request = registry_pb2.PullRequest(reference=reference, unpack=False)
    request.options.plain_http = True
    request.options.auth.username = USER
    request.options.auth.password = PASSWORD
    request.options.progress_timeout = 10
    for _ in registry_pb2_grpc.RegistryStub(channel).Pull(request, metadata=md(ns), timeout=90):
        pass


def images(channel, ns: str) -> list[str]:
    stub = images_pb2_grpc.ImagesStub(channel)
    return [i.name for i in stub.List(images_pb2.ListImagesRequest(), metadata=md(ns)).images]


@pytest.mark.parametrize("mode,codes", [
    ("wrongdigest", {grpc.StatusCode.FAILED_PRECONDITION}),
    ("endless", {grpc.StatusCode.FAILED_PRECONDITION}),
    ("loop", {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION}),
])
def test_hostile_responses_are_refused_and_leave_nothing(daemon, ns, registry, mode, codes):
    reference = f"127.0.0.1:{registry.port}/{mode}:latest"
    with daemon.channel() as channel:
        with pytest.raises(grpc.RpcError) as info:
            pull(channel, ns, reference)
        stats.record("inputs")
        assert info.value.code() in codes, (info.value.code(), info.value.details())
        assert images(channel, ns) == []
        assert not blob_path(daemon.root, LAYER).exists()
        assert metadata_problems(channel, daemon.root) == []
        assert corrupt_blobs(daemon.root) == []
        assert version(channel)
        pull(channel, ns, f"127.0.0.1:{registry.port}/good:latest")  # then a good pull works
        assert images(channel, ns) == [f"127.0.0.1:{registry.port}/good:latest"]


def test_a_redirect_to_another_host_gets_no_credentials(daemon, ns, registry):
    reference = f"127.0.0.1:{registry.port}/redirect:latest"
    with daemon.channel() as channel:
        pull(channel, ns, reference)  # blob stores (S3, CDNs) redirect: that is allowed
        stats.record("inputs")
        assert images(channel, ns) == [reference]
        assert blob_path(daemon.root, LAYER).exists()
    assert registry.other_host_headers, "the redirect was not followed"
    for headers in registry.other_host_headers:
        assert "Authorization" not in headers, headers
