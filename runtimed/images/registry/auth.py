"""Registry authentication: answer the `WWW-Authenticate` challenge of a 401.

Anonymous first; on `Basic` send the stored username and password; on `Bearer` fetch a
token from the realm for the scopes of the request (`repository:<name>:pull[,push]`), with
the stored credentials as basic auth when there are any, and cache it per host and scope
until it expires. A token endpoint that refuses the credentials, or a registry that still
answers 401 with a fresh token, is a PermissionDenied naming the host.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from runtimed.errors import PermissionDenied, Unavailable
from runtimed.images.registry.credentials import Credentials

_TOKEN_RE = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?')


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lowercased: "basic" or "bearer"
    params: dict[str, str] = field(default_factory=dict)


def parse_challenges(header: str) -> list[Challenge]:
    """Parse `Bearer realm="…",service="…",scope="…"` (several challenges allowed)."""
    out: list[Challenge] = []
    rest = header.strip()
    while rest:
        match = re.match(r"([A-Za-z][A-Za-z0-9_-]*)\s*", rest)
        if not match:
            break
        scheme = match.group(1).lower()
        rest = rest[match.end() :]
        params: dict[str, str] = {}
        while True:
            token = _TOKEN_RE.match(rest)
            if not token:
                break
            # stop when what follows is the next challenge's scheme, not a parameter
            params[token.group(1).lower()] = (
                re.sub(r"\\(.)", r"\1", token.group(2))
                if token.group(2) is not None
                else token.group(3)
            )
            rest = rest[token.end() :]
        out.append(Challenge(scheme, params))
        rest = rest.lstrip(", ")
    return out


def basic_header(credentials: Credentials) -> str:
    raw = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()


@dataclass
class _Token:
    value: str
    expires: float


class Authorizer:
    """Per-host challenge and token state, shared by every request of a pull or push.

    `fetch_token(url, headers)` does the HTTP GET to the token realm and returns
    (status, body bytes); the transport supplies it so TLS settings are shared.
    """

    def __init__(
        self,
        credentials: Callable[[str], Credentials | None],
        fetch_token: Callable[[str, dict[str, str]], tuple[int, bytes]],
    ):
        self._credentials = credentials
        self._fetch_token = fetch_token
        self._challenges: dict[str, Challenge] = {}
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._fetching: dict[tuple[str, str], threading.Lock] = {}
        self._lock = threading.Lock()

    def header(self, host: str, scopes: tuple[str, ...]) -> str | None:
        """The Authorization header for a request, or None while no challenge was seen."""
        challenge = self._challenges.get(host)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = self._credentials(host)
            return basic_header(creds) if creds and creds.username else None
        if challenge.scheme == "bearer":
            return "Bearer " + self._token(host, challenge, scopes)
        return None

    def challenge(
        self, host: str, www_authenticate: str, scopes: tuple[str, ...], sent: str | None
    ) -> bool:
        """Record a 401's challenge; True when retrying with new authorization may help."""
        challenges = parse_challenges(www_authenticate or "")
        chosen = next((c for c in challenges if c.scheme == "bearer"), None) or next(
            (c for c in challenges if c.scheme == "basic"), None
        )
        if chosen is None:
            return False
        with self._lock:
            self._challenges[host] = chosen
            key = (host, _scope_key(chosen, scopes))
            cached = self._tokens.get(key)
            # drop the token only if it is the one refused (not a newer one another thread
            # fetched meanwhile)
            if chosen.scheme == "bearer" and cached and sent == "Bearer " + cached.value:
                del self._tokens[key]
        if sent is None:
            return True
        # refused basic credentials will not improve; a bearer token may have been for a
        # smaller scope than the registry now names (the transport retries only once)
        return chosen.scheme == "bearer"

    def _token(self, host: str, challenge: Challenge, scopes: tuple[str, ...]) -> str:
        key = (host, _scope_key(challenge, scopes))
        with self._lock:
            fetching = self._fetching.setdefault(key, threading.Lock())
        with fetching:  # concurrent requests for one scope share one token fetch
            with self._lock:
                cached = self._tokens.get(key)
                if cached and cached.expires > time.monotonic():
                    return cached.value
            return self._fetch(host, challenge, scopes, key)

    def _fetch(self, host: str, challenge: Challenge, scopes: tuple[str, ...], key) -> str:
        realm = challenge.params.get("realm")
        if not realm:
            raise PermissionDenied(f"registry {host} sent a bearer challenge without a realm")
        from urllib.parse import urlencode

        query = (
            [("service", challenge.params["service"])] if challenge.params.get("service") else []
        )
        query += [("scope", s) for s in _scopes(challenge, scopes)]
        creds = self._credentials(host)
        headers = {"Accept": "application/json"}
        if creds and creds.identity_token:
            query += [("grant_type", "refresh_token"), ("refresh_token", creds.identity_token)]
        elif creds and creds.username:
            headers["Authorization"] = basic_header(creds)
            query.append(("account", creds.username))
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        status, body = self._fetch_token(url, headers)
        if status in (401, 403):
            who = f"user {creds.username!r}" if creds and creds.username else "anonymous access"
            raise PermissionDenied(
                f"authentication to {host} failed: the token server {realm} refused {who} "
                f"(HTTP {status}){_detail(body)}; check the username and password "
                "(ctl login)"
            )
        if status != 200:
            raise Unavailable(
                f"token server {realm} for {host} answered HTTP {status}{_detail(body)}"
            )
        try:
            data = json.loads(body)
            value = data.get("token") or data.get("access_token")
            lifetime = int(data.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            value = None
        if not value:
            raise Unavailable(f"token server {realm} for {host} returned no token")
        with self._lock:
            self._tokens[key] = _Token(value, time.monotonic() + max(lifetime - 10, 5))
        return value


def _scopes(challenge: Challenge, scopes: tuple[str, ...]) -> list[str]:
    out = list(scopes)
    extra = challenge.params.get("scope")
    if extra:
        out += [s for s in extra.split(" ") if s and s not in out]
    return out


def _scope_key(challenge: Challenge, scopes: tuple[str, ...]) -> str:
    """Tokens are cached by the scopes the request needs; a challenge naming more makes
    the next fetch ask for those too (after a 401 drops the cached token)."""
    return " ".join(sorted(scopes))


def _detail(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    if isinstance(data, dict):
        if data.get("errors"):
            return ": " + "; ".join(str(e.get("message", e)) for e in data["errors"] if e)
        if data.get("details") or data.get("error"):
            return f": {data.get('details') or data.get('error')}"
    return ""
