"""Networks over the wire, on the real kernel: bridge, veths, netns, hosts files, published
ports, host/none/container modes, leak-free cycles and crash reconciliation.

"Containers" here are network namespaces that runtimed made for an id; processes join them
with `nsenter --net=PATH` (busybox from busybox-static). Traffic goes only to 127.0.0.1 and
to addresses inside those namespaces.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest

from runtimed.api.containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
from runtimed.api.networks.v1 import networks_pb2 as pb
from runtimed.api.networks.v1 import networks_pb2_grpc
from runtimed.network.manager import veth_name

NS = [("containerd-namespace", "default")]
BUSYBOX = "/bin/busybox"
UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
data, peer = s.recvfrom(100)
s.sendto(b"echo: " + data, peer)
"""


def links() -> dict[str, str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        found[name] = line
    return found


def nat_rules() -> set[str]:
    out = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout
    return {line for line in out.splitlines() if line.startswith("-A")}


def mounts_under(path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(path))]


def free_subnet() -> str:
    """A random 10.x.y.0/24 no route uses (other test runs may share this host)."""
    out = subprocess.run(["ip", "-o", "-4", "route"], capture_output=True, text=True).stdout
    routed = [ipaddress.ip_network(line.split()[0], strict=False)
              for line in out.splitlines() if not line.startswith("default")]
    while True:
        candidate = ipaddress.ip_network(f"10.{random.randrange(100, 250)}.{random.randrange(256)}.0/24")
        if not any(candidate.overlaps(r) for r in routed):
            return str(candidate)


class Tracker:
    """What this test's daemon made: container veths (named from the state dir, the
    container and the network) and bridges, to check they are all gone afterwards while
    other test runs use the same host."""

    def __init__(self, state):
        self.state = state
        self.veths: set[str] = set()
        self.bridges: set[str] = set()
        self.indexes: set[str] = set()

    def saw(self, ns: str, att: pb.Attachment) -> None:
        for i in att.interfaces:
            self.veths.add(veth_name(self.state, ns, att.container_id, i.network))


TRACK: list[Tracker] = []


@pytest.fixture
def net(daemon):
    """The Networks stub; afterwards every attachment and network goes, and nothing the
    test's daemon made may stay on the host."""
    stub = networks_pb2_grpc.NetworksStub(daemon.channel())
    tracker = Tracker(daemon.state)
    TRACK.append(tracker)
    yield stub
    TRACK.remove(tracker)
    for ns in ("default", "other"):
        md = [("containerd-namespace", ns)]
        for a in stub.ListAttachments(pb.ListAttachmentsRequest(), metadata=md).attachments:
            tracker.saw(ns, a)
            try:
                stub.Detach(pb.DetachRequest(container_id=a.container_id), metadata=md)
            except grpc.RpcError:
                pass
    present = links()
    for n in stub.List(pb.ListNetworksRequest()).networks:
        if n.driver == "bridge":
            tracker.bridges.add(n.bridge)
            if n.bridge in present:  # by index: another daemon may reuse the name at once
                tracker.indexes.add(present[n.bridge].split(":")[0])
            stub.Remove(pb.RemoveNetworkRequest(name=n.name))
    left = links()
    assert not tracker.veths & set(left)
    assert not tracker.indexes & {line.split(":")[0] for line in left.values()}
    assert not [r for r in nat_rules() if any(f"runtimed:{b}" in r for b in tracker.bridges
                                               if b not in left)]
    assert mounts_under(daemon.state) == []


def attach(stub, cid, network="", ns=NS, **kw) -> pb.Attachment:
    att = stub.Attach(pb.AttachRequest(container_id=cid, network=network, **kw), metadata=ns).attachment
    for tracker in TRACK:
        tracker.saw(ns[0][1], att)
    return att


def in_netns(att: pb.Attachment, *cmd: str, hosts: bool = False, **kw) -> subprocess.CompletedProcess:
    """Run a command in the attachment's netns (with its hosts file on /etc/hosts)."""
    if hosts:
        script = f'mount --bind "{att.hosts_path}" /etc/hosts && exec "$@"'
        cmd = ("unshare", "--mount", "sh", "-c", script, "sh", *cmd)
    return subprocess.run(["nsenter", f"--net={att.netns_path}", *cmd],
                          capture_output=True, text=True, timeout=kw.pop("timeout", 20), **kw)


def spawn_in_netns(att: pb.Attachment, *cmd: str) -> subprocess.Popen:
    # stdin stays open: busybox nc may end a connection when its stdin reaches EOF
    return subprocess.Popen(["nsenter", f"--net={att.netns_path}", *cmd], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_listening(att: pb.Attachment, port: int, timeout: float = 10, udp: bool = False) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = in_netns(att, BUSYBOX, "netstat", "-lun" if udp else "-ltn").stdout
        if f":{port} " in out:
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port} in {att.container_id}")


def stop(proc: subprocess.Popen) -> str:
    """Kill if still running; what it printed."""
    if proc.poll() is None:
        proc.kill()
    try:
        return proc.communicate()[0] or ""
    except ValueError:  # already collected
        return ""



def test_two_containers_exchange_data_by_ip_and_by_name(net):
    a = attach(net, "alpha")
    b = attach(net, "beta", aliases=["db"])
    assert a.mode == "bridge" and a.netns_path and a.interfaces[0].ifname == "eth0"
    ip_a, ip_b = a.interfaces[0].ip, b.interfaces[0].ip
    assert ip_a != ip_b and a.interfaces[0].network == "bridge"
    network = net.Get(pb.GetNetworkRequest(name="bridge")).network
    assert network.bridge in links()
    assert sorted(network.containers) == ["default/alpha", "default/beta"]
    # each knows the other by name, kept current as containers come and go
    hosts_a = open(a.hosts_path).read()
    assert f"{ip_b}\tbeta db\n" in hosts_a and f"{ip_a}\talpha\n" in hosts_a
    assert open(a.hostname_path).read() == "alpha\n"
    # the MAC is made from the address (as Docker's), so it is known before the interface
    mac = "02:42:" + ":".join(f"{int(octet):02x}" for octet in ip_a.split("."))
    assert a.interfaces[0].mac == mac
    assert f"link/ether {mac} " in in_netns(a, "ip", "-o", "link", "show", "eth0").stdout
    for target in (ip_a, "alpha"):
        listener = spawn_in_netns(a, BUSYBOX, "nc", "-l", "-p", "5000")
        try:
            wait_listening(a, 5000)
            sent = in_netns(b, "sh", "-c", f"echo hello-{target} | {BUSYBOX} nc {target} 5000",
                            hosts=True)
            assert sent.returncode == 0, sent.stderr
            out, _ = listener.communicate(timeout=10)
            assert out.strip() == f"hello-{target}"
        finally:
            stop(listener)


def test_http_by_name_and_hosts_updates_keep_the_inode(net, tmp_path):
    subnet = free_subnet()
    net.Create(pb.CreateNetworkRequest(name="appnet", subnet=subnet))
    web = attach(net, "web", "appnet")
    prefix = subnet.rsplit(".", 1)[0]
    assert web.interfaces[0].ip == f"{prefix}.2" and web.interfaces[0].gateway == f"{prefix}.1"
    (tmp_path / "index.html").write_text("served from web\n")
    httpd = spawn_in_netns(web, BUSYBOX, "httpd", "-f", "-p", "8080", "-h", str(tmp_path))
    try:
        wait_listening(web, 8080)
        inode = os.stat(web.hosts_path).st_ino
        client = attach(net, "client", "appnet")
        assert f"{client.interfaces[0].ip}\tclient" in open(web.hosts_path).read()
        assert os.stat(web.hosts_path).st_ino == inode
        got = in_netns(client, BUSYBOX, "wget", "-q", "-O", "-", "http://web:8080/", hosts=True)
        assert got.returncode == 0, got.stderr
        assert got.stdout == "served from web\n"
        net.Detach(pb.DetachRequest(container_id="client"), metadata=NS)
        assert "client" not in open(web.hosts_path).read()
        assert os.stat(web.hosts_path).st_ino == inode
    finally:
        stop(httpd)


def test_published_port_answers_on_loopback(net, tmp_path):
    (tmp_path / "index.html").write_text("published\n")
    att = attach(net, "pub", ports=[
        pb.PortMapping(host_ip="127.0.0.1", host_port=0, container_port=8080),
        pb.PortMapping(host_port=0, container_port=8080),
        pb.PortMapping(host_ip="127.0.0.1", host_port=0, container_port=5353, protocol="udp"),
    ])
    tcp_local, tcp_any, udp = att.ports
    assert tcp_local.host_port and tcp_any.host_port and udp.host_port
    httpd = spawn_in_netns(att, BUSYBOX, "httpd", "-f", "-p", "8080", "-h", str(tmp_path))
    echo = spawn_in_netns(att, sys.executable, "-c", UDP_ECHO, "5353")
    try:
        wait_listening(att, 8080)
        for port in (tcp_local.host_port, tcp_any.host_port):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as reply:
                assert reply.read() == b"published\n"
        wait_listening(att, 5353, udp=True)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(10)
            s.sendto(b"ping over udp", ("127.0.0.1", udp.host_port))
            assert s.recv(100) == b"echo: ping over udp"
        # a second container cannot take a port that is published already
        with pytest.raises(grpc.RpcError) as err:
            attach(net, "clash", ports=[pb.PortMapping(host_ip="127.0.0.1",
                                                       host_port=tcp_local.host_port,
                                                       container_port=80)])
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        stop(httpd)
        stop(echo)
    net.Detach(pb.DetachRequest(container_id="pub"), metadata=NS)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", tcp_local.host_port), timeout=2).close()


def test_none_has_only_loopback(net):
    att = attach(net, "lonely", "none")
    assert att.mode == "none" and not att.interfaces
    out = in_netns(att, "ip", "-o", "link").stdout
    assert [line.split(":")[1].strip() for line in out.splitlines()] == ["lo"]
    assert "state UNKNOWN" in out or "LOWER_UP" in out  # lo is up
    assert "127.0.0.1\tlocalhost" in open(att.hosts_path).read()


def test_host_sees_the_hosts_interfaces(net):
    att = attach(net, "hosty", "host", hostname="hosty-name")
    assert att.mode == "host" and att.netns_path == "" and not att.interfaces
    assert open(att.hostname_path).read() == "hosty-name\n"
    assert open(att.hosts_path).read() == open("/etc/hosts").read()
    # no netns in the spec means the host's: the same interfaces as the test process
    mine = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "eth0" in mine or len(mine.splitlines()) > 1


def test_container_mode_shares_the_netns(net):
    first = attach(net, "first")
    second = attach(net, "second", "container:first")
    assert second.mode == "container" and second.shared_with == "first"
    assert second.netns_path == first.netns_path and second.hosts_path == first.hosts_path
    # removing the sharer leaves the owner's namespace alone
    net.Detach(pb.DetachRequest(container_id="second"), metadata=NS)
    assert os.path.exists(first.netns_path)
    # removing the owner first keeps the namespace for its sharer, until that goes too
    attach(net, "second", "container:first")
    net.Detach(pb.DetachRequest(container_id="first"), metadata=NS)
    assert first.netns_path in mounts_under(first.netns_path)
    assert os.path.exists(first.hosts_path)
    net.Detach(pb.DetachRequest(container_id="second"), metadata=NS)
    assert not os.path.exists(first.netns_path) and not os.path.exists(first.hosts_path)
    with pytest.raises(grpc.RpcError) as err:
        attach(net, "third", "container:nobody")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_network_lifecycle_connect_disconnect_and_refusals(net):
    created = net.Create(pb.CreateNetworkRequest(name="front", labels={"tier": "web"})).network
    assert created.driver == "bridge" and created.subnet and created.bridge.startswith("rtd-")
    # outbound NAT for the subnet (checked as a rule: tests send nothing off the machine)
    masquerade = [r for r in nat_rules() if f"runtimed:{created.bridge}" in r]
    assert masquerade and f"-s {created.subnet}" in masquerade[0] and "MASQUERADE" in masquerade[0]
    with pytest.raises(grpc.RpcError) as err:
        net.Create(pb.CreateNetworkRequest(name="front"))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as err:
        net.Create(pb.CreateNetworkRequest(name="clash", subnet=created.subnet))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as err:
        net.Create(pb.CreateNetworkRequest(name="mine", driver="overlay"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    names = [n.name for n in net.List(pb.ListNetworksRequest(filters=['labels.tier==web'])).networks]
    assert names == ["front"]
    assert {"host", "none"} <= {n.name for n in net.List(pb.ListNetworksRequest()).networks}
    assert net.Get(pb.GetNetworkRequest(name=created.id[:12])).network.name == "front"

    att = attach(net, "multi")  # default network first, then connect to front
    att = attach(net, "multi", "front")
    assert [(i.network, i.ifname) for i in att.interfaces] == [("bridge", "eth0"), ("front", "eth1")]
    out = in_netns(att, "ip", "-o", "-4", "addr").stdout
    assert att.interfaces[1].ip in out and att.interfaces[0].ip in out
    with pytest.raises(grpc.RpcError) as err:
        net.Remove(pb.RemoveNetworkRequest(name="front"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "default/multi" in err.value.details()
    net.Detach(pb.DetachRequest(container_id="multi", network="front"), metadata=NS)
    out = in_netns(att, "ip", "-o", "link").stdout
    assert "eth1" not in out and "eth0" in out
    net.Remove(pb.RemoveNetworkRequest(name="front"))
    assert created.bridge not in links()
    assert not [r for r in nat_rules() if f"runtimed:{created.bridge}" in r]
    with pytest.raises(grpc.RpcError) as err:
        net.Remove(pb.RemoveNetworkRequest(name="host"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_attach_runs_no_iptables_and_brings_a_lost_bridge_back(daemon, net, tmp_path,
                                                                 monkeypatch):
    """The NAT rule is seen to when the bridge is set up, not on every attach; a bridge
    deleted behind runtimed's back comes back (address, NAT rule) with the next attach."""
    real = shutil.which("iptables")
    bindir, calls = tmp_path / "bin", tmp_path / "iptables.log"
    bindir.mkdir()
    (bindir / "iptables").write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec {real} "$@"\n')
    (bindir / "iptables").chmod(0o755)
    daemon.stop()
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    daemon.start()  # its network helper runs iptables through the logging wrapper

    def logged() -> list[str]:
        return calls.read_text().splitlines() if calls.exists() else []

    stub = networks_pb2_grpc.NetworksStub(daemon.channel())
    first = attach(stub, "first")  # makes the default network and its NAT rule
    network = stub.Get(pb.GetNetworkRequest(name="bridge")).network
    setup = logged()
    assert setup and all(f"runtimed:{network.bridge}" in line for line in setup)
    for n in range(3):
        attach(stub, f"more{n}")
        stub.Detach(pb.DetachRequest(container_id=f"more{n}"), metadata=NS)
    stub.Detach(pb.DetachRequest(container_id="first"), metadata=NS)
    assert logged() == setup  # no iptables process per attach or detach
    subprocess.run(["ip", "link", "del", network.bridge], check=True)
    again = attach(stub, "again")
    assert again.interfaces[0].gateway == first.interfaces[0].gateway
    veth = veth_name(daemon.state, "default", "again", "bridge")
    assert f"master {network.bridge} " in links()[veth]
    addrs = subprocess.run(["ip", "-o", "-4", "addr", "show", "dev", network.bridge],
                           capture_output=True, text=True).stdout
    assert f" {network.gateway}/" in addrs
    assert len(logged()) > len(setup)  # the NAT rule was checked again with the new bridge
    assert [r for r in nat_rules() if f"runtimed:{network.bridge}" in r]
    got = in_netns(again, BUSYBOX, "ping", "-c", "1", "-W", "5", network.gateway)
    assert got.returncode == 0, got.stdout + got.stderr


def test_hosts_files_list_the_peers_of_every_network_same_namespace_first(net):
    net.Create(pb.CreateNetworkRequest(name="side", subnet=free_subnet()))
    attach(net, "far", ns=[("containerd-namespace", "other")])  # oldest, other namespace
    attach(net, "multi")
    multi = attach(net, "multi", "side")
    solo = attach(net, "solo", "side")
    attach(net, "near")

    def entries(att) -> list[tuple[str, str]]:
        lines = open(att.hosts_path).read().splitlines()[6:]  # after the localhost lines
        return [(line.split("\t")[1].split()[0], line.split("\t")[0]) for line in lines]

    ip = {i.network: i.ip for i in multi.interfaces}
    names = [name for name, _ in entries(multi)]
    assert names == ["multi", "multi", "solo", "near", "far"]
    assert entries(multi)[:2] == [("multi", ip["bridge"]), ("multi", ip["side"])]
    assert entries(solo) == [("solo", solo.interfaces[0].ip), ("multi", ip["side"])]


def test_default_subnet_avoids_host_routes(net):
    att = attach(net, "probe")
    network = net.Get(pb.GetNetworkRequest(name="bridge")).network
    import ipaddress

    subnet = ipaddress.ip_network(network.subnet)
    out = subprocess.run(["ip", "-o", "-4", "route"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        dst = line.split()[0]
        if dst == "default" or network.bridge in line.split():
            continue
        assert not subnet.overlaps(ipaddress.ip_network(dst, strict=False)), line
    assert ipaddress.ip_address(att.interfaces[0].ip) in subnet


def test_fifty_cycles_leave_nothing_behind(daemon, net):
    attach(net, "keeper")  # holds the default network (and its bridge) in place
    bridge = net.Get(pb.GetNetworkRequest(name="bridge")).network.bridge
    bridge_addrs = subprocess.run(["ip", "-o", "-4", "addr", "show", "dev", bridge],
                                  capture_output=True, text=True).stdout
    seen = set()
    for n in range(50):
        cid = f"cycle{n}"
        att = attach(net, cid, ports=[pb.PortMapping(host_ip="127.0.0.1", container_port=80)])
        seen.add(att.interfaces[0].ip)
        veth = veth_name(daemon.state, "default", cid, "bridge")
        assert f"master {bridge}" in links()[veth]
        net.Detach(pb.DetachRequest(container_id=cid), metadata=NS)
        assert veth not in links()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", att.ports[0].host_port), timeout=2).close()
    assert len(seen) == 50  # addresses rotate rather than being reused at once
    members = [n for n, line in links().items() if f"master {bridge} " in line]
    assert members == [veth_name(daemon.state, "default", "keeper", "bridge")]
    assert subprocess.run(["ip", "-o", "-4", "addr", "show", "dev", bridge],
                          capture_output=True, text=True).stdout == bridge_addrs
    assert mounts_under(daemon.state) == [att.netns_path.replace("cycle49", "keeper")]
    assert os.listdir(os.path.dirname(att.netns_path)) == ["keeper"]
    assert os.listdir(os.path.dirname(os.path.dirname(att.hosts_path))) == ["keeper"]


def create_container(daemon, cid, ns="default"):
    c = containers_pb2.Container(id=cid)
    c.runtime.name = "io.containerd.runc.v2"
    c.spec.type_url = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
    c.spec.value = json.dumps({"ociVersion": "1.0.2"}).encode()
    containers_pb2_grpc.ContainersStub(daemon.channel()).Create(
        containers_pb2.CreateContainerRequest(container=c), metadata=[("containerd-namespace", ns)])


def test_kill9_restart_keeps_allocations_and_drops_leftovers(daemon, net):
    for cid in ("kept1", "kept2"):
        create_container(daemon, cid)
    kept = {cid: attach(net, cid, ports=[pb.PortMapping(host_ip="127.0.0.1", container_port=80)])
            for cid in ("kept1", "kept2")}
    gone = attach(net, "gone")  # no container record: a client that crashed mid-run
    gone_veth = veth_name(daemon.state, "default", "gone", "bridge")
    assert gone_veth in links()
    daemon.kill9()
    daemon.start()
    stub = networks_pb2_grpc.NetworksStub(daemon.channel())
    for cid, before in kept.items():
        after = stub.Inspect(pb.InspectAttachmentRequest(container_id=cid), metadata=NS).attachment
        assert after.interfaces[0].ip == before.interfaces[0].ip
        assert after.netns_path == before.netns_path and os.path.exists(after.netns_path)
        assert after.ports[0].host_port == before.ports[0].host_port
        # listening again (the proxy accepts; nothing serves behind it here)
        socket.create_connection(("127.0.0.1", after.ports[0].host_port), timeout=5).close()
    with pytest.raises(grpc.RpcError) as err:
        stub.Inspect(pb.InspectAttachmentRequest(container_id="gone"), metadata=NS)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert not os.path.exists(gone.netns_path)
    assert gone_veth not in links()
    taken = {a.interfaces[0].ip for a in kept.values()}
    fresh = [attach(stub, f"new{n}").interfaces[0].ip for n in range(3)]
    assert not taken & set(fresh) and len(set(fresh)) == 3
    # deleting a container through the Containers service removes its attachment too
    containers_pb2_grpc.ContainersStub(daemon.channel()).Delete(
        containers_pb2.DeleteContainerRequest(id="kept1"), metadata=NS)
    deadline = time.monotonic() + 10
    while os.path.exists(kept["kept1"].netns_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(kept["kept1"].netns_path)
    containers_pb2_grpc.ContainersStub(daemon.channel()).Delete(
        containers_pb2.DeleteContainerRequest(id="kept2"), metadata=NS)



def test_restart_recreates_a_lost_netns_with_the_same_address(daemon, net):
    """As after a reboot (the state dir is tmpfs): the netns mount and veth are gone, the
    container record is not; the attachment comes back with the address it had."""
    create_container(daemon, "survivor")
    try:
        before = attach(net, "survivor", aliases=["svc"])
        daemon.kill9()
        subprocess.run(["umount", before.netns_path], check=True)
        os.unlink(before.netns_path)
        os.unlink(before.hosts_path)
        veth = veth_name(daemon.state, "default", "survivor", "bridge")
        deadline = time.monotonic() + 10
        while veth in links():  # the kernel frees the netns (and its veth) asynchronously
            assert time.monotonic() < deadline
            time.sleep(0.05)
        daemon.start()
        stub = networks_pb2_grpc.NetworksStub(daemon.channel())
        after = stub.Inspect(pb.InspectAttachmentRequest(container_id="survivor"), metadata=NS).attachment
        assert after.interfaces[0].ip == before.interfaces[0].ip
        assert before.netns_path in mounts_under(before.netns_path) and veth in links()
        out = in_netns(after, "ip", "-o", "-4", "addr", "show", "eth0").stdout
        assert f"{before.interfaces[0].ip}/" in out
        assert "svc" in open(after.hosts_path).read()
        route = in_netns(after, "ip", "route").stdout
        assert f"default via {before.interfaces[0].gateway}" in route
    finally:
        if daemon.proc.poll() is not None:
            daemon.start()
        containers_pb2_grpc.ContainersStub(daemon.channel()).Delete(
            containers_pb2.DeleteContainerRequest(id="survivor"), metadata=NS)


def test_restart_rebuilds_a_half_made_endpoint_and_stale_hosts_files(daemon, net):
    """As a helper killed inside endpoint_add leaves it: the veth is on the bridge but the
    inner end is down and unaddressed. And a peer's hosts file that missed an update. The
    next start rebuilds the endpoint with its address and rewrites every hosts file."""
    for cid in ("broken", "peer"):
        create_container(daemon, cid)
    try:
        broken = attach(net, "broken")
        peer = attach(net, "peer")
        ip = broken.interfaces[0].ip
        daemon.kill9()
        assert in_netns(broken, "ip", "addr", "flush", "dev", "eth0").returncode == 0
        assert in_netns(broken, "ip", "link", "set", "eth0", "down").returncode == 0
        with open(peer.hosts_path, "r+") as f:  # in place: the inode is what a container sees
            stale = f.read().replace(f"{ip}\tbroken", "10.0.0.1\tbroken")
            f.seek(0)
            f.write(stale)
            f.truncate()
        daemon.start()
        out = in_netns(broken, "ip", "-o", "-4", "addr", "show", "dev", "eth0").stdout
        assert f" {ip}/" in out
        assert "UP" in in_netns(broken, "ip", "-o", "link", "show", "eth0").stdout
        assert f"default via {broken.interfaces[0].gateway}" in in_netns(broken, "ip", "route").stdout
        assert f"{ip}\tbroken\n" in open(peer.hosts_path).read()
        got = in_netns(peer, BUSYBOX, "ping", "-c", "1", "-W", "5", ip)
        assert got.returncode == 0, got.stdout + got.stderr
    finally:
        if daemon.proc.poll() is not None:
            daemon.start()
        for cid in ("broken", "peer"):
            containers_pb2_grpc.ContainersStub(daemon.channel()).Delete(
                containers_pb2.DeleteContainerRequest(id=cid), metadata=NS)


def test_bridges_of_dead_daemons_are_swept_and_live_ones_kept(daemon, net, tmp_path):
    """A runtimed killed for good leaves its bridges; the next runtimed to make a default
    network removes those whose owner's root is no longer locked, and only those."""
    import fcntl

    live_root = tmp_path / "live"
    live_root.mkdir()
    lock = open(live_root / "runtimed.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    suffix = random.randrange(16**6)
    dead, live = f"rtdx{suffix:06x}", f"rtdy{suffix:06x}"
    orphan_rule = ["POSTROUTING", "-s", "10.255.255.252/30", "!", "-o", dead, "-j", "MASQUERADE",
                   "-m", "comment", "--comment", f"runtimed:{dead}"]
    try:
        for name, root in ((dead, tmp_path / "gone"), (live, live_root)):
            subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True)
            subprocess.run(["ip", "link", "set", name, "alias", f"runtimed {root}"], check=True)
        subprocess.run(["iptables", "-t", "nat", "-A", *orphan_rule], check=True)
        attach(net, "first")  # creates the default network, sweeping first
        assert not [r for r in nat_rules() if f"runtimed:{dead}" in r]
        present = links()
        assert dead not in present and live in present
        ours = net.Get(pb.GetNetworkRequest(name="bridge")).network.bridge
        assert f"alias runtimed {daemon.root}" in subprocess.run(
            ["ip", "-d", "link", "show", ours], capture_output=True, text=True).stdout
    finally:
        lock.close()
        for name in (dead, live):
            subprocess.run(["ip", "link", "del", name], capture_output=True)
        subprocess.run(["iptables", "-t", "nat", "-D", *orphan_rule], capture_output=True)
