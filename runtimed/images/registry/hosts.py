"""Where a registry host is reached: scheme, TLS trust, mirrors.

Per-host settings come from the daemon config (`registries` table, keyed by host as it
appears in references):

    [registries."registry.example:5000"]
    ca = "/etc/runtimed/certs/example-ca.pem"     # trust this CA (PEM) in addition to none
    insecure = true                               # allow plain HTTP, skip TLS verification
    mirrors = ["mirror.local:5000", "https://m2.example"]   # tried first for pulls

HTTPS with the system CAs is the default. Plain HTTP is used only for `plain_http = true`
hosts (HTTP only, as `ctr --plain-http`), and for hosts marked `insecure` and loopback
names (`localhost`, `127.0.0.1`, `[::1]`) when their server answers the TLS handshake in
plain HTTP; a certificate that fails verification is never downgraded to HTTP. `insecure`
also skips certificate verification. `docker.io` is served by `registry-1.docker.io`.
A pull or push request may add `plain_http`, `insecure` or a CA for its own registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runtimed.errors import InvalidArgument

DOCKER_IO = "docker.io"
DOCKER_IO_API = "registry-1.docker.io"
_LOOPBACK = ("localhost", "127.0.0.1", "[::1]", "::1")


@dataclass(frozen=True)
class Endpoint:
    """One way to reach a registry API: `scheme://host/v2/`."""

    host: str  # host[:port] the HTTP connection goes to
    scheme: str  # "https" or "http"
    ca: str | None = None  # PEM file to trust instead of the system store
    verify: bool = True  # False: TLS without certificate verification (insecure hosts)
    mirror: bool = False  # a mirror: used for pulls only
    fallback_http: bool = False  # use plain HTTP when the server answers TLS in HTTP

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}"


@dataclass(frozen=True)
class HostConfig:
    ca: str | None = None
    insecure: bool = False
    plain_http: bool = False
    mirrors: tuple[str, ...] = field(default=())

    @classmethod
    def from_dict(cls, host: str, values: dict) -> HostConfig:
        if not isinstance(values, dict):
            raise InvalidArgument(f"registries.{host!r}: expected a table of settings")
        unknown = set(values) - {"ca", "insecure", "plain_http", "plain-http", "mirrors"}
        if unknown:
            raise InvalidArgument(
                f"registries.{host!r}: unknown keys {', '.join(sorted(unknown))} "
                "(known: ca, insecure, plain_http, mirrors)"
            )
        mirrors = values.get("mirrors", [])
        if not isinstance(mirrors, list) or not all(isinstance(m, str) for m in mirrors):
            raise InvalidArgument(f"registries.{host!r}.mirrors: expected a list of hosts")
        return cls(
            ca=values.get("ca"),
            insecure=bool(values.get("insecure", False)),
            plain_http=bool(values.get("plain_http", values.get("plain-http", False))),
            mirrors=tuple(mirrors),
        )


def host_name(host: str) -> str:
    """`host[:port]` or `[v6]:port` without the port."""
    if host.startswith("["):
        return host[: host.index("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    return host_name(host) in _LOOPBACK


class RegistryHosts:
    """Maps a reference's domain to the endpoints to try, in order."""

    def __init__(self, registries: dict | None = None):
        self._configs = {
            host: HostConfig.from_dict(host, values) for host, values in (registries or {}).items()
        }

    def config(self, domain: str) -> HostConfig:
        return self._configs.get(domain, HostConfig())

    def endpoints(
        self,
        domain: str,
        *,
        push: bool = False,
        plain_http: bool = False,
        ca: str | None = None,
        insecure: bool = False,
    ) -> list[Endpoint]:
        """Mirrors first (pulls only), then the registry itself.

        `plain_http`, `ca` and `insecure` are per-call overrides (a client's --plain-http).
        """
        config = self.config(domain)
        out: list[Endpoint] = []
        if not push:
            for mirror in config.mirrors:
                mirror_config = self.config(_strip_scheme(mirror))
                out.append(_endpoint(mirror, mirror_config, mirror=True))
        api_host = DOCKER_IO_API if domain == DOCKER_IO else domain
        merged = HostConfig(
            ca=ca or config.ca,
            insecure=insecure or config.insecure,
            plain_http=plain_http or config.plain_http,
        )
        out.append(_endpoint(api_host, merged))
        return out


def _strip_scheme(host: str) -> str:
    return host.split("://", 1)[1] if "://" in host else host


def _endpoint(host: str, config: HostConfig, *, mirror: bool = False) -> Endpoint:
    if "://" in host:
        scheme, _, rest = host.partition("://")
        if scheme not in ("http", "https"):
            raise InvalidArgument(f"mirror {host!r}: scheme must be http or https")
        return Endpoint(rest.rstrip("/"), scheme, config.ca, not config.insecure, mirror)
    if config.plain_http:
        return Endpoint(host, "http", mirror=mirror)
    loopback = is_loopback(host)
    return Endpoint(
        host,
        "https",
        ca=config.ca,
        verify=not config.insecure,
        mirror=mirror,
        fallback_http=config.insecure or loopback,
    )
