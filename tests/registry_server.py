"""A real distribution registry (Debian's `docker-registry`) on loopback, for tests.

`start_registry` runs one on a free 127.0.0.1 port with its config and storage in a temp
dir: plain HTTP, HTTPS with a throwaway CA, htpasswd basic auth, or token auth backed by
`TokenServer` (a small JWT issuer written here, signing with a key the registry trusts).
The pytest fixtures below stop the process and remove everything they made.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REGISTRY_BIN = "/usr/bin/docker-registry"
USERNAME = "tester"
PASSWORD = "s3cret-pass"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Certificate:
    """A self-signed CA and a server certificate for 127.0.0.1/localhost signed by it."""

    ca: Path
    cert: Path
    key: Path


def make_certificate(directory: Path) -> Certificate:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "runtimed test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = Certificate(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths.ca.write_bytes(ca_cert.public_bytes(pem))
    paths.cert.write_bytes(cert.public_bytes(pem))
    paths.key.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """The token endpoint of the docker token auth flow, on loopback.

    GET /token?service=…&scope=repository:name:pull,push with basic auth for USERNAME:
    PASSWORD (or anonymous, granted pull only when `anonymous_pull`) returns a JWT signed
    with ES256; its x5c header carries the certificate the registry's rootcertbundle holds.
    `requests` records every request's scope list so tests can assert what was asked.
    """

    def __init__(self, directory: Path, *, anonymous_pull: bool = False):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.service = "runtimed-test-registry"
        self.issuer = "runtimed-test-issuer"
        self.anonymous_pull = anonymous_pull
        self.requests: list[dict] = []
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token signer")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.bundle = directory / "token-signer.pem"
        self.bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server._handle(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.realm = f"http://127.0.0.1:{self._httpd.server_address[1]}/token"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        from urllib.parse import parse_qs, urlsplit

        query = parse_qs(urlsplit(request.path).query)
        user = None
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if (user, password) != (USERNAME, PASSWORD):
                self._reply(
                    request,
                    401,
                    {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]},
                )
                return
        scopes = [s for value in query.get("scope", []) for s in value.split(" ")]
        self.requests.append(
            {"user": user, "scopes": scopes, "service": query.get("service", [""])[0]}
        )
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = actions.split(",")
            granted = wanted if user else (["pull"] if self.anonymous_pull else [])
            access.append(
                {"type": kind, "name": name, "actions": [a for a in wanted if a in granted]}
            )
        token = self.sign(access, subject=user or "")
        self._reply(request, 200, {"token": token, "access_token": token, "expires_in": 300})

    def sign(self, access: list[dict], subject: str = "") -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": [self._x5c]}
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 60,
            "iat": now,
            "jti": os.urandom(8).hex(),
            "access": access,
        }
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        der = self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    @staticmethod
    def _reply(request: BaseHTTPRequestHandler, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


@dataclass
class RegistryServer:
    """A running registry: `host` is `127.0.0.1:PORT` as it appears in references."""

    host: str
    scheme: str
    directory: Path
    process: subprocess.Popen
    ca: Path | None = None
    auth: str | None = None  # None, "basic" or "token"
    username: str = USERNAME
    password: str = PASSWORD
    token_server: TokenServer | None = None
    log: Path = field(default_factory=Path)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def storage(self) -> Path:
        return self.directory / "storage"

    def blob_path(self, digest: str) -> Path:
        """Where the registry keeps a blob on disk (tests corrupt it to check verification)."""
        hexdigest = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"


def _wait_ready(server: RegistryServer, timeout: float = 15.0) -> None:
    context = ssl.create_default_context(cafile=str(server.ca)) if server.ca else None
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"docker-registry exited {server.process.returncode}: "
                f"{server.log.read_text(errors='replace')[-2000:]}"
            )
        try:
            urllib.request.urlopen(f"{server.url}/v2/", timeout=1, context=context)
            return
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"docker-registry on {server.host} did not answer in {timeout}s")
        time.sleep(0.05)


@contextlib.contextmanager
def start_registry(
    *, tls: bool = False, auth: str | None = None, anonymous_pull: bool = False
) -> Iterator[RegistryServer]:
    """Run a registry until the block ends; its temp dir is removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="runtimed-registry-"))
    token_server = None
    process = None
    try:
        port = free_port()
        config: dict = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(directory / "storage")},
                "delete": {"enabled": True},
                "cache": {"blobdescriptor": "inmemory"},
            },
            "http": {"addr": f"127.0.0.1:{port}", "secret": os.urandom(16).hex()},
        }
        cert = None
        if tls:
            cert = make_certificate(directory)
            config["http"]["tls"] = {"certificate": str(cert.cert), "key": str(cert.key)}
        if auth == "basic":
            htpasswd = directory / "htpasswd"
            subprocess.run(
                ["htpasswd", "-Bbc", str(htpasswd), USERNAME, PASSWORD],
                check=True,
                capture_output=True,
            )
            config["auth"] = {"htpasswd": {"realm": "runtimed-test", "path": str(htpasswd)}}
        elif auth == "token":
            token_server = TokenServer(directory, anonymous_pull=anonymous_pull)
            config["auth"] = {
                "token": {
                    "realm": token_server.realm,
                    "service": token_server.service,
                    "issuer": token_server.issuer,
                    "rootcertbundle": str(token_server.bundle),
                }
            }
        elif auth is not None:
            raise ValueError(f"unknown auth {auth!r}")
        config_path = directory / "config.yml"
        config_path.write_text(json.dumps(config))  # JSON is YAML
        log = directory / "registry.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [REGISTRY_BIN, "serve", str(config_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = RegistryServer(
            host=f"127.0.0.1:{port}",
            scheme="https" if tls else "http",
            directory=directory,
            process=process,
            ca=cert.ca if cert else None,
            auth=auth,
            token_server=token_server,
            log=log,
        )
        _wait_ready(server)
        yield server
    finally:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if token_server is not None:
            token_server.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def registry() -> Iterator[RegistryServer]:
    """Plain HTTP, no auth."""
    with start_registry() as server:
        yield server


@pytest.fixture
def registry_tls() -> Iterator[RegistryServer]:
    """HTTPS with a self-signed CA (server.ca), no auth."""
    with start_registry(tls=True) as server:
        yield server


@pytest.fixture
def registry_basic() -> Iterator[RegistryServer]:
    """Plain HTTP with htpasswd basic auth for USERNAME/PASSWORD."""
    with start_registry(auth="basic") as server:
        yield server


@pytest.fixture
def registry_token() -> Iterator[RegistryServer]:
    """HTTPS with bearer-token auth issued by a TokenServer for USERNAME/PASSWORD."""
    with start_registry(tls=True, auth="token") as server:
        yield server


# Images built in a content store, for push/pull tests


def _tar_gz(files: dict[str, bytes], compress: bool | str = True) -> tuple[bytes, str]:
    """A (gzipped) tar of `files`; returns (layer bytes, diff id of the tar)."""
    import gzip
    import hashlib
    import io
    import tarfile

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    tar_bytes = raw.getvalue()
    diff_id = "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
    if not compress:
        return tar_bytes, diff_id
    if compress == "zstd":
        import zstandard

        return zstandard.ZstdCompressor().compress(tar_bytes), diff_id
    return gzip.compress(tar_bytes, compresslevel=1, mtime=0), "sha256:" + hashlib.sha256(
        tar_bytes
    ).hexdigest()


@dataclass
class BuiltImage:
    target: object  # runtimed.images.manifest.Descriptor
    manifests: list = field(default_factory=list)
    layers: list = field(default_factory=list)  # layer Descriptors (all platforms)


def build_image(
    store,
    ns: str,
    layer_files: list[dict[str, bytes]],
    *,
    platform: tuple[str, str] = ("linux", "amd64"),
    docker: bool = False,
    compress: bool | str = True,  # False, True (gzip) or "zstd"
    diff_ids: list[str] | None = None,
) -> BuiltImage:
    """Write a single-platform image (gzip layers, config, manifest) into `store`;
    `diff_ids` overrides the config's (to build a lying image)."""
    import hashlib

    from runtimed.images import mediatypes
    from runtimed.images.manifest import Descriptor, dump_json, gc_labels
    from runtimed.images.platforms import Platform

    if compress == "zstd":
        layer_type = mediatypes.DOCKER_LAYER_ZSTD if docker else mediatypes.OCI_LAYER_ZSTD
    elif compress:
        layer_type = mediatypes.DOCKER_LAYER_GZIP if docker else mediatypes.OCI_LAYER_GZIP
    else:
        layer_type = mediatypes.DOCKER_LAYER if docker else mediatypes.OCI_LAYER
    layers, computed = [], []
    for files in layer_files:
        data, diff_id = _tar_gz(files, compress)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        store.write_blob(
            ns,
            data,
            expected_digest=digest,
            expected_size=len(data),
            labels={mediatypes.LABEL_UNCOMPRESSED: diff_id},
        )
        layers.append(Descriptor(layer_type, digest, len(data)))
        computed.append(diff_id)
    config = dump_json(
        {
            "architecture": platform[1],
            "os": platform[0],
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids or computed},
        }
    )
    config_desc = Descriptor(
        mediatypes.DOCKER_CONFIG if docker else mediatypes.OCI_CONFIG,
        "sha256:" + hashlib.sha256(config).hexdigest(),
        len(config),
    )
    store.write_blob(ns, config, expected_digest=config_desc.digest, expected_size=config_desc.size)
    manifest_type = mediatypes.DOCKER_MANIFEST if docker else mediatypes.OCI_MANIFEST
    manifest = dump_json(
        {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": config_desc.to_json(),
            "layers": [layer.to_json() for layer in layers],
        }
    )
    desc = Descriptor(
        manifest_type,
        "sha256:" + hashlib.sha256(manifest).hexdigest(),
        len(manifest),
        platform=Platform(*platform),
    )
    store.write_blob(
        ns,
        manifest,
        expected_digest=desc.digest,
        expected_size=desc.size,
        labels=gc_labels([config_desc, *layers]),
    )
    plain = Descriptor(desc.media_type, desc.digest, desc.size)
    return BuiltImage(plain, [desc], layers)


def build_index(store, ns: str, images: list[BuiltImage], *, docker: bool = False) -> BuiltImage:
    """An index over single-platform images already in `store`."""
    import hashlib

    from runtimed.images import mediatypes
    from runtimed.images.manifest import Descriptor, dump_json, gc_labels

    index_type = mediatypes.DOCKER_MANIFEST_LIST if docker else mediatypes.OCI_INDEX
    manifests = [m for image in images for m in image.manifests]
    data = dump_json(
        {"schemaVersion": 2, "mediaType": index_type, "manifests": [m.to_json() for m in manifests]}
    )
    desc = Descriptor(index_type, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))
    store.write_blob(
        ns, data, expected_digest=desc.digest, expected_size=desc.size, labels=gc_labels(manifests)
    )
    return BuiltImage(desc, manifests, [layer for image in images for layer in image.layers])


def open_store(root: Path):
    """A content store on `root` (its own sqlite metadata), as the daemon builds it."""
    from runtimed.content.store import ContentStore
    from runtimed.metadata.db import Database
    from runtimed.metadata.leases import LeaseStore

    root.mkdir(parents=True, exist_ok=True)
    db = Database(root / "meta.db")
    return ContentStore(root, db, LeaseStore(db))


class CuttingProxy:
    """A loopback TCP proxy to `target` that cuts the first `cuts` connections once they
    have carried `after` bytes towards the client (a network failure mid-download).

    With `stall=True` such a connection goes silent instead (a hung server): it stays open
    and carries nothing more until the proxy closes.
    `requests` keeps the first line and Range header of each client request it saw.
    """

    def __init__(self, target: str, *, after: int, cuts: int = 1, stall: bool = False):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.after = after
        self.stall = stall
        self.cuts_left = cuts
        self.cuts = 0
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._closed = False
        self._accept_thread = threading.Thread(target=self._accept, daemon=True)
        self._accept_thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._sockets += [client, upstream]
            for args in ((client, upstream, False), (upstream, client, True)):
                thread = threading.Thread(target=self._pipe, args=args, daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pipe(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        carried = 0
        cut_here = False
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not downstream:
                    self._record(data)
                if downstream and not cut_here:
                    with self._lock:
                        if self.cuts_left and carried + len(data) > self.after:
                            self.cuts_left -= 1
                            self.cuts += 1
                            cut_here = True
                    if cut_here:
                        dst.sendall(data[: max(self.after - carried, 0)])
                        while self.stall and not self._closed:
                            time.sleep(0.05)
                        break
                dst.sendall(data)
                carried += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _record(self, data: bytes) -> None:
        text = data.decode("latin-1")
        if text[:8].split(" ")[0] in ("GET", "HEAD", "PUT", "POST", "PATCH", "DELETE"):
            head = text.split("\r\n\r\n", 1)[0].split("\r\n")
            ranges = [h for h in head[1:] if h.lower().startswith("range:")]
            self.requests.append(" ".join([head[0], *ranges]))

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv
                except OSError:
                    pass
                s.close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._accept_thread.join(timeout=5)
