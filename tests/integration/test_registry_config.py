"""Credentials file, WWW-Authenticate parsing and per-host endpoint rules (no network)."""

from __future__ import annotations

import base64
import json
import stat

import pytest

from runtimed.errors import InvalidArgument, NotFound
from runtimed.images.registry import credentials
from runtimed.images.registry.auth import parse_challenges
from runtimed.images.registry.hosts import RegistryHosts


def test_credentials_store_load_erase_keep_other_keys(tmp_path):
    path = tmp_path / "cfg" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"auths": {"other.example": {"auth": "eDp5"}}, "psFormat": "x"}))
    credentials.store("127.0.0.1:5000", "alice", "pa:ss", path)
    data = json.loads(path.read_text())
    assert data["psFormat"] == "x" and "other.example" in data["auths"]
    assert base64.b64decode(data["auths"]["127.0.0.1:5000"]["auth"]) == b"alice:pa:ss"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    creds = credentials.load("127.0.0.1:5000", path)
    assert (creds.username, creds.password) == ("alice", "pa:ss")
    credentials.erase("127.0.0.1:5000", path)
    assert credentials.load("127.0.0.1:5000", path) is None
    with pytest.raises(NotFound, match="not logged in to 127.0.0.1:5000"):
        credentials.erase("127.0.0.1:5000", path)


def test_credentials_docker_io_key_and_identity_token(tmp_path):
    path = tmp_path / "config.json"
    credentials.store("docker.io", "bob", "pw", path)
    assert credentials.DOCKER_IO_KEY in json.loads(path.read_text())["auths"]
    assert credentials.load("registry-1.docker.io", path).username == "bob"
    path.write_text(json.dumps({"auths": {"https://r.example": {"identitytoken": "tok"}}}))
    assert credentials.load("r.example", path).identity_token == "tok"


def test_credentials_default_path_honours_docker_config(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    assert credentials.default_path() == tmp_path / "config.json"


def test_credentials_malformed_file_is_invalid_argument(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        credentials.load("x.example", path)
    path.write_text(json.dumps({"auths": {"x.example": {"auth": "bm9jb2xvbg=="}}}))
    with pytest.raises(InvalidArgument, match="':' separator"):
        credentials.load("x.example", path)


def test_parse_bearer_and_basic_challenges():
    [bearer] = parse_challenges(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull,push"'
    )
    assert bearer.scheme == "bearer"
    assert bearer.params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:a/b:pull,push",
    }
    [basic] = parse_challenges('Basic realm="Registry Realm"')
    assert (basic.scheme, basic.params["realm"]) == ("basic", "Registry Realm")


def test_endpoints_https_default_loopback_fallback_insecure_and_mirrors():
    hosts = RegistryHosts(
        {
            "reg.example": {"mirrors": ["mirror.example:5000", "http://m2.example"]},
            "plain.example:5000": {"plain_http": True},
            "self.example": {"insecure": True},
        }
    )
    [docker] = hosts.endpoints("docker.io")
    assert (docker.host, docker.scheme, docker.fallback_http) == (
        "registry-1.docker.io",
        "https",
        False,
    )
    mirror1, mirror2, origin = hosts.endpoints("reg.example")
    assert (mirror1.host, mirror1.scheme, mirror1.mirror) == ("mirror.example:5000", "https", True)
    assert (mirror2.host, mirror2.scheme) == ("m2.example", "http")
    assert (origin.host, origin.mirror) == ("reg.example", False)
    assert len(hosts.endpoints("reg.example", push=True)) == 1  # pushes never go to mirrors
    assert hosts.endpoints("plain.example:5000")[0].scheme == "http"
    insecure = hosts.endpoints("self.example")[0]
    assert (insecure.verify, insecure.fallback_http) == (False, True)
    assert hosts.endpoints("localhost:5000")[0].fallback_http
    assert hosts.endpoints("127.0.0.1:5000")[0].fallback_http
    assert hosts.endpoints("[::1]:5000")[0].fallback_http
    assert not hosts.endpoints("registry.example:5000")[0].fallback_http
    assert hosts.endpoints("registry.example", plain_http=True)[0].scheme == "http"


def test_bad_host_config_is_invalid_argument():
    with pytest.raises(InvalidArgument, match="unknown keys bogus"):
        RegistryHosts({"r.example": {"bogus": 1}})
    with pytest.raises(InvalidArgument, match="mirrors"):
        RegistryHosts({"r.example": {"mirrors": "not-a-list"}})
