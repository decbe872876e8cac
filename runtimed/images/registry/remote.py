"""What pull and push share: options, progress records, connecting a reference to an
endpoint's transport, and the distribution-source labels containerd keeps on blobs."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from runtimed.errors import Canceled, DeadlineExceeded
from runtimed.images import mediatypes
from runtimed.images.reference import Reference
from runtimed.images.registry import credentials as credstore
from runtimed.images.registry.credentials import Credentials
from runtimed.images.registry.hosts import Endpoint, RegistryHosts, host_name
from runtimed.images.registry.transport import Timeouts, Transport

MANIFEST_ACCEPT = ", ".join(
    [
        mediatypes.DOCKER_MANIFEST,
        mediatypes.DOCKER_MANIFEST_LIST,
        mediatypes.OCI_MANIFEST,
        mediatypes.OCI_INDEX,
        "*/*",
    ]
)
SOURCE_LABEL = "containerd.io/distribution.source."


@dataclass
class Progress:
    """One blob's transfer state, reported as it changes.

    state: waiting → downloading/uploading → done; or exists (already there), mounted
    (cross-repository mount on push), unpacking → unpacked (pull with unpack), failed.
    """

    digest: str
    media_type: str
    state: str
    offset: int = 0
    total: int = 0
    message: str = ""


ProgressFn = Callable[[Progress], None]


class Cancellation:
    """A flag the transfer threads poll, plus hooks that interrupt blocking reads (a
    stalled connection would otherwise hold a thread until the progress deadline)."""

    def __init__(self):
        self._event = threading.Event()
        self._hooks: set[Callable[[], None]] = set()
        self._lock = threading.Lock()

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        self._event.set()
        with self._lock:
            hooks = list(self._hooks)
        for hook in hooks:
            try:
                hook()
            except Exception:  # noqa: BLE001 - interrupting is best effort
                pass

    def register(self, hook: Callable[[], None]) -> None:
        with self._lock:
            self._hooks.add(hook)
        if self._event.is_set():
            hook()

    def unregister(self, hook: Callable[[], None]) -> None:
        with self._lock:
            self._hooks.discard(hook)


@dataclass
class TransferOptions:
    """Per-call settings; host settings from the daemon config apply underneath."""

    concurrency: int = 3  # blobs transferred at once
    plain_http: bool = False
    insecure: bool = False  # skip TLS verification, allow HTTP
    ca: str | None = None  # PEM file trusted for this call's registry
    credentials: Credentials | None = None  # per call; else the credentials file
    credentials_file: str | Path | None = None
    progress_timeout: float = 60.0  # a transfer that moves no byte this long fails
    timeout: float = 0.0  # the whole operation's deadline in seconds; 0: none
    resume_attempts: int = 8  # reconnects (with Range) per blob after a broken connection
    lease: str | None = None
    started: float = field(default_factory=time.monotonic)
    # set by the caller (a client went away) to stop the transfer at the next chunk
    cancelled: Cancellation = field(default_factory=Cancellation)

    def check_deadline(self, what: str) -> None:
        if self.cancelled.is_set():
            raise Canceled(f"{what}: cancelled")
        if self.timeout and time.monotonic() - self.started > self.timeout:
            raise DeadlineExceeded(f"{what}: gave up after the {self.timeout:g}s deadline")

    def credentials_for(self, host: str) -> Credentials | None:
        if self.credentials is not None and (
            self.credentials.username or self.credentials.identity_token
        ):
            return self.credentials
        return credstore.load(host, self.credentials_file)


@dataclass
class Remote:
    """A repository on one endpoint: everything a request needs."""

    ref: Reference
    endpoint: Endpoint
    transport: Transport

    @property
    def repository(self) -> str:
        return self.ref.path

    def scopes(self, push: bool = False) -> tuple[str, ...]:
        return (f"repository:{self.ref.path}:{'pull,push' if push else 'pull'}",)

    def path(self, kind: str, obj: str) -> str:
        """`/v2/<name>/<kind>/<obj>`; mirrors get `?ns=<host>` as containerd sends."""
        suffix = f"?ns={self.ref.domain}" if self.endpoint.mirror else ""
        return f"/v2/{self.ref.path}/{kind}/{obj}{suffix}"

    def close(self) -> None:
        self.transport.close()


def remotes(
    hosts: RegistryHosts, ref: Reference, options: TransferOptions, *, push: bool = False
) -> list[Remote]:
    """One Remote per endpoint to try, mirrors first (pulls only)."""
    out = []
    for endpoint in hosts.endpoints(
        ref.domain,
        push=push,
        plain_http=options.plain_http,
        ca=options.ca,
        insecure=options.insecure,
    ):
        # a mirror gets only its own stored credentials, never the registry's
        def creds(_host: str, _mirror: Endpoint = endpoint) -> Credentials | None:
            if _mirror.mirror:
                return credstore.load(_mirror.host, options.credentials_file)
            return options.credentials_for(ref.domain)

        transport = Transport(
            endpoint,
            creds,
            timeouts=Timeouts(progress=options.progress_timeout),
            pool_size=max(options.concurrency, 1) + 1,
        )
        out.append(Remote(ref, endpoint, transport))
    return out


def source_key(domain: str) -> str:
    """containerd keys the label by host name without the port."""
    return SOURCE_LABEL + host_name(domain).strip("[]")


def append_source(current: str | None, repository: str) -> str:
    repos = {r for r in (current or "").split(",") if r}
    repos.add(repository)
    return ",".join(sorted(repos))


def wait_with_deadline(options: TransferOptions, what: str, delay: float = 0.1) -> None:
    options.check_deadline(what)
    time.sleep(delay)


def first_cause(futures, exc: BaseException) -> BaseException:
    """The error that stopped a batch, not the cancellations it caused in the others."""
    if not isinstance(exc, Canceled):
        return exc
    concurrent.futures.wait(futures)
    for future in futures:
        if not future.cancelled() and not isinstance(future.exception(), Canceled | None):
            return future.exception()
    return exc
