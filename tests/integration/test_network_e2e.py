"""End to end: busybox containers started by `ctl run --network/-p/--hostname` (runc as the
OCI runtime) talk over a bridge network by IP and by name, publish a port on 127.0.0.1,
and see only lo on `none` and the host's interfaces on `host`."""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import time
import urllib.request

import pytest

from runtimed.network.manager import veth_name
from tests import testimages
from tests.cli.conftest import Ctl

RUN = ("run", "--runtime", "runc")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict:
    return testimages.build(tmp_path_factory.mktemp("images"))


@pytest.fixture
def ctl(daemon, images):
    ctl = Ctl(daemon.address)
    ctl("load", "-q", "-i", images["busybox"].archive)
    yield ctl
    ctl("rm", "-f", "srv", "peer", check=False)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the attachment goes right after the container
        result = ctl("network", "rm", "e2e", check=False)
        if result.returncode == 0 or "not found" in result.stderr:
            break
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def test_two_busybox_containers_by_ip_and_name_with_a_published_port(daemon, ctl, images):
    busybox = images["busybox"].name
    ctl("network", "create", "e2e")
    network = json.loads(ctl("network", "inspect", "e2e").stdout)[0]
    subnet = ipaddress.ip_network(network["IPAM"]["Config"][0]["Subnet"])
    port = free_port()
    ctl(*RUN, "-d", "--name", "srv", "--network", "e2e", "--hostname", "server",
        "-p", f"127.0.0.1:{port}:8080", busybox, "sh", "-c",
        "(echo served-by-name | nc -l -p 7000 &); (echo served-by-ip | nc -l -p 7001 &); "
        "httpd -f -p 8080 -h /etc")
    att = json.loads(ctl("network", "attachment", "srv", "--format", "json").stdout)
    ip = att["interfaces"][0]["ip"]
    assert ipaddress.ip_address(ip) in subnet and att["hostname"] == "server"
    assert att["ports"][0]["host_port"] == port
    # published port: the container's httpd answers on the host's loopback
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/hostname", timeout=5) as r:
                assert r.read() == b"server\n"
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    # a second container reaches the first by name and by IP (TCP, busybox nc and wget)
    result = ctl(*RUN, "--rm", "--network", "e2e", "--name", "cli", busybox, "sh", "-c",
                 f"nc srv 7000; nc {ip} 7001; wget -qO- http://server:8080/hostname; "
                 "hostname; grep -w srv /etc/hosts")
    out = result.stdout
    assert out.splitlines()[:4] == ["served-by-name", "served-by-ip", "server", "cli"], result.stderr
    assert f"{ip}\tserver srv" in out
    # the --rm container's attachment went with it; the server's goes with `rm -f`
    assert json.loads(ctl("network", "inspect", "e2e").stdout)[0]["Containers"] == ["default/srv"]
    # a running container's /etc/hosts follows peers joining and leaving
    ctl(*RUN, "-d", "--name", "peer", "--network", "e2e", busybox, "sleep", "60")
    assert "\tpeer" in ctl("exec", "srv", "cat", "/etc/hosts").stdout
    ctl("rm", "-f", "peer")
    deadline = time.monotonic() + 10
    while "\tpeer" in ctl("exec", "srv", "cat", "/etc/hosts").stdout:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    ctl("rm", "-f", "srv")
    deadline = time.monotonic() + 10
    while json.loads(ctl("network", "inspect", "e2e").stdout)[0]["Containers"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    ctl("network", "rm", "e2e")
    links = host_links()
    assert veth_name(daemon.state, "default", "srv", "e2e") not in links
    assert network["Bridge"] not in links


def test_none_has_only_lo_and_host_sees_the_host(ctl, images):
    busybox = images["busybox"].name
    out = ctl(*RUN, "--rm", "--network", "none", busybox, "ip", "-o", "link").stdout
    assert [line.split(":")[1].strip() for line in out.splitlines()] == ["lo"]
    out = ctl(*RUN, "--rm", "--network", "host", busybox, "ip", "-o", "link").stdout
    inside = {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}
    assert "eth0" in inside and inside <= host_links() | inside and "eth0" in host_links()
    network_ls = ctl("network", "ls", "--format", "{{.Name}}").stdout.split()
    assert {"host", "none"} <= set(network_ls)


def get_until(url: str, timeout: float = 20) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_running_container_keeps_its_network_across_kill9(daemon, ctl, images):
    busybox = images["busybox"].name
    port = free_port()
    ctl(*RUN, "-d", "--name", "srv", "-p", f"127.0.0.1:{port}:8080", busybox,
        "sh", "-c", "httpd -f -p 8080 -h /etc")
    before = json.loads(ctl("network", "attachment", "srv", "--format", "json").stdout)
    assert get_until(f"http://127.0.0.1:{port}/hostname") == b"srv\n"
    daemon.kill9()
    daemon.start()
    after = json.loads(ctl("network", "attachment", "srv", "--format", "json").stdout)
    assert after["interfaces"] == before["interfaces"] and after["ports"] == before["ports"]
    # the published port is served again, by the same container at the same address
    assert get_until(f"http://127.0.0.1:{port}/hostname") == b"srv\n"
    out = ctl(*RUN, "--rm", busybox, "sh", "-c", "wget -qO- http://srv:8080/hostname").stdout
    assert out == "srv\n"


def test_connect_and_disconnect_a_running_container(ctl, images):
    busybox = images["busybox"].name
    ctl(*RUN, "-d", "--name", "srv", busybox, "sleep", "60")
    ctl("network", "create", "e2e")
    ctl("network", "connect", "--alias", "api", "e2e", "srv")
    att = json.loads(ctl("network", "attachment", "srv", "--format", "json").stdout)
    assert [i["network"] for i in att["interfaces"]] == ["bridge", "e2e"]
    inside = ctl("exec", "srv", "ip", "-o", "-4", "addr").stdout
    assert f"eth1    inet {att['interfaces'][1]['ip']}/" in inside.replace("\t", "    ")
    assert "api" in ctl("exec", "srv", "cat", "/etc/hosts").stdout
    ctl("network", "disconnect", "e2e", "srv")
    assert "eth1" not in ctl("exec", "srv", "ip", "-o", "link").stdout
    assert "api" not in ctl("exec", "srv", "cat", "/etc/hosts").stdout
