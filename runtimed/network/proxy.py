"""Published ports: a userland proxy in runtimed (TCP and UDP).

Chosen over iptables DNAT because it needs no host-global rules (nothing to leak or
reconcile after a crash: the sockets die with the process), it answers on 127.0.0.1
without `route_localnet`, and it works the same whatever firewall the host runs. The cost:
bytes pass through runtimed, sources appear as the gateway, and published ports are down
while runtimed is; on start, runtimed listens again for every persisted attachment.

Sockets are bound synchronously (`bind`), so a port conflict fails the attach at once;
serving (`serve`) then runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass

from runtimed.errors import FailedPrecondition, InvalidArgument

UDP_IDLE_SECONDS = 60.0
BUFFER = 65536


@dataclass
class PortMapping:
    host_port: int
    container_port: int
    protocol: str = "tcp"
    host_ip: str = ""

    def validate(self) -> PortMapping:
        if self.protocol not in ("tcp", "udp"):
            raise InvalidArgument(f"port protocol {self.protocol!r}: use tcp or udp")
        if not 0 < self.container_port < 65536 or not 0 <= self.host_port < 65536:
            raise InvalidArgument(
                f"invalid port mapping {self.host_port}:{self.container_port}: ports are 1-65535"
            )
        if self.host_ip:
            try:
                socket.inet_pton(socket.AF_INET, self.host_ip)
            except OSError:
                raise InvalidArgument(f"host IP {self.host_ip!r} is not an IPv4 address") from None
        return self

    def __str__(self) -> str:
        return f"{self.host_ip or '0.0.0.0'}:{self.host_port}->{self.container_port}/{self.protocol}"


def bind(mapping: PortMapping) -> socket.socket:
    kind = socket.SOCK_STREAM if mapping.protocol == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(socket.AF_INET, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((mapping.host_ip or "0.0.0.0", mapping.host_port))
        if kind == socket.SOCK_STREAM:
            sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise FailedPrecondition(
            f"cannot publish {mapping}: {exc.strerror or exc} (is the port already in use?)"
        ) from None
    mapping.host_port = sock.getsockname()[1]
    return sock


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(BUFFER):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


class _UdpClient(asyncio.DatagramProtocol):
    """One upstream socket per client address, so replies find their way back."""

    def __init__(self, front: asyncio.DatagramTransport, client: tuple):
        self.front = front
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None
        self.last = asyncio.get_running_loop().time()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.last = asyncio.get_running_loop().time()
        self.front.sendto(data, self.client)


class _UdpFront(asyncio.DatagramProtocol):
    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.transport: asyncio.DatagramTransport | None = None
        self.clients: dict[tuple, _UdpClient] = {}
        self.pending: dict[tuple, list[bytes]] = {}

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        client = self.clients.get(addr)
        if client is not None and client.transport is not None:
            client.last = asyncio.get_running_loop().time()
            client.transport.sendto(data)
        elif addr in self.pending:
            self.pending[addr].append(data)
        else:
            self.pending[addr] = [data]
            asyncio.ensure_future(self._connect(addr))

    async def _connect(self, addr) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, client = await loop.create_datagram_endpoint(
                lambda: _UdpClient(self.transport, addr), remote_addr=self.target
            )
        except OSError:
            self.pending.pop(addr, None)
            return
        self.clients[addr] = client
        for data in self.pending.pop(addr, []):
            client.transport.sendto(data)

    def expire(self, now: float) -> None:
        for addr, client in list(self.clients.items()):
            if now - client.last > UDP_IDLE_SECONDS:
                client.transport.close()
                del self.clients[addr]

    def close(self) -> None:
        for client in self.clients.values():
            client.transport.close()
        self.clients.clear()
        if self.transport is not None:
            self.transport.close()


class Proxy:
    """Forwards one bound socket to `target_ip:container_port`."""

    def __init__(self, mapping: PortMapping, sock: socket.socket, target_ip: str):
        self.mapping = mapping
        self.sock = sock
        self.target = (target_ip, mapping.container_port)
        self._server: asyncio.base_events.Server | None = None
        self._udp: _UdpFront | None = None
        self._tasks: set[asyncio.Task] = set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        if self.mapping.protocol == "tcp":
            self._server = await asyncio.start_server(self._tcp, sock=self.sock)
        else:
            _, self._udp = await loop.create_datagram_endpoint(
                lambda: _UdpFront(self.target), sock=self.sock
            )
            self._tasks.add(asyncio.ensure_future(self._expire()))

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(UDP_IDLE_SECONDS / 4)
            self._udp.expire(asyncio.get_running_loop().time())

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(*self.target), 10
                )
            except (TimeoutError, OSError):
                return
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                up_writer.close()
        finally:
            writer.close()
            self._tasks.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._udp is not None:
            self._udp.close()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        with contextlib.suppress(OSError):
            self.sock.close()
