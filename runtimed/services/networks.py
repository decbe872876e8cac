"""runtimed.networks.v1.Networks over `daemon.networks` (an extension of ours)."""

from __future__ import annotations

import asyncio

from runtimed.api.networks.v1 import networks_pb2 as pb
from runtimed.api.networks.v1 import networks_pb2_grpc
from runtimed.network.proxy import PortMapping
from runtimed.services.base import namespace, service


def network_to_proto(n) -> pb.Network:
    message = pb.Network(name=n.name, id=n.id, driver=n.driver, subnet=n.subnet,
                         gateway=n.gateway, bridge=n.bridge, labels=n.labels,
                         containers=n.containers)
    if n.created_at:
        message.created_at.FromNanoseconds(n.created_at)
    return message


def port_to_proto(p: PortMapping) -> pb.PortMapping:
    return pb.PortMapping(host_ip=p.host_ip, host_port=p.host_port,
                          container_port=p.container_port, protocol=p.protocol)


def attachment_to_proto(a) -> pb.Attachment:
    return pb.Attachment(
        container_id=a.container_id, mode=a.mode, hostname=a.hostname, netns_path=a.netns_path,
        hosts_path=a.hosts_path, resolv_conf_path=a.resolv_conf_path,
        hostname_path=a.hostname_path, shared_with=a.shared_with,
        interfaces=[pb.Interface(network=i.network, ifname=i.ifname, ip=i.ip,
                                 prefix_len=i.prefix_len, gateway=i.gateway, mac=i.mac,
                                 aliases=i.aliases) for i in a.interfaces],
        ports=[port_to_proto(p) for p in a.ports],
    )


@service
class NetworksService(networks_pb2_grpc.NetworksServicer):
    def __init__(self, networks):
        self.networks = networks

    async def Create(self, request, context):
        network = await asyncio.to_thread(
            self.networks.create, request.name, request.driver, request.subnet,
            request.gateway, dict(request.labels),
        )
        return pb.CreateNetworkResponse(network=network_to_proto(network))

    async def Get(self, request, context):
        network = await asyncio.to_thread(self.networks.get, request.name)
        return pb.GetNetworkResponse(network=network_to_proto(network))

    async def List(self, request, context):
        found = await asyncio.to_thread(self.networks.list, list(request.filters))
        return pb.ListNetworksResponse(networks=[network_to_proto(n) for n in found])

    async def Remove(self, request, context):
        await asyncio.to_thread(self.networks.remove, request.name)
        return pb.RemoveNetworkResponse()

    async def Attach(self, request, context):
        ports = [PortMapping(host_port=p.host_port, container_port=p.container_port,
                             protocol=p.protocol or "tcp", host_ip=p.host_ip)
                 for p in request.ports]
        attachment = await asyncio.to_thread(
            self.networks.attach, namespace(context), request.container_id, request.network,
            request.hostname, list(request.aliases), ports, request.ip,
        )
        return pb.AttachResponse(attachment=attachment_to_proto(attachment))

    async def Detach(self, request, context):
        await asyncio.to_thread(
            self.networks.detach, namespace(context), request.container_id, request.network
        )
        return pb.DetachResponse()

    async def Inspect(self, request, context):
        attachment = await asyncio.to_thread(
            self.networks.inspect, namespace(context), request.container_id
        )
        return pb.InspectAttachmentResponse(attachment=attachment_to_proto(attachment))

    async def ListAttachments(self, request, context):
        found = await asyncio.to_thread(self.networks.list_attachments, namespace(context))
        return pb.ListAttachmentsResponse(attachments=[attachment_to_proto(a) for a in found])


def register(server, daemon) -> None:
    networks_pb2_grpc.add_NetworksServicer_to_server(NetworksService(daemon.networks), server)
