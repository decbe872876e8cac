"""Networks and container attachments: the core behind runtimed.networks.v1.

Networks are daemon-global (as in Docker); a container's attachment ("sandbox") is keyed
by (containerd namespace, container id). runtimed owns each container's network
namespace: a bind-mounted nsfs file under `<state>/netns/<ns>/<id>` that the client names
in the OCI spec, plus `hosts`, `resolv.conf` and `hostname` under
`<state>/netns-files/<ns>/<id>/` that the client bind-mounts.

Records are written before kernel objects are made and removed after they are gone, so
after a crash every kernel object runtimed made is either recorded or under a name
runtimed can recognise (`reconcile`). The UNIQUE (network, ip) constraint means no
address is ever given twice.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import secrets
import shutil
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from runtimed import identifiers
from runtimed.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RuntimedError,
)
from runtimed.filters import parse
from runtimed.metadata import labels as label_rules
from runtimed.metadata.db import Database, now_ns
from runtimed.network import files, ipam
from runtimed.network.proxy import PortMapping, Proxy, bind

log = logging.getLogger("runtimed.network")

SCHEMA = [
    """
    CREATE TABLE net_networks (
        name TEXT PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        driver TEXT NOT NULL,
        subnet TEXT NOT NULL,
        gateway TEXT NOT NULL,
        bridge TEXT NOT NULL UNIQUE,
        labels TEXT NOT NULL DEFAULT '{}',
        last_ip TEXT NOT NULL DEFAULT '',
        created_at INTEGER NOT NULL
    );
    CREATE TABLE net_sandboxes (
        namespace TEXT NOT NULL REFERENCES namespaces(name),
        container_id TEXT NOT NULL,
        mode TEXT NOT NULL,
        netns TEXT NOT NULL DEFAULT '',
        hostname TEXT NOT NULL,
        shared_with TEXT NOT NULL DEFAULT '',
        ports TEXT NOT NULL DEFAULT '[]',
        created_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, container_id)
    );
    CREATE TABLE net_endpoints (
        namespace TEXT NOT NULL,
        container_id TEXT NOT NULL,
        network TEXT NOT NULL REFERENCES net_networks(name),
        ip TEXT NOT NULL,
        ifname TEXT NOT NULL,
        host_if TEXT NOT NULL UNIQUE,
        mac TEXT NOT NULL DEFAULT '',
        aliases TEXT NOT NULL DEFAULT '[]',
        created_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, container_id, network),
        UNIQUE (network, ip),
        FOREIGN KEY (namespace, container_id) REFERENCES net_sandboxes(namespace, container_id)
    )
    """,
]

DEFAULT_NETWORK = "bridge"
DEFAULT_ALIASES = ("", "default", DEFAULT_NETWORK)
MODES = ("bridge", "host", "none", "container")
RESERVED = ("host", "none", "default", DEFAULT_NETWORK)
VETH_PREFIX = "rv"
ALIAS_PREFIX = "runtimed "  # + the owner's root, as the alias of each bridge it made


@dataclass
class Network:
    name: str
    id: str
    driver: str
    subnet: str = ""
    gateway: str = ""
    bridge: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    created_at: int = 0
    containers: list[str] = field(default_factory=list)  # "<namespace>/<id>"


@dataclass
class Interface:
    network: str
    ifname: str
    ip: str
    prefix_len: int
    gateway: str
    mac: str = ""
    aliases: list[str] = field(default_factory=list)


@dataclass
class Attachment:
    namespace: str
    container_id: str
    mode: str
    hostname: str
    netns_path: str = ""
    hosts_path: str = ""
    resolv_conf_path: str = ""
    hostname_path: str = ""
    shared_with: str = ""
    interfaces: list[Interface] = field(default_factory=list)
    ports: list[PortMapping] = field(default_factory=list)


def veth_name(state: Path, namespace: str, container_id: str, network: str) -> str:
    """A veth name unique per daemon state dir, container and network (IFNAMSIZ: 15)."""
    digest = hashlib.sha256(f"{state}\0{namespace}\0{container_id}\0{network}".encode())
    return VETH_PREFIX + digest.hexdigest()[:11]


def _default_hostname(container_id: str) -> str:
    ok = len(container_id) <= 63 and all(c.isalnum() or c == "-" for c in container_id)
    return container_id if ok else container_id[:12]


def _parse_mode(network: str) -> tuple[str, str]:
    """(mode, network name or shared container id) for an Attach `network` argument."""
    if network in DEFAULT_ALIASES:
        return "bridge", DEFAULT_NETWORK
    if network in ("host", "none"):
        return network, ""
    if network.startswith("container:"):
        target = network.split(":", 1)[1]
        if not target:
            raise InvalidArgument("network 'container:' needs a container id: container:<id>")
        return "container", target
    return "bridge", network


def _owner_alive(root: Path) -> bool:
    """Whether a runtimed holds `root` (it keeps an exclusive flock on its lock file)."""
    try:
        fd = os.open(root / "runtimed.lock", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _owners(sandboxes) -> set[tuple[str, str]]:
    """(namespace, id) of every container whose netns dir and name files are in use."""
    known = {(s["namespace"], s["container_id"]) for s in sandboxes}
    return known | {(s["namespace"], s["shared_with"]) for s in sandboxes if s["shared_with"]}


class NetworkManager:
    def __init__(self, state: Path, db: Database, namespaces, containers, exchange=None,
                 helper=None, root: Path | None = None):
        from runtimed.network.netlink import NetlinkHelper

        self.state = state
        self.root = root or Path(db.path).parent
        self.netns_dir = state / "netns"
        self.files_dir = state / "netns-files"
        self.db = db
        self.namespaces = namespaces
        self.containers = containers
        self.exchange = exchange
        self.helper = helper or NetlinkHelper(str(state / "network-helper.lock"))
        self._lock = threading.RLock()
        self._proxies: dict[tuple[str, str], list[Proxy]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        db.migrate("networks", SCHEMA)
        namespaces.register_usage(
            "network attachments", "SELECT 1 FROM net_sandboxes WHERE namespace = ? LIMIT 1"
        )

    # ---- networks ----------------------------------------------------------------------

    def _network(self, row) -> Network:
        return Network(name=row["name"], id=row["id"], driver=row["driver"],
                       subnet=row["subnet"], gateway=row["gateway"], bridge=row["bridge"],
                       labels=json.loads(row["labels"]), created_at=row["created_at"])

    def _members(self, conn, name: str) -> list[str]:
        rows = conn.execute(
            "SELECT namespace, container_id FROM net_endpoints WHERE network = ? "
            "ORDER BY namespace, container_id", (name,)
        ).fetchall()
        return [f"{r['namespace']}/{r['container_id']}" for r in rows]

    @staticmethod
    def _builtin(name: str) -> Network:
        return Network(name=name, id=name, driver="host" if name == "host" else "null")

    def get(self, name: str) -> Network:
        if name in ("host", "none"):
            return self._builtin(name)
        with self.db.read() as conn:
            network = self._lookup(conn, name)
            network.containers = self._members(conn, network.name)
        return network

    def _lookup(self, conn, name: str) -> Network:
        """A stored network by name, id or unique id prefix (without its members)."""
        name = DEFAULT_NETWORK if name in DEFAULT_ALIASES else name
        row = conn.execute(
            "SELECT * FROM net_networks WHERE name = ? OR id = ?", (name, name)
        ).fetchone()
        if row is None and len(name) >= 6:
            rows = conn.execute(
                "SELECT * FROM net_networks WHERE id LIKE ?", (name + "%",)
            ).fetchall()
            row = rows[0] if len(rows) == 1 else None
        if row is None:
            raise NotFound(f"network {name!r} not found")
        return self._network(row)

    def list(self, filters: list[str] | None = None) -> list[Network]:
        with self.db.read() as conn:
            rows = conn.execute("SELECT * FROM net_networks ORDER BY name").fetchall()
            found = [self._network(r) for r in rows]
            for n in found:
                n.containers = self._members(conn, n.name)
        found += [self._builtin("host"), self._builtin("none")]
        selector = parse(filters or [])

        def lookup_of(n: Network):
            def lookup(path: tuple[str, ...]) -> str | None:
                if path and path[0] == "labels":
                    return n.labels.get(".".join(path[1:]))
                if len(path) == 1 and path[0] in ("name", "id", "driver", "subnet", "gateway", "bridge"):
                    return getattr(n, path[0])
                return None
            return lookup

        return [n for n in found if selector.match(lookup_of(n))]

    def _taken_subnets(self) -> list[str]:
        with self.db.read() as conn:
            ours = [r[0] for r in conn.execute("SELECT subnet FROM net_networks")]
        return ours + self.helper.call("host_prefixes")

    def _free_bridge_name(self, prefix: str) -> str:
        present = {link["name"] for link in self.helper.call("links")}
        with self.db.read() as conn:
            present |= {r[0] for r in conn.execute("SELECT bridge FROM net_networks")}
        for n in range(1000):
            if f"{prefix}{n}" not in present:
                return f"{prefix}{n}"
        raise FailedPrecondition("no free bridge device name left (rtd0..rtd999 all exist)")

    def create(self, name: str, driver: str = "", subnet: str = "", gateway: str = "",
               labels: dict | None = None, _default: bool = False) -> Network:
        driver = driver or "bridge"
        if driver != "bridge":
            raise InvalidArgument(
                f"network driver {driver!r} is not supported: create 'bridge' networks "
                "('host', 'none' and 'container:<id>' are used directly by name)"
            )
        if name in RESERVED and not _default:
            raise InvalidArgument(f"network name {name!r} is reserved")
        identifiers.validate(name, "network name")
        labels = label_rules.validate(dict(labels or {}))
        with self._lock:
            with self.db.read() as conn:
                if conn.execute("SELECT 1 FROM net_networks WHERE name = ?", (name,)).fetchone():
                    raise AlreadyExists(f"network {name!r} already exists")
            for attempt in range(5):
                try:
                    return self._create(name, driver, subnet, gateway, labels, _default)
                except FailedPrecondition as exc:
                    if subnet or "taken meanwhile" not in str(exc) or attempt == 4:
                        raise

    def _create(self, name, driver, subnet, gateway, labels, _default) -> Network:
        """One try: choose subnet and device, record, bring up (exclusively)."""
        taken = self._taken_subnets()
        if subnet:
            net = ipam.parse_subnet(subnet)
            with self.db.read() as conn:
                for row in conn.execute("SELECT name, subnet FROM net_networks"):
                    if net.overlaps(ipam.parse_subnet(row["subnet"])):
                        raise FailedPrecondition(
                            f"subnet {net} overlaps network {row['name']!r} ({row['subnet']})"
                        )
            host = [ipaddress.ip_network(t, strict=False) for t in taken]
            if ipam.overlaps(net, [h for h in host if h.version == 4 and h.prefixlen]):
                raise FailedPrecondition(
                    f"subnet {net} overlaps a route or address of this host; choose another"
                )
        else:
            net = ipam.choose_subnet(taken)
        gw = ipam.parse_gateway(net, gateway)
        bridge = self._free_bridge_name("rtd") if _default else "rtd-" + secrets.token_hex(5)
        network = Network(name=name, id=secrets.token_hex(32), driver=driver,
                          subnet=str(net), gateway=str(gw), bridge=bridge, labels=labels,
                          created_at=now_ns())
        with self.db.transaction() as tx:
            tx.execute(
                "INSERT INTO net_networks (name, id, driver, subnet, gateway, bridge, labels, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (name, network.id, driver, network.subnet, network.gateway, bridge,
                 json.dumps(labels), network.created_at),
            )
        try:
            self._bridge_up(network, exclusive=True)
        except BaseException:
            with self.db.transaction() as tx:
                tx.execute("DELETE FROM net_networks WHERE name = ?", (network.name,))
            raise
        return network

    def _bridge_setup(self, network: Network) -> dict:
        """The arguments of the helper's `bridge_up` for this network."""
        prefix = network.subnet.split("/")[1]
        return dict(name=network.bridge, address=f"{network.gateway}/{prefix}",
                    subnet=network.subnet, alias=f"{ALIAS_PREFIX}{self.root}")

    def _bridge_up(self, network: Network, exclusive: bool = False) -> None:
        self.helper.call("bridge_up", exclusive=exclusive, **self._bridge_setup(network))

    def sweep_orphans(self) -> int:
        """Remove bridges another runtimed left behind: marked with its root (the device
        alias), that root no longer locked by a live runtimed, and no interface on them.
        A live runtimed's bridges are never touched."""
        removed = 0
        try:
            found = self.helper.call("links")
            used = {link["master"] for link in found if link["master"]}
            for link in found:
                alias = link.get("alias") or ""
                if (link["kind"] != "bridge" or not alias.startswith(ALIAS_PREFIX)
                        or link["name"] in used):
                    continue
                owner = Path(alias[len(ALIAS_PREFIX):])
                if owner == self.root or _owner_alive(owner):
                    continue
                self.helper.call("bridge_down", name=link["name"])
                removed += 1
            removed += self.helper.call("nat_orphans_down")
        except RuntimedError as exc:
            log.warning("cannot sweep orphaned bridges: %s", exc)
        return removed

    def _drop_network(self, network: Network) -> None:
        self.helper.call("bridge_down", name=network.bridge, subnet=network.subnet)
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM net_networks WHERE name = ?", (network.name,))

    def remove(self, name: str) -> None:
        """Refused while containers are attached. The default network may be removed when
        unused too: it comes back (same name, maybe another subnet) on first use."""
        if name in ("host", "none"):
            raise InvalidArgument(f"network {name!r} is built in and cannot be removed")
        with self._lock:
            network = self.get(name)
            if network.containers:
                raise FailedPrecondition(
                    f"network {network.name!r} has attached containers: "
                    f"{', '.join(network.containers)}; disconnect or remove them first"
                )
            self._drop_network(network)

    def _ensure_network(self, name: str) -> Network:
        """The network to attach to; the default one is made on first use. Its bridge is
        checked (and brought back if lost, as to a reboot) by the helper in the same
        request that adds the endpoint (`_endpoint_up`)."""
        try:
            with self.db.read() as conn:
                return self._lookup(conn, name)
        except NotFound:
            if name != DEFAULT_NETWORK:
                raise
            self.sweep_orphans()  # also frees names and subnets for reuse
            return self.create(DEFAULT_NETWORK, _default=True)

    # ---- attachments -------------------------------------------------------------------

    def _sandbox_row(self, conn, namespace: str, container_id: str):
        return conn.execute(
            "SELECT * FROM net_sandboxes WHERE namespace = ? AND container_id = ?",
            (namespace, container_id),
        ).fetchone()

    def paths(self, namespace: str, container_id: str) -> tuple[Path, Path]:
        return self.netns_dir / namespace / container_id, self.files_dir / namespace / container_id

    def inspect(self, namespace: str, container_id: str) -> Attachment:
        with self.db.read() as conn:
            row = self._sandbox_row(conn, namespace, container_id)
            if row is None:
                raise NotFound(
                    f"container {container_id!r} in namespace {namespace!r} has no network attachment"
                )
            return self._attachment(conn, row)

    def _attachment(self, conn, row) -> Attachment:
        namespace, container_id = row["namespace"], row["container_id"]
        files_owner = container_id
        if row["mode"] == "container":
            files_owner = row["shared_with"]
        _, fdir = self.paths(namespace, files_owner)
        att = Attachment(
            namespace=namespace, container_id=container_id, mode=row["mode"],
            hostname=row["hostname"], netns_path=row["netns"], shared_with=row["shared_with"],
            hosts_path=str(fdir / "hosts"), resolv_conf_path=str(fdir / "resolv.conf"),
            hostname_path=str(fdir / "hostname"),
            ports=[PortMapping(**p) for p in json.loads(row["ports"])],
        )
        for e in conn.execute(
            "SELECT e.*, n.subnet, n.gateway FROM net_endpoints e JOIN net_networks n "
            "ON n.name = e.network WHERE e.namespace = ? AND e.container_id = ? "
            "ORDER BY e.created_at, e.ifname", (namespace, container_id),
        ):
            att.interfaces.append(Interface(
                network=e["network"], ifname=e["ifname"], ip=e["ip"],
                prefix_len=int(e["subnet"].split("/")[1]), gateway=e["gateway"], mac=e["mac"],
                aliases=json.loads(e["aliases"]),
            ))
        return att

    def list_attachments(self, namespace: str | None = None) -> list[Attachment]:
        with self.db.read() as conn:
            if namespace is None:
                rows = conn.execute("SELECT * FROM net_sandboxes ORDER BY namespace, container_id")
            else:
                rows = conn.execute(
                    "SELECT * FROM net_sandboxes WHERE namespace = ? ORDER BY container_id",
                    (namespace,),
                )
            return [self._attachment(conn, r) for r in rows.fetchall()]

    def attach(self, namespace: str, container_id: str, network: str = "", hostname: str = "",
               aliases: list[str] | None = None, ports: list[PortMapping] | None = None,
               ip: str = "") -> Attachment:
        """Give a container its network: a new sandbox, or (for a bridge network, when it
        already has a bridge sandbox) one more interface (`network connect`)."""
        identifiers.validate(container_id, "container id")
        mode, target = _parse_mode(network)
        aliases = [a for a in (aliases or []) if a]
        ports = [p.validate() for p in (ports or [])]
        if ports and mode != "bridge":
            raise InvalidArgument(f"ports can only be published on a bridge network, not {network!r}")
        hostname = hostname or _default_hostname(container_id)
        with self._lock:
            with self.db.read() as conn:
                existing = self._sandbox_row(conn, namespace, container_id)
            if existing is not None:
                if mode != "bridge" or existing["mode"] != "bridge":
                    raise AlreadyExists(
                        f"container {container_id!r} already has a {existing['mode']} network; "
                        "detach it first"
                    )
                if ports:
                    raise InvalidArgument("ports are published when a container is first attached")
                return self._connect(namespace, container_id, target, aliases, ip)
            if mode == "host":
                return self._attach_plain(namespace, container_id, "host", hostname)
            if mode == "none":
                return self._attach_plain(namespace, container_id, "none", hostname)
            if mode == "container":
                return self._attach_shared(namespace, container_id, target)
            return self._attach_bridge(namespace, container_id, target, hostname, aliases, ports, ip)

    def _insert_sandbox(self, namespace, container_id, mode, netns, hostname, shared_with="",
                        ports=()) -> None:
        with self.db.transaction() as tx:
            self.namespaces.ensure(tx, namespace)
            tx.execute(
                "INSERT INTO net_sandboxes (namespace, container_id, mode, netns, hostname, "
                "shared_with, ports, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (namespace, container_id, mode, netns, hostname, shared_with,
                 json.dumps([asdict(p) for p in ports]), now_ns()),
            )

    def _write_files(self, namespace: str, container_id: str, hostname: str, mode: str) -> None:
        _, fdir = self.paths(namespace, container_id)
        fdir.mkdir(parents=True, exist_ok=True, mode=0o755)
        files.write_in_place(fdir / "hostname", hostname + "\n")
        if mode == "host":
            try:
                hosts = files.HOST_HOSTS.read_text(errors="replace")
            except OSError:
                hosts = files.LOCAL_ENTRIES
            files.write_in_place(fdir / "hosts", hosts)
            try:
                resolv = files.HOST_RESOLV_CONF.read_text(errors="replace")
            except OSError:
                resolv = ""
            files.write_in_place(fdir / "resolv.conf", resolv)
            return
        files.write_in_place(fdir / "resolv.conf", files.host_resolv_conf())
        self._write_hosts(namespace, container_id)

    def _write_hosts(self, namespace: str, container_id: str) -> None:
        self._rewrite_hosts([(namespace, container_id)], quiet=False)

    def _rewrite_hosts(self, members, quiet: bool = True) -> None:
        """Write the hosts file of each (namespace, id) in `members`: itself, then every
        peer on a network it is on (same namespace first, then by age), from one read of
        the tables, so refreshing n peers costs n writes, not 3n queries. `quiet`: a file
        that cannot be written is logged, not raised."""
        with self.db.read() as conn:
            sandboxes = {(r["namespace"], r["container_id"]): r for r in conn.execute(
                "SELECT namespace, container_id, mode, hostname FROM net_sandboxes")}
            endpoints = conn.execute(
                "SELECT namespace, container_id, network, ip, aliases FROM net_endpoints "
                "ORDER BY created_at, rowid").fetchall()
        entries: dict[tuple[str, str], list] = {}
        on_network: dict[str, list] = {}
        for age, e in enumerate(endpoints):
            key = (e["namespace"], e["container_id"])
            sandbox = sandboxes.get(key)
            if sandbox is None:
                continue
            item = (age, key, e["network"], files.HostEntry(
                e["ip"], [sandbox["hostname"], e["container_id"], *json.loads(e["aliases"])]))
            entries.setdefault(key, []).append(item)
            on_network.setdefault(e["network"], []).append(item)
        for key in members:
            sandbox = sandboxes.get(key)
            if sandbox is None or sandbox["mode"] in ("host", "container"):
                continue
            mine = entries.get(key, [])
            networks = {item[2] for item in mine}
            peers = sorted((item for network in networks for item in on_network[network]
                            if item[1] != key), key=lambda item: (item[1][0] != key[0], item[0]))
            _, fdir = self.paths(*key)
            try:
                if fdir.is_dir():
                    files.write_in_place(fdir / "hosts", files.render_hosts(
                        [item[3] for item in mine], [item[3] for item in peers]))
            except OSError as exc:
                if not quiet:
                    raise
                log.warning("cannot update hosts of %s/%s: %s", *key, exc)

    def _refresh_peers(self, networks: list[str], skip: tuple[str, str] | None = None) -> None:
        """Rewrite the hosts file of every container on these networks (but `skip`, whose
        file the caller has just written)."""
        if not networks:
            return
        marks = ",".join("?" * len(networks))
        with self.db.read() as conn:
            members = conn.execute(
                f"SELECT DISTINCT namespace, container_id FROM net_endpoints WHERE network IN ({marks})",
                networks,
            ).fetchall()
        self._rewrite_hosts([(m["namespace"], m["container_id"]) for m in members
                             if (m["namespace"], m["container_id"]) != skip])

    def _attach_plain(self, namespace, container_id, mode, hostname) -> Attachment:
        netns = ""
        if mode == "none":
            netns = str(self.paths(namespace, container_id)[0])
        self._insert_sandbox(namespace, container_id, mode, netns, hostname)
        try:
            if netns:
                self._netns_create(netns)
            self._write_files(namespace, container_id, hostname, mode)
        except BaseException:
            self._teardown(namespace, container_id)
            raise
        return self.inspect(namespace, container_id)

    def _netns_create(self, netns: str) -> None:
        self.helper.call("netns_create", path=netns)  # replaces a leftover of a crash

    def _attach_shared(self, namespace, container_id, target) -> Attachment:
        with self.db.read() as conn:
            other = self._sandbox_row(conn, namespace, target)
        if other is None:
            raise NotFound(
                f"container {target!r} has no network to share; attach it to a network first"
            )
        if other["mode"] == "container":
            target = other["shared_with"]
            with self.db.read() as conn:
                other = self._sandbox_row(conn, namespace, target)
        self._insert_sandbox(namespace, container_id, "container", other["netns"],
                             other["hostname"], shared_with=target)
        return self.inspect(namespace, container_id)

    def _attach_bridge(self, namespace, container_id, network_name, hostname, aliases, ports,
                       ip) -> Attachment:
        network = self._ensure_network(network_name)
        sockets = []
        try:
            for p in ports:
                sockets.append(bind(p))
        except BaseException:
            for s in sockets:
                s.close()
            raise
        netns = str(self.paths(namespace, container_id)[0])
        try:
            with self.db.transaction() as tx:  # records first, in one commit
                self._insert_sandbox(namespace, container_id, "bridge", netns, hostname,
                                     ports=ports)
                endpoint = self._allocate(tx, namespace, container_id, network, aliases, ip)
            try:
                self._endpoint_up(network, endpoint, netns, new_netns=True)
                self._write_files(namespace, container_id, hostname, "bridge")
                self._refresh_peers([network.name], skip=(namespace, container_id))
            except BaseException:
                self._teardown(namespace, container_id)
                raise
        except BaseException:
            for s in sockets:
                s.close()
            raise
        attachment = self.inspect(namespace, container_id)
        if sockets:
            target = attachment.interfaces[0].ip
            self._proxies[(namespace, container_id)] = [
                Proxy(p, s, target) for p, s in zip(ports, sockets, strict=True)
            ]
            self._serve(namespace, container_id)
        return attachment

    def _connect(self, namespace, container_id, network_name, aliases, ip) -> Attachment:
        network = self._ensure_network(network_name)
        with self.db.transaction() as tx:
            row = self._sandbox_row(tx, namespace, container_id)
            if tx.execute(
                "SELECT 1 FROM net_endpoints WHERE namespace = ? AND container_id = ? AND network = ?",
                (namespace, container_id, network.name),
            ).fetchone():
                raise AlreadyExists(f"container {container_id!r} is already on network {network.name!r}")
            endpoint = self._allocate(tx, namespace, container_id, network, aliases, ip)
        try:
            self._endpoint_up(network, endpoint, row["netns"], new_netns=False)
        except BaseException:
            self._drop_endpoint(namespace, container_id, network.name, endpoint["host_if"])
            raise
        self._refresh_peers([network.name])
        return self.inspect(namespace, container_id)

    def _allocate(self, tx, namespace, container_id, network: Network, aliases, ip) -> dict:
        """Record an endpoint (in the caller's transaction): the address after the
        network's last allocation, the next free ethN, and a MAC made from the address
        (02:42 + the four bytes, as Docker does), so it is known before the interface
        exists and a rebuilt interface keeps it. Returns the helper's `endpoint_add`
        arguments."""
        host_if = veth_name(self.state, namespace, container_id, network.name)
        subnet = ipam.parse_subnet(network.subnet)
        gateway = ipam.parse_gateway(subnet, network.gateway)
        used = [r[0] for r in tx.execute(
            "SELECT ip FROM net_endpoints WHERE network = ?", (network.name,))]
        ifnames = {r[0] for r in tx.execute(
            "SELECT ifname FROM net_endpoints WHERE namespace = ? AND container_id = ?",
            (namespace, container_id))}
        last = tx.execute("SELECT last_ip FROM net_networks WHERE name = ?",
                          (network.name,)).fetchone()[0]
        if ip:
            address = ipam.check_requested(subnet, gateway, ip, used)
        else:
            address = ipam.allocate(subnet, gateway, used, after=last or None)
        ifname = next(f"eth{n}" for n in range(len(ifnames) + 1) if f"eth{n}" not in ifnames)
        mac = "02:42:" + ":".join(f"{b:02x}" for b in address.packed)
        tx.execute(
            "INSERT INTO net_endpoints (namespace, container_id, network, ip, ifname, host_if, "
            "mac, aliases, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (namespace, container_id, network.name, str(address), ifname, host_if, mac,
             json.dumps(aliases), now_ns()),
        )
        tx.execute("UPDATE net_networks SET last_ip = ? WHERE name = ?",
                   (str(address), network.name))
        return dict(host_if=host_if, ifname=ifname, address=f"{address}/{subnet.prefixlen}",
                    gateway=str(gateway), default_route=not ifnames, mac=mac)

    def _endpoint_up(self, network: Network, endpoint: dict, netns: str, new_netns: bool) -> None:
        """The kernel side of a recorded endpoint, in one helper request: the bridge
        checked (brought back if lost), the netns made if `new_netns`, the veth pair,
        address and route."""
        self.helper.call("endpoint_add", netns=netns, bridge=network.bridge,
                         new_netns=new_netns, bridge_setup=self._bridge_setup(network),
                         **endpoint)

    def _drop_endpoint(self, namespace, container_id, network, host_if) -> None:
        self.helper.call("endpoint_del", host_if=host_if)
        with self.db.transaction() as tx:
            tx.execute(
                "DELETE FROM net_endpoints WHERE namespace = ? AND container_id = ? AND network = ?",
                (namespace, container_id, network),
            )

    def detach(self, namespace: str, container_id: str, network: str = "") -> None:
        """Remove one network's interface (`network disconnect`), or with no network,
        everything the container's attachment added: interfaces, netns, files, ports."""
        with self._lock:
            att = self.inspect(namespace, container_id)
            if network:
                name = DEFAULT_NETWORK if network in DEFAULT_ALIASES else network
                mine = [i for i in att.interfaces if i.network == name]
                if not mine:
                    raise NotFound(f"container {container_id!r} is not on network {network!r}")
                if len(att.interfaces) > 1:
                    self._drop_endpoint(namespace, container_id, name,
                                        veth_name(self.state, namespace, container_id, name))
                    self._write_hosts(namespace, container_id)
                    self._refresh_peers([name])
                    return
            self._teardown(namespace, container_id)

    def _teardown(self, namespace: str, container_id: str) -> None:
        """Best effort through every step, so one failure does not strand the rest; the
        records go last, so what is left is retried by the next detach or start. The
        netns and name files go with the last of their owner and its `container:` sharers."""
        self._stop_proxies(namespace, container_id)
        with self.db.read() as conn:
            row = self._sandbox_row(conn, namespace, container_id)
            if row is None:
                return
            owner = row["shared_with"] if row["mode"] == "container" else container_id
            endpoints = conn.execute(
                "SELECT network, host_if FROM net_endpoints WHERE namespace = ? AND container_id = ?",
                (namespace, container_id),
            ).fetchall()
            others = conn.execute(
                "SELECT 1 FROM net_sandboxes WHERE namespace = ? AND container_id != ? "
                "AND (container_id = ? OR shared_with = ?) LIMIT 1",
                (namespace, container_id, owner, owner),
            ).fetchone()
        netns_path, fdir = self.paths(namespace, owner)
        drop_netns = not others and row["mode"] != "host" and os.path.lexists(netns_path)
        if endpoints or drop_netns:
            try:  # one helper request; it goes through every step before it fails
                self.helper.call("sandbox_del", host_ifs=[e["host_if"] for e in endpoints],
                                 netns=str(netns_path) if drop_netns else "")
            except RuntimedError as exc:
                raise FailedPrecondition(
                    f"network teardown of {namespace}/{container_id} incomplete: {exc}"
                ) from None
        if not others:
            shutil.rmtree(fdir, ignore_errors=True)
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM net_endpoints WHERE namespace = ? AND container_id = ?",
                       (namespace, container_id))
            tx.execute("DELETE FROM net_sandboxes WHERE namespace = ? AND container_id = ?",
                       (namespace, container_id))
        self._refresh_peers([e["network"] for e in endpoints])

    # ---- published ports ---------------------------------------------------------------

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def _serve(self, namespace: str, container_id: str) -> None:
        proxies = self._proxies.get((namespace, container_id), [])
        if self._loop is None:
            return
        for proxy in proxies:
            asyncio.run_coroutine_threadsafe(proxy.serve(), self._loop).result(10)

    def _stop_proxies(self, namespace: str, container_id: str) -> None:
        proxies = self._proxies.pop((namespace, container_id), [])
        for proxy in proxies:
            if self._loop is not None and self._loop.is_running():
                asyncio.run_coroutine_threadsafe(proxy.close(), self._loop).result(10)
            else:
                proxy.sock.close()

    # ---- crash repair ------------------------------------------------------------------

    def reconcile(self) -> dict[str, int]:
        """At start: drop attachments of containers that no longer exist, recreate what
        a surviving container's attachment lost, remove unrecorded veths, netns files and
        file dirs, and listen again on published ports. Does nothing (and never starts
        the helper) when no network was ever used."""
        done = {"removed": 0, "repaired": 0, "leftovers": 0}
        with self.db.read() as conn:
            sandboxes = conn.execute("SELECT * FROM net_sandboxes").fetchall()
            networks = [self._network(r) for r in conn.execute("SELECT * FROM net_networks")]
        stray_dirs = self._stray_paths(_owners(sandboxes))
        if not sandboxes and not networks and not stray_dirs:
            return done
        with self._lock:
            self.sweep_orphans()
            for s in sandboxes:
                ns, cid = s["namespace"], s["container_id"]
                if not self._container_exists(ns, cid):
                    try:
                        self._teardown(ns, cid)
                        done["removed"] += 1
                    except RuntimedError as exc:
                        log.warning("cannot remove the network of %s/%s: %s", ns, cid, exc)
            for network in networks:
                with self.db.read() as conn:
                    used = conn.execute("SELECT 1 FROM net_endpoints WHERE network = ? LIMIT 1",
                                        (network.name,)).fetchone()
                if used:
                    self._bridge_up(network)
            with self.db.read() as conn:
                survivors = conn.execute("SELECT * FROM net_sandboxes").fetchall()
                known_ifs = {r[0] for r in conn.execute("SELECT host_if FROM net_endpoints")}
            present = {link["name"] for link in self.helper.call("links")} if survivors else set()
            for s in survivors:
                done["repaired"] += self._repair(s, present)
            # a crash between a record and the peers' rewrite
            self._rewrite_hosts([(s["namespace"], s["container_id"]) for s in survivors])
            bridges = {n.bridge for n in networks}
            for link in self.helper.call("links"):
                name = link["name"]
                if (name.startswith(VETH_PREFIX) and link["master"] in bridges
                        and name not in known_ifs):
                    self.helper.call("endpoint_del", host_if=name)
                    done["leftovers"] += 1
            for path, is_netns in self._stray_paths(_owners(survivors)):
                if is_netns:
                    self.helper.call("netns_delete", path=str(path))
                else:
                    shutil.rmtree(path, ignore_errors=True)
                done["leftovers"] += 1
            for s in survivors:
                self._relisten(s)
        log.info("network reconcile: %s", done)
        return done

    def _container_exists(self, namespace: str, container_id: str) -> bool:
        try:
            self.containers.get(namespace, container_id)
            return True
        except NotFound:
            return False

    def _stray_paths(self, known: set[tuple[str, str]]) -> list[tuple[Path, bool]]:
        found = []
        for base, is_netns in ((self.netns_dir, True), (self.files_dir, False)):
            if not base.is_dir():
                continue
            for ns_dir in base.iterdir():
                for entry in ns_dir.iterdir():
                    if (ns_dir.name, entry.name) not in known:
                        found.append((entry, is_netns))
        return found

    def _repair(self, s, present: set[str]) -> int:
        """Recreate the netns and interfaces of a surviving container when they are gone
        (a reboot empties the state dir), with the addresses it was given."""
        if s["mode"] not in ("bridge", "none"):
            return 0
        netns = s["netns"]
        repaired = 0
        if not os.path.ismount(netns):
            self._netns_create(netns)
            repaired = 1
        with self.db.read() as conn:
            endpoints = conn.execute(
                "SELECT e.*, n.bridge, n.subnet, n.gateway FROM net_endpoints e JOIN net_networks n "
                "ON n.name = e.network WHERE e.namespace = ? AND e.container_id = ? ORDER BY e.created_at",
                (s["namespace"], s["container_id"]),
            ).fetchall()
        for e in endpoints:
            prefix = e["subnet"].split("/")[1]
            args = dict(netns=netns, bridge=e["bridge"], host_if=e["host_if"], ifname=e["ifname"],
                        address=f"{e['ip']}/{prefix}", gateway=e["gateway"],
                        default_route=e["ifname"] == "eth0")  # as _allocate decided
            if e["host_if"] in present and not repaired and self.helper.call("endpoint_ok", **args):
                continue
            # replaces a pair a crash left half made; keeps the recorded MAC
            self.helper.call("endpoint_add", mac=e["mac"], **args)
            repaired = 1
        _, fdir = self.paths(s["namespace"], s["container_id"])
        if not (fdir / "hosts").exists():
            self._write_files(s["namespace"], s["container_id"], s["hostname"], s["mode"])
        return repaired

    def _relisten(self, s) -> None:
        ports = [PortMapping(**p) for p in json.loads(s["ports"])]
        if not ports:
            return
        key = (s["namespace"], s["container_id"])
        att = self.inspect(*key)
        if not att.interfaces:
            return
        proxies = []
        for p in ports:
            try:
                proxies.append(Proxy(p, bind(p), att.interfaces[0].ip))
            except RuntimedError as exc:
                log.warning("cannot publish %s for %s/%s again: %s", p, *key, exc)
        self._proxies[key] = proxies
        self._serve(*key)

    async def start(self) -> None:
        """Start hook: bind the event loop for proxies, reconcile, and follow container
        deletions so an attachment goes with its container whatever client removed it."""
        self.bind_loop(asyncio.get_running_loop())
        await asyncio.to_thread(self.reconcile)
        if self.exchange is not None:
            self._follower = asyncio.ensure_future(self._follow_deletions())

    async def _follow_deletions(self) -> None:
        sub = self.exchange.subscribe(['topic=="/containers/delete"'])
        try:
            async for event in sub:
                message = event.decoded()
                if message is not None:
                    await self.on_container_deleted(event.namespace, message.id)
        except RuntimedError as exc:  # fell behind: the next start reconciles
            log.warning("stopped following container deletions: %s", exc)
        finally:
            self.exchange.unsubscribe(sub)

    def _attached(self, namespace: str, container_id: str) -> bool:
        with self.db.read() as conn:
            return self._sandbox_row(conn, namespace, container_id) is not None

    async def on_container_deleted(self, namespace: str, container_id: str) -> None:
        # most deleted containers have no attachment (API clients, ctr): a point read on
        # the loop, no hop to a worker thread
        if not await self.db.run(self._attached, namespace, container_id):
            return
        try:
            await asyncio.to_thread(self.detach, namespace, container_id)
        except NotFound:
            pass
        except RuntimedError as exc:
            log.warning("cannot remove the network of deleted container %s/%s: %s",
                        namespace, container_id, exc)

    def close(self) -> None:
        """At daemon stop: close published ports and remove the bridges no container
        uses (their records stay; the next attach brings them back), so a stopped
        runtimed leaves no idle device or NAT rule on the host."""
        for key in list(self._proxies):
            for proxy in self._proxies.pop(key):
                proxy.sock.close()
        try:
            with self._lock, self.db.read() as conn:
                idle = [self._network(r) for r in conn.execute(
                    "SELECT * FROM net_networks WHERE name NOT IN (SELECT network FROM net_endpoints)")]
            if idle and self.helper.started:
                for network in idle:
                    self.helper.call("bridge_down", name=network.bridge, subnet=network.subnet)
        except RuntimedError as exc:
            log.warning("cannot remove idle bridges: %s", exc)
        finally:
            self.helper.close()

