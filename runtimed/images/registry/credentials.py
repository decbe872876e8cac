"""Registry credentials in docker's config.json, so `docker login` and `ctl login` agree.

The file is `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`, unless a path is
given. Entries live under `auths`, keyed by registry host (docker.io as
`https://index.docker.io/v1/`), holding `auth` = base64("user:password") or an
`identitytoken` (an OAuth refresh token). Writes keep every other key of the file and are
atomic with mode 0600. Credential helpers (`credsStore`) are not run.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from runtimed.errors import InvalidArgument, NotFound

DOCKER_IO_KEY = "https://index.docker.io/v1/"


@dataclass(frozen=True)
class Credentials:
    username: str = ""
    password: str = ""
    identity_token: str = ""  # a refresh token: exchanged at the token endpoint


def default_path() -> Path:
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def _key(host: str) -> str:
    return (
        DOCKER_IO_KEY if host in ("docker.io", "index.docker.io", "registry-1.docker.io") else host
    )


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text() or "{}")
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"credentials file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"credentials file {path}: expected a JSON object")
    return data


def _candidates(host: str) -> list[str]:
    key = _key(host)
    return [key, f"https://{key}", f"http://{key}", f"https://{key}/v1/", f"https://{key}/v2/"]


def load(host: str, path: str | Path | None = None) -> Credentials | None:
    """The credentials stored for `host`, or None."""
    auths = _read(Path(path) if path else default_path()).get("auths") or {}
    for key in _candidates(host):
        entry = auths.get(key)
        if isinstance(entry, dict):
            return _decode(host, entry)
    return None


def _decode(host: str, entry: dict) -> Credentials:
    username, password = entry.get("username", ""), entry.get("password", "")
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(entry["auth"]).decode()
        except (ValueError, UnicodeDecodeError):
            raise InvalidArgument(
                f"credentials for {host}: 'auth' is not base64 user:password"
            ) from None
        username, sep, password = decoded.partition(":")
        if not sep:
            raise InvalidArgument(f"credentials for {host}: 'auth' lacks the ':' separator")
    return Credentials(username, password, entry.get("identitytoken", ""))


def store(host: str, username: str, password: str, path: str | Path | None = None) -> Path:
    """Save credentials for `host`; returns the file written."""
    if not username:
        raise InvalidArgument("username must not be empty")
    path = Path(path) if path else default_path()
    data = _read(path)
    auths = data.setdefault("auths", {})
    auth = base64.b64encode(f"{username}:{password}".encode()).decode()
    auths[_key(host)] = {"auth": auth}
    _write(path, data)
    return path


def erase(host: str, path: str | Path | None = None) -> None:
    """Forget the credentials for `host` (NotFound when there were none)."""
    path = Path(path) if path else default_path()
    data = _read(path)
    auths = data.get("auths") or {}
    keys = [k for k in _candidates(host) if k in auths]
    if not keys:
        raise NotFound(f"not logged in to {host} (no entry in {path})")
    for key in keys:
        del auths[key]
    _write(path, data)


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config.json.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent="\t")
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
