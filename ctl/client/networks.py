"""Container networks through runtimed's `runtimed.networks.v1.Networks` extension service.

    from ctl.client import networks
    att = networks.attach(client, "web", "appnet", ports=[networks.parse_publish("8080:80")])
    networks.apply_to_spec(att, spec_options)   # netns path + /etc/hosts, resolv.conf, hostname

The daemon owns each container's network namespace; a client attaches before it creates
the container, puts the returned namespace path into the OCI spec and bind-mounts the
returned files. Deleting the container (any client) detaches it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from runtimed.errors import InvalidArgument

MODULE = "runtimed.api.networks.v1.networks"


@dataclass
class Port:
    """A published port: host address and port to the container's port."""

    container_port: int
    host_port: int = 0
    host_ip: str = ""
    protocol: str = "tcp"

    def __str__(self) -> str:
        return f"{self.host_ip or '0.0.0.0'}:{self.host_port}->{self.container_port}/{self.protocol}"


@dataclass
class Network:
    """A bridge network and the containers attached to it."""

    name: str
    id: str
    driver: str
    subnet: str = ""
    gateway: str = ""
    bridge: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    containers: list[str] = field(default_factory=list)


@dataclass
class Interface:
    """A container's interface on one network."""

    network: str
    ifname: str
    ip: str
    prefix_len: int
    gateway: str
    mac: str = ""
    aliases: list[str] = field(default_factory=list)


@dataclass
class Attachment:
    """Where a container's network lives: its netns, name files, interfaces, ports."""

    container_id: str
    mode: str
    hostname: str
    netns_path: str = ""
    hosts_path: str = ""
    resolv_conf_path: str = ""
    hostname_path: str = ""
    shared_with: str = ""
    interfaces: list[Interface] = field(default_factory=list)
    ports: list[Port] = field(default_factory=list)


def parse_publish(text: str) -> Port:
    """docker's `-p [hostip:]hostport:containerport[/udp]` (or `containerport` alone:
    a free host port)."""
    spec, _, protocol = text.partition("/")
    protocol = protocol or "tcp"
    parts = spec.rsplit(":", 2)
    try:
        if len(parts) == 1:
            host_ip, host_port, container_port = "", 0, int(parts[0])
        elif len(parts) == 2:
            host_ip, host_port, container_port = "", int(parts[0] or 0), int(parts[1])
        else:
            host_ip, host_port, container_port = parts[0].strip("[]"), int(parts[1] or 0), int(parts[2])
    except ValueError:
        raise InvalidArgument(
            f"invalid port mapping {text!r}: use [HOSTIP:]HOSTPORT:CONTAINERPORT[/udp]"
        ) from None
    if host_ip:
        import ipaddress

        try:
            ipaddress.ip_address(host_ip)
        except ValueError:
            raise InvalidArgument(f"invalid host IP {host_ip!r} in port mapping {text!r}") from None
    if protocol not in ("tcp", "udp"):
        raise InvalidArgument(f"invalid protocol in {text!r}: tcp or udp")
    return Port(container_port=container_port, host_port=host_port, host_ip=host_ip,
                protocol=protocol)


def _stub(client):
    return client.service(MODULE, "Networks")


def _network(n) -> Network:
    created = None
    if n.HasField("created_at"):
        created = datetime.fromtimestamp(n.created_at.ToNanoseconds() / 1e9, UTC)
    return Network(name=n.name, id=n.id, driver=n.driver, subnet=n.subnet, gateway=n.gateway,
                   bridge=n.bridge, labels=dict(n.labels), created_at=created,
                   containers=list(n.containers))


def _attachment(a) -> Attachment:
    return Attachment(
        container_id=a.container_id, mode=a.mode, hostname=a.hostname, netns_path=a.netns_path,
        hosts_path=a.hosts_path, resolv_conf_path=a.resolv_conf_path,
        hostname_path=a.hostname_path, shared_with=a.shared_with,
        interfaces=[Interface(network=i.network, ifname=i.ifname, ip=i.ip,
                              prefix_len=i.prefix_len, gateway=i.gateway, mac=i.mac,
                              aliases=list(i.aliases)) for i in a.interfaces],
        ports=[Port(container_port=p.container_port, host_port=p.host_port, host_ip=p.host_ip,
                    protocol=p.protocol) for p in a.ports],
    )


def create(client, name: str, *, subnet: str = "", gateway: str = "", driver: str = "bridge",
           labels: dict[str, str] | None = None) -> Network:
    stub = _stub(client)
    response = stub.Create(stub.pb.CreateNetworkRequest(
        name=name, driver=driver, subnet=subnet, gateway=gateway, labels=labels or {}))
    return _network(response.network)


def get(client, name: str) -> Network:
    stub = _stub(client)
    return _network(stub.Get(stub.pb.GetNetworkRequest(name=name)).network)


def list_networks(client, filters: list[str] | None = None) -> list[Network]:
    stub = _stub(client)
    response = stub.List(stub.pb.ListNetworksRequest(filters=filters or []))
    return [_network(n) for n in response.networks]


def remove(client, name: str) -> None:
    stub = _stub(client)
    stub.Remove(stub.pb.RemoveNetworkRequest(name=name))


def attach(client, container_id: str, network: str = "", *, hostname: str = "",
           aliases: list[str] | None = None, ports: list[Port] | None = None,
           ip: str = "") -> Attachment:
    return start_attach(client, container_id, network, hostname=hostname, aliases=aliases,
                        ports=ports, ip=ip).result()


def start_attach(client, container_id: str, network: str = "", *, hostname: str = "",
                 aliases: list[str] | None = None, ports: list[Port] | None = None,
                 ip: str = ""):
    """`attach`, with the request sent now: `.result()` is the Attachment. The daemon sets
    the network up while the caller does something else (`ctl run` looks up the image)."""
    stub = _stub(client)
    pb = stub.pb
    request = pb.AttachRequest(
        container_id=container_id, network=network, hostname=hostname or "",
        aliases=aliases or [], ip=ip,
        ports=[pb.PortMapping(host_ip=p.host_ip, host_port=p.host_port,
                              container_port=p.container_port, protocol=p.protocol)
               for p in ports or []],
    )
    return stub.Attach.start(request).then(lambda response: _attachment(response.attachment))


def detach(client, container_id: str, network: str = "") -> None:
    stub = _stub(client)
    stub.Detach(stub.pb.DetachRequest(container_id=container_id, network=network))


def inspect(client, container_id: str) -> Attachment:
    stub = _stub(client)
    return _attachment(stub.Inspect(stub.pb.InspectAttachmentRequest(container_id=container_id)).attachment)


def list_attachments(client) -> list[Attachment]:
    stub = _stub(client)
    return [_attachment(a) for a in stub.ListAttachments(stub.pb.ListAttachmentsRequest()).attachments]


def apply_to_spec(attachment: Attachment, opts) -> None:
    """Join the attachment's netns and mount its name files (a `SpecOptions`)."""
    from runtimed.oci.spec import Mount

    if not attachment.netns_path and attachment.mode in ("host", "container"):
        opts.network = "host"  # host mode, or sharing with a host-mode container
        return
    opts.network = attachment.netns_path
    opts.hostname = attachment.hostname
    taken = {m.destination for m in opts.mounts}
    for destination, source in (("/etc/hosts", attachment.hosts_path),
                                ("/etc/resolv.conf", attachment.resolv_conf_path),
                                ("/etc/hostname", attachment.hostname_path)):
        if destination not in taken:
            opts.mounts.append(Mount(destination=destination, source=source))
