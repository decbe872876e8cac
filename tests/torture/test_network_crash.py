"""Crash safety of networks: runtimed killed with SIGKILL (and, every other time, its
network helper with it, as a service manager killing the whole unit would) at a random
moment while networks are created and removed and containers are attached to, detached
from, connected to and disconnected from bridge networks, or deleted while attached.

After every restart: each address is given once and lies in its network's subnet, every
attachment belongs to an existing container and has its veth on its bridge and its
address inside its netns, every hosts file lists exactly its container's peers, and no
veth, bridge, netns mount, name-file dir or `runtimed:` NAT rule exists that no record
names. Two keeper containers (network namespaces with a busybox httpd in one) keep their
addresses and still reach each other, and the published port still answers on
127.0.0.1. Then the interrupted operation is finished or undone by the client, and what
it removed must be gone from the kernel too.

"Containers" are container records (Containers.Create) whose network namespaces the test
enters with nsenter, as in tests/integration/test_networks.py. Traffic goes only to
127.0.0.1 and into namespaces this test made. The CI variant injects one crash per
operation with the helper spared and one with it killed; the `slow` variant 60 at random.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from runtimed.api.containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
from runtimed.api.networks.v1 import networks_pb2 as pb
from runtimed.api.networks.v1 import networks_pb2_grpc
from runtimed.network.manager import veth_name
from tests.torture import stats
from tests.torture.helpers import md

BUSYBOX = "/bin/busybox"
NET_A, NET_B = "tna", "tnb"
OPERATIONS = ["attach", "delete", "connect", "network"]
SYS_NET = Path("/sys/class/net")


def free_subnets(n: int) -> list[str]:
    """Random 10.x.y.0/24 subnets no route of this host uses (other test runs share it)."""
    out = subprocess.run(["ip", "-o", "-4", "route"], capture_output=True, text=True).stdout
    taken = [ipaddress.ip_network(line.split()[0], strict=False)
             for line in out.splitlines() if not line.startswith("default")]
    found: list[ipaddress.IPv4Network] = []
    while len(found) < n:
        c = ipaddress.ip_network(f"10.{random.randrange(100, 250)}.{random.randrange(256)}.0/24")
        if not any(c.overlaps(t) for t in taken + found):
            found.append(c)
    return [str(c) for c in found]


def links() -> dict[str, dict]:
    """Every link of the host's network namespace: master, alias, whether it is a bridge."""
    found = {}
    for path in SYS_NET.iterdir():
        try:
            master = os.path.basename(os.readlink(path / "master"))
        except OSError:
            master = None
        try:
            alias = (path / "ifalias").read_text().strip()
        except OSError:
            alias = ""
        found[path.name] = {"master": master, "alias": alias,
                            "bridge": (path / "bridge").is_dir()}
    return found


def nat_comments() -> list[str]:
    """The bridge named by each `runtimed:` MASQUERADE rule."""
    out = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        if line.startswith("-A ") and "runtimed:" in line:
            found.append(line.split("runtimed:", 1)[1].split()[0].strip('"'))
    return found


def mounts_under(path: Path) -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4] for line in f if line.split()[4].startswith(f"{path}/")}


def helper_pids(daemon_pid: int) -> list[int]:
    """runtimed's network helper (its child running runtimed.network.helper)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == daemon_pid and b"runtimed.network.helper" in cmdline:
            found.append(int(entry))
    return found


def hosts_ips(path: str) -> set[str]:
    ips = set()
    for line in Path(path).read_text().splitlines():
        fields = line.split()
        if fields and not line.startswith("#") and ":" not in fields[0] and not fields[0].startswith("127."):
            ips.add(fields[0])
    return ips


def ignore_not_found(call, *args, **kw):
    try:
        return call(*args, **kw)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return None


class NetCrasher:
    def __init__(self, daemon, ns: str, rng: random.Random, tmp: Path):
        self.daemon = daemon
        self.ns = ns
        self.rng = rng
        self.tmp = tmp
        self.serial = 0
        self.log: list[str] = []
        self.pairs: set[tuple[str, str]] = set()  # (container id, network) ever tried
        self.bridges: set[str] = set()  # every bridge our networks ever had
        self.subnets: dict[str, str] = {}
        self.keepers: dict[str, pb.Attachment] = {}
        self.httpd: subprocess.Popen | None = None
        self._connect()

    def _connect(self) -> None:
        self.channel = self.daemon.channel()
        self.net = networks_pb2_grpc.NetworksStub(self.channel)
        self.containers = containers_pb2_grpc.ContainersStub(self.channel)

    # ---- client-side helpers -------------------------------------------------------

    def create_container(self, cid: str) -> None:
        c = containers_pb2.Container(id=cid)
        c.runtime.name = "io.containerd.runc.v2"
        c.spec.type_url = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
        c.spec.value = json.dumps({"ociVersion": "1.0.2"}).encode()
        self.containers.Create(containers_pb2.CreateContainerRequest(container=c),
                               metadata=md(self.ns), timeout=30)

    def attach(self, cid: str, network: str, **kw) -> pb.Attachment:
        self.pairs.add((cid, network))
        return self.net.Attach(pb.AttachRequest(container_id=cid, network=network, **kw),
                               metadata=md(self.ns), timeout=30).attachment

    def detach(self, cid: str, network: str = "") -> None:
        ignore_not_found(self.net.Detach, pb.DetachRequest(container_id=cid, network=network),
                         metadata=md(self.ns), timeout=30)

    def delete_container(self, cid: str) -> None:
        ignore_not_found(self.containers.Delete, containers_pb2.DeleteContainerRequest(id=cid),
                         metadata=md(self.ns), timeout=30)

    def create_network(self, name: str, subnet: str) -> None:
        self.subnets[name] = subnet
        created = self.net.Create(pb.CreateNetworkRequest(name=name, subnet=subnet), timeout=30)
        self.bridges.add(created.network.bridge)

    def remove_network(self, name: str) -> None:
        ignore_not_found(self.net.Remove, pb.RemoveNetworkRequest(name=name), timeout=30)

    def in_netns(self, att: pb.Attachment, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", f"--net={att.netns_path}", *cmd],
                              capture_output=True, text=True, timeout=20)

    # ---- setup ---------------------------------------------------------------------

    def setup(self) -> None:
        a, b = free_subnets(2)
        self.create_network(NET_A, a)
        self.create_network(NET_B, b)
        for cid in ("k1", "k2"):
            self.create_container(cid)
        ports = [pb.PortMapping(host_ip="127.0.0.1", container_port=8080)]
        self.keepers["k1"] = self.attach("k1", NET_A, ports=ports)
        self.keepers["k2"] = self.attach("k2", NET_A, aliases=["peer"])
        (self.tmp / "index.html").write_text("from k1\n")
        self.httpd = subprocess.Popen(
            ["nsenter", f"--net={self.keepers['k1'].netns_path}", BUSYBOX, "httpd", "-f",
             "-p", "8080", "-h", str(self.tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not self._k2_reaches_k1():
            assert time.monotonic() < deadline, f"httpd in k1 does not answer: {self.last_wget}"
            time.sleep(0.1)

    def _k2_reaches_k1(self) -> bool:
        ip = self.keepers["k1"].interfaces[0].ip
        got = self.in_netns(self.keepers["k2"], BUSYBOX, "wget", "-q", "-O", "-",
                            f"http://{ip}:8080/index.html")
        self.last_wget = f"rc={got.returncode} out={got.stdout!r} err={got.stderr!r} httpd={self.httpd.poll()}"
        return got.returncode == 0 and got.stdout == "from k1\n"

    # ---- one crash -----------------------------------------------------------------

    def inject(self, op: str, kill_helper: bool) -> None:
        self.serial += 1
        n = self.serial
        prepare, cycle, finish = getattr(self, f"_op_{op}")(n)
        prepare()
        failures: list[BaseException] = []
        cycles = [0]

        def loop():
            try:
                while True:
                    cycle(cycles[0])
                    cycles[0] += 1
                    stats.record("netops")
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    failures.append(exc)
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        worker = threading.Thread(target=loop, daemon=True)
        worker.start()
        delay = self.rng.uniform(0.05, 1.5)
        time.sleep(delay)
        helpers = helper_pids(self.daemon.proc.pid) if kill_helper else []
        self.daemon.kill9()
        for pid in helpers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stats.record("crashes")
        worker.join(60)
        assert not worker.is_alive(), f"{op} #{n}: the client hung after the crash"
        assert not failures, f"{op} #{n} failed before the crash: {failures[0]!r}"
        self.channel.close()
        self.daemon.start()
        self._connect()
        what = f"{op}#{n} killed after {delay:.3f}s in cycle {cycles[0]}" + \
            (" with its helper" if helpers else "")
        self.log.append(what)
        self.verify(f"after the crash in {what}")
        finish(cycles[0])
        self.verify(f"after finishing {what}")

    def _op_attach(self, n: int):
        """attach (every other one with a published port), detach, delete the container"""
        def cid(i):
            return f"a{n}-{i}"

        def cycle(i):
            self.create_container(cid(i))
            ports = [pb.PortMapping(host_ip="127.0.0.1", container_port=80)] if i % 2 else []
            self.attach(cid(i), NET_A, ports=ports)
            self.detach(cid(i))
            self.delete_container(cid(i))

        def finish(cycles):
            for i in range(cycles + 1):
                self.detach(cid(i))
                self.delete_container(cid(i))
            self.expect_gone([cid(i) for i in range(cycles + 1)], [])

        return lambda: None, cycle, finish

    def _op_delete(self, n: int):
        """attach, then delete the container while attached (the daemon detaches it)"""
        def cid(i):
            return f"d{n}-{i}"

        def cycle(i):
            self.create_container(cid(i))
            self.attach(cid(i), NET_A)
            self.delete_container(cid(i))

        def finish(cycles):
            ids = [cid(i) for i in range(cycles + 1)]
            for c in ids:  # what the daemon's follower may still be doing, done by hand
                self.detach(c)
                self.delete_container(c)
            self.expect_gone(ids, [])

        return lambda: None, cycle, finish

    def _op_connect(self, n: int):
        """connect a container to a second network and disconnect it"""
        cid = f"x{n}"

        def prepare():
            self.create_container(cid)
            self.attach(cid, NET_A)

        def cycle(i):
            self.attach(cid, NET_B, aliases=[f"alias{i}"])
            self.detach(cid, NET_B)

        def finish(cycles):
            self.detach(cid, NET_B)
            att = self.net.Inspect(pb.InspectAttachmentRequest(container_id=cid),
                                   metadata=md(self.ns), timeout=30).attachment
            assert [i.network for i in att.interfaces] == [NET_A], att
            assert veth_name(self.daemon.state, self.ns, cid, NET_B) not in links()
            self.detach(cid)
            self.delete_container(cid)
            self.expect_gone([cid], [])

        return prepare, cycle, finish

    def _op_network(self, n: int):
        """create a network, attach a container to it, detach, remove the network"""
        subnets = free_subnets(1)
        cid = f"n{n}"

        def name(i):
            return f"tn{n}-{i}"

        def prepare():
            self.create_container(cid)

        def cycle(i):
            self.create_network(name(i), subnets[0])
            if i % 2:
                self.attach(cid, name(i))
                self.detach(cid)
            self.net.Remove(pb.RemoveNetworkRequest(name=name(i)), timeout=30)

        def finish(cycles):
            self.detach(cid)
            self.delete_container(cid)
            for i in range(cycles + 1):
                self.remove_network(name(i))
            self.expect_gone([cid], [name(i) for i in range(cycles + 1)])

        return prepare, cycle, finish

    # ---- what must hold ------------------------------------------------------------

    def expect_gone(self, ids: list[str], networks: list[str]) -> None:
        """What the client removed is gone from the records and from the kernel."""
        problems = []
        present = links()
        listed = {n.name for n in self.net.List(pb.ListNetworksRequest(), timeout=30).networks}
        for cid in ids:
            try:
                self.net.Inspect(pb.InspectAttachmentRequest(container_id=cid),
                                 metadata=md(self.ns), timeout=30)
                problems.append(f"{cid}: still attached")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
            for path in (self.daemon.state / "netns" / self.ns / cid,
                         self.daemon.state / "netns-files" / self.ns / cid):
                if os.path.lexists(path):
                    problems.append(f"{cid}: {path} left")
            for c, network in self.pairs:
                veth = veth_name(self.daemon.state, self.ns, c, network)
                if c == cid and (veth in present or "rp" + veth[2:] in present):
                    problems.append(f"{cid}: veth {veth} left")
        problems += [f"network {name} still listed" for name in networks if name in listed]
        self._record(problems, "after finishing")

    def verify(self, when: str) -> None:
        problems = self._problems()
        self._record(problems, when)

    def _record(self, problems: list[str], when: str) -> None:
        if problems:
            stats.record("leaks", len(problems))
        assert not problems, f"{when}: {problems}\n{self.log}\n{self._daemon_log()}"

    def _daemon_log(self) -> str:
        text = [line for line in self.daemon.log_text().splitlines() if "grpc._cython" not in line]
        return "\n".join(text[-30:])

    def _problems(self) -> list[str]:
        problems: list[str] = []
        state = self.daemon.state
        networks = {n.name: n for n in self.net.List(pb.ListNetworksRequest(), timeout=30).networks
                    if n.driver == "bridge"}
        self.bridges |= {n.bridge for n in networks.values()}
        atts = self.net.ListAttachments(pb.ListAttachmentsRequest(), metadata=md(self.ns),
                                        timeout=30).attachments
        present = links()
        ours = {n.bridge for n in networks.values()}
        # IPAM: every address once per network, inside its subnet, never the gateway
        seen: dict[tuple[str, str], str] = {}
        recorded_veths = set()
        for att in atts:
            cid = att.container_id
            try:
                self.containers.Get(containers_pb2.GetContainerRequest(id=cid),
                                    metadata=md(self.ns), timeout=30)
            except grpc.RpcError:
                problems.append(f"{cid}: attached but its container does not exist")
            for i in att.interfaces:
                network = networks.get(i.network)
                if network is None:
                    problems.append(f"{cid}: on {i.network}, which is not listed")
                    continue
                subnet = ipaddress.ip_network(network.subnet)
                ip = ipaddress.ip_address(i.ip)
                if ip not in subnet or i.ip == network.gateway or ip in (
                        subnet.network_address, subnet.broadcast_address):
                    problems.append(f"{cid}: address {i.ip} not a host address of {network.subnet}")
                if (i.network, i.ip) in seen:
                    problems.append(f"{i.ip} given twice on {i.network}: {seen[i.network, i.ip]}, {cid}")
                seen[i.network, i.ip] = cid
                veth = veth_name(state, self.ns, cid, i.network)
                recorded_veths.add(veth)
                link = present.get(veth)
                if link is None or link["master"] != network.bridge:
                    problems.append(f"{cid}: veth {veth} not on {network.bridge}: {link}")
                    continue
                inside = self.in_netns(att, "ip", "-o", "-4", "addr", "show", "dev", i.ifname)
                if f" {i.ip}/{i.prefix_len} " not in inside.stdout:
                    problems.append(f"{cid}: {i.ifname} in its netns lacks {i.ip}: {inside.stdout}")
        # hosts files: exactly the container's own and its peers' addresses
        by_network: dict[str, set[str]] = {}
        for att in atts:
            for i in att.interfaces:
                by_network.setdefault(i.network, set()).add(i.ip)
        for att in atts:
            if att.mode != "bridge":
                continue
            want = set().union(*(by_network[i.network] for i in att.interfaces)) \
                if att.interfaces else set()
            try:
                have = hosts_ips(att.hosts_path)
            except OSError as exc:
                problems.append(f"{att.container_id}: hosts file: {exc}")
                continue
            if have != want:
                problems.append(f"{att.container_id}: hosts file lists {sorted(have)}, "
                                f"peers are {sorted(want)}")
        # nothing unrecorded: veths, bridges, NAT rules, netns mounts, name-file dirs
        for c, network in self.pairs:
            veth = veth_name(state, self.ns, c, network)
            for name in (veth, "rp" + veth[2:]):
                if name in present and veth not in recorded_veths:
                    problems.append(f"orphaned veth {name} ({c} on {network})")
        owner = f"runtimed {self.daemon.root}"
        for name, link in present.items():
            if link["bridge"] and link["alias"] == owner and name not in ours:
                problems.append(f"orphaned bridge {name}")
        for network in networks.values():
            if network.containers and network.bridge not in present:
                problems.append(f"network {network.name} has containers but no bridge")
        for bridge in nat_comments():
            if bridge in self.bridges and (bridge not in ours or bridge not in present):
                problems.append(f"orphaned NAT rule runtimed:{bridge}")
        want_mounts = {a.netns_path for a in atts if a.mode in ("bridge", "none")}
        have_mounts = mounts_under(state / "netns")
        if have_mounts != want_mounts:
            problems.append(f"netns mounts {sorted(have_mounts)}, attachments {sorted(want_mounts)}")
        for base in (state / "netns" / self.ns, state / "netns-files" / self.ns):
            names = set(os.listdir(base)) if base.is_dir() else set()
            extra = names - {a.container_id for a in atts}
            if extra:
                problems.append(f"unrecorded {sorted(extra)} in {base}")
        problems += self._keeper_problems({a.container_id: a for a in atts})
        return problems

    def _keeper_problems(self, atts: dict[str, pb.Attachment]) -> list[str]:
        problems = []
        for cid, before in self.keepers.items():
            after = atts.get(cid)
            if after is None or after.interfaces[0].ip != before.interfaces[0].ip:
                problems.append(f"keeper {cid} lost its address: {after}")
                return problems
        if not self._k2_reaches_k1():
            problems.append("k2 no longer reaches k1's httpd")
        port = atts["k1"].ports[0].host_port
        if port != self.keepers["k1"].ports[0].host_port:
            problems.append(f"k1's published port moved to {port}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=10) as r:
                if r.read() != b"from k1\n":
                    problems.append("k1's published port answers something else")
        except OSError as exc:
            problems.append(f"k1's published port does not answer: {exc}")
        return problems

    # ---- the end -------------------------------------------------------------------

    def teardown(self) -> None:
        if self.httpd is not None:
            self.httpd.kill()
            self.httpd.wait()
        if self.daemon.proc.poll() is not None:
            self.daemon.start()
            self._connect()
        for att in self.net.ListAttachments(pb.ListAttachmentsRequest(), metadata=md(self.ns),
                                            timeout=30).attachments:
            self.detach(att.container_id)
            self.delete_container(att.container_id)
        for c in self.containers.List(containers_pb2.ListContainersRequest(),
                                      metadata=md(self.ns), timeout=30).containers:
            self.delete_container(c.id)
        for n in self.net.List(pb.ListNetworksRequest(), timeout=30).networks:
            if n.driver == "bridge":
                self.bridges.add(n.bridge)
                self.remove_network(n.name)
        self.channel.close()

    def leftovers(self) -> list[str]:
        """After teardown: nothing of ours on the host."""
        present = links()
        problems = [f"bridge {b} left" for b in self.bridges if b in present]
        problems += [f"NAT rule runtimed:{b} left" for b in nat_comments() if b in self.bridges]
        for c, network in self.pairs:
            veth = veth_name(self.daemon.state, self.ns, c, network)
            problems += [f"veth {name} left" for name in (veth, "rp" + veth[2:]) if name in present]
        problems += [f"mount {m} left" for m in mounts_under(self.daemon.state)]
        return problems


    def scrub(self) -> None:
        """When the test failed before its teardown could run through the daemon: remove
        what it made by hand, so a failure leaves nothing on the host either."""
        owner = f"runtimed {self.daemon.root}"
        present = links()
        for name, link in present.items():
            if link["bridge"] and link["alias"] == owner:
                self.bridges.add(name)
        for c, network in self.pairs:
            veth = veth_name(self.daemon.state, self.ns, c, network)
            for name in (veth, "rp" + veth[2:]):
                if name in present:
                    subprocess.run(["ip", "link", "del", name], capture_output=True)
        for bridge in self.bridges:
            if bridge in present:
                subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        out = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("-A ") and any(f"runtimed:{b}" in line for b in self.bridges):
                import shlex

                subprocess.run(["iptables", "-t", "nat", "-D", *shlex.split(line)[1:]],
                               capture_output=True)


def run_crashes(daemon, ns, tmp_path, plan: list[tuple[str, bool]], seed: int) -> None:
    crasher = NetCrasher(daemon, ns, random.Random(seed), tmp_path)
    try:
        crasher.setup()
        crasher.verify("after setup")
        for op, kill_helper in plan:
            crasher.inject(op, kill_helper)
    except BaseException:
        try:
            crasher.teardown()
        except BaseException:  # noqa: BLE001 - the first failure is the one to report
            pass
        crasher.scrub()
        raise
    crasher.teardown()
    problems = crasher.leftovers()
    if problems:
        stats.record("leaks", len(problems))
    assert not problems, problems


def test_kill9_during_network_operations(daemon, ns, tmp_path):
    rng = random.Random()
    plan = [(op, False) for op in OPERATIONS] + [(op, True) for op in OPERATIONS]
    rng.shuffle(plan)
    run_crashes(daemon, ns, tmp_path, plan, seed=rng.randrange(1 << 30))


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_kill9_during_network_operations_soak(daemon, ns, tmp_path):
    rng = random.Random()
    plan = [(rng.choice(OPERATIONS), rng.random() < 0.5) for _ in range(60)]
    run_crashes(daemon, ns, tmp_path, plan, seed=rng.randrange(1 << 30))
