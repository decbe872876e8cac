"""The HTTP side of the distribution protocol, on urllib3.

urllib3 gives pooled keep-alive connections (one pool per host, sized for the layer
concurrency), streaming response bodies without buffering, Range requests, and TLS with
the system store or a given CA, at several hundred MB/s on loopback; requests run in
worker threads (the core is blocking; services call it via asyncio.to_thread).

`Transport.request` adds authorization, answers one 401 challenge, falls back from HTTPS
to HTTP for loopback and insecure hosts, and maps failures to typed errors once.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import urllib3

from runtimed.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from runtimed.images.registry.auth import Authorizer
from runtimed.images.registry.credentials import Credentials
from runtimed.images.registry.hosts import Endpoint

log = logging.getLogger("runtimed.registry")

USER_AGENT = "runtimed/0.1"


@dataclass(frozen=True)
class Timeouts:
    connect: float = 30.0
    # a read that delivers nothing for this long fails (the progress deadline)
    progress: float = 60.0


class Transport:
    """HTTP requests to one registry endpoint, authorised for one repository's scopes."""

    def __init__(
        self,
        endpoint: Endpoint,
        credentials: Callable[[str], Credentials | None] = lambda host: None,
        *,
        timeouts: Timeouts | None = None,
        pool_size: int = 4,
        authorizer: Authorizer | None = None,
    ):
        self.endpoint = endpoint
        self.scheme = endpoint.scheme
        self.timeouts = timeouts or Timeouts()
        self._pool = urllib3.PoolManager(
            num_pools=8,
            maxsize=max(pool_size, 1),
            ssl_context=_ssl_context(endpoint),
            retries=urllib3.Retry(
                total=None,  # 0 would count the first redirect (blob stores, CDNs) as too many
                connect=0,
                read=0,
                other=0,
                redirect=5,
                raise_on_redirect=True,
                status=0,
                raise_on_status=False,
            ),
            headers={"User-Agent": USER_AGENT},
        )
        self.authorizer = authorizer or Authorizer(credentials, self._fetch_token)
        if endpoint.scheme == "https" and not endpoint.verify:
            # the host is marked insecure on purpose: say so once, not on every request
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
            log.info("%s: TLS certificate verification is off (insecure host)", endpoint.host)

    @property
    def host(self) -> str:
        return self.endpoint.host

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.endpoint.host}"

    def close(self) -> None:
        self._pool.clear()

    def _timeout(self) -> urllib3.Timeout:
        return urllib3.Timeout(connect=self.timeouts.connect, read=self.timeouts.progress)

    def _fetch_token(self, url: str, headers: dict[str, str]) -> tuple[int, bytes]:
        try:
            response = self._pool.request("GET", url, headers=headers, timeout=self._timeout())
        except urllib3.exceptions.HTTPError as exc:
            raise Unavailable(
                f"cannot reach token server {url.split('?')[0]}: {_reason(exc)}"
            ) from None
        return response.status, response.data

    def request(
        self,
        method: str,
        path: str,
        *,
        scopes: tuple[str, ...],
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        stream: bool = False,
        what: str = "",
    ) -> urllib3.BaseHTTPResponse:
        """Send a request (`path` relative to the host, or an absolute URL the registry
        gave us, such as an upload location); return the response of any status but 401.

        With `stream=True` the body is left unread: the caller reads and releases it.
        """
        sent_auth = None
        for attempt in range(2):
            if attempt and hasattr(body, "seek"):
                body.seek(0)  # a file body was consumed by the refused attempt
            request_headers = dict(headers or {})
            auth = self.authorizer.header(self.endpoint.host, scopes)
            if auth:
                request_headers["Authorization"] = auth
            sent_auth = auth
            response = self._send(method, path, request_headers, body, stream)
            if response.status != 401:
                return response
            challenge = response.headers.get("WWW-Authenticate", "")
            detail = _error_detail(response)
            response.release_conn()
            if attempt == 0 and self.authorizer.challenge(
                self.endpoint.host, challenge, scopes, sent_auth
            ):
                continue
            creds_note = (
                "the registry refused the credentials sent; check the username and password (ctl login)"
                if sent_auth
                else "authentication required; log in first (ctl login)"
            )
            raise PermissionDenied(f"{what or path} on {self.endpoint.host}: {creds_note}{detail}")
        raise AssertionError("unreachable")

    def _send(self, method, path, headers, body, stream) -> urllib3.BaseHTTPResponse:
        scheme = self.scheme
        url = path if "://" in path else f"{scheme}://{self.endpoint.host}{path}"
        try:
            return self._pool.request(
                method,
                url,
                headers=headers,
                body=body,
                preload_content=not stream,
                decode_content=False,
                timeout=self._timeout(),
                redirect=True,
            )
        except (urllib3.exceptions.SSLError, urllib3.exceptions.MaxRetryError) as exc:
            tls_error = exc if isinstance(exc, urllib3.exceptions.SSLError) else exc.reason
            if not isinstance(tls_error, urllib3.exceptions.SSLError):
                raise Unavailable(f"cannot reach {self.endpoint.host}: {_reason(exc)}") from None
            if (
                scheme == "https"
                and self.endpoint.fallback_http
                and "://" not in path
                and _speaks_plain_http(tls_error)
            ):
                if self.scheme == "https":
                    log.info(
                        "%s: TLS failed (%s); using plain HTTP",
                        self.endpoint.host,
                        _reason(tls_error),
                    )
                self.scheme = "http"
                if hasattr(body, "seek"):
                    body.seek(0)
                return self._send(method, path, headers, body, stream)
            raise Unavailable(
                f"TLS with {self.endpoint.host} failed: {_reason(tls_error)}; give the "
                "registry's CA (registries.<host>.ca) or mark the host insecure"
            ) from None
        except (urllib3.exceptions.TimeoutError, TimeoutError):
            raise DeadlineExceeded(
                f"{self.endpoint.host}: no response within {self.timeouts.progress:g}s"
            ) from None
        except urllib3.exceptions.HTTPError as exc:
            raise Unavailable(f"cannot reach {self.endpoint.host}: {_reason(exc)}") from None


def check(
    response: urllib3.BaseHTTPResponse, expected: tuple[int, ...], what: str, host: str
) -> urllib3.BaseHTTPResponse:
    """Raise the typed error for an unexpected status (the body is consumed and released)."""
    if response.status in expected:
        return response
    detail = _error_detail(response)
    response.release_conn()
    status = response.status
    if status == 404:
        raise NotFound(f"{what}: not found on {host}{detail}")
    if status in (401, 403):
        raise PermissionDenied(f"{what}: access denied by {host} (HTTP {status}){detail}")
    if status == 429:
        raise Unavailable(f"{what}: {host} is rate limiting requests (HTTP 429){detail}")
    if status >= 500:
        raise Unavailable(f"{what}: {host} failed with HTTP {status}{detail}")
    raise FailedPrecondition(f"{what}: unexpected HTTP {status} from {host}{detail}")


def _error_detail(response: urllib3.BaseHTTPResponse) -> str:
    """The registry's JSON error message(s), if the body holds any (read at most 64 KiB)."""
    try:
        data = response.data if response._body is not None else response.read(65536)  # noqa: SLF001
    except Exception:  # noqa: BLE001 - a detail is optional
        return ""
    try:
        errors = json.loads(data).get("errors") or []
        parts = [": ".join(str(e.get(k)) for k in ("code", "message") if e.get(k)) for e in errors]
        return " (" + "; ".join(p for p in parts if p) + ")" if parts else ""
    except (ValueError, AttributeError, TypeError):
        return ""


def _speaks_plain_http(error: BaseException) -> bool:
    """The TLS handshake failed because the server answered in plain HTTP (the only case
    where falling back to HTTP is safe: a certificate error is never downgraded)."""
    text = str(error)
    return (
        "WRONG_VERSION_NUMBER" in text
        or "record layer failure" in text
        or ("http request" in text.lower())
    )


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    return str(reason)


def _ssl_context(endpoint: Endpoint) -> ssl.SSLContext | None:
    if endpoint.scheme != "https":
        return None
    context = (
        ssl.create_default_context(cafile=endpoint.ca)
        if endpoint.ca
        else (ssl.create_default_context())
    )
    if not endpoint.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
