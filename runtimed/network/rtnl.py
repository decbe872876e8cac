"""The rtnetlink requests the network helper makes, on a raw NETLINK_ROUTE socket.

pyroute2 spends ~1 ms of Python per request and ~300 ms and ~20 MB to import; and an
endpoint made the obvious way (veth in the host, move, rename, up, master, address,
route, with a lookup before most steps) takes ~16 requests. Here an endpoint is one
RTM_NEWLINK that creates the pair with the host end up on its bridge and the peer made
directly inside the container's netns under its final name (no move, no rename, no
RCU-synchronized namespace change), then, inside, a lookup, up, the address and the
default route: a few hundred bytes per request, packed with `struct`. Bridges and the
listings of links, addresses and routes are here too.

Errors come back as OSError with the kernel's errno.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

NETLINK_ROUTE = 0
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_GETADDR, RTM_NEWROUTE, RTM_GETROUTE = 20, 22, 24, 26
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x300, 0x200, 0x400

IFLA_ADDRESS, IFLA_IFNAME, IFLA_MASTER, IFLA_LINKINFO, IFLA_IFALIAS = 1, 3, 10, 18, 20
IFLA_NET_NS_FD = 28
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
NLA_F_NESTED = 0x8000
IFF_UP = 0x1
LOOPBACK_INDEX = 1  # lo is ifindex 1 in every network namespace

RT_TABLE_MAIN, RT_TABLE_LOCAL = 254, 255
RTPROT_STATIC, RT_SCOPE_UNIVERSE, RTN_UNICAST = 4, 0, 1

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTATTR = struct.Struct("=HH")


def _attr(kind: int, payload: bytes) -> bytes:
    data = _RTATTR.pack(_RTATTR.size + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def _name(text: str) -> bytes:
    return text.encode() + b"\0"


def _ifinfo(index: int = 0, up: bool = False) -> bytes:
    return _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, IFF_UP if up else 0, IFF_UP if up else 0)


def _attrs(data: bytes) -> dict[int, bytes]:
    found = {}
    offset = 0
    while offset + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size:
            break
        found[kind & ~NLA_F_NESTED] = data[offset + _RTATTR.size:offset + length]
        offset += (length + 3) & ~3
    return found


def mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


def _text(data: bytes | None) -> str:
    return data.split(b"\0", 1)[0].decode(errors="replace") if data else ""


def _u32(data: bytes | None) -> int:
    return struct.unpack_from("=I", data)[0] if data else 0


def _ip(data: bytes | None) -> str:
    return socket.inet_ntoa(data[:4]) if data and len(data) >= 4 else ""


class Link:
    def __init__(self, payload: bytes):
        _, _, self.index, flags, _ = _IFINFOMSG.unpack_from(payload)
        attrs = _attrs(payload[_IFINFOMSG.size:])
        self.up = bool(flags & IFF_UP)
        self.name = _text(attrs.get(IFLA_IFNAME))
        self.master = _u32(attrs.get(IFLA_MASTER))
        self.mac = ":".join(f"{b:02x}" for b in attrs.get(IFLA_ADDRESS, b""))
        self.alias = _text(attrs.get(IFLA_IFALIAS))
        info = _attrs(attrs.get(IFLA_LINKINFO, b""))
        self.kind = _text(info.get(IFLA_INFO_KIND)) or None


class Address:
    def __init__(self, payload: bytes):
        _, self.prefix_len, _, _, self.index = _IFADDRMSG.unpack_from(payload)
        self.address = _ip(_attrs(payload[_IFADDRMSG.size:]).get(IFA_ADDRESS))


class Route:
    def __init__(self, payload: bytes):
        _, self.dst_len, _, _, table, _, _, _, _ = _RTMSG.unpack_from(payload)
        attrs = _attrs(payload[_RTMSG.size:])
        self.table = _u32(attrs.get(RTA_TABLE)) or table
        self.dst = _ip(attrs.get(RTA_DST))
        self.oif = _u32(attrs.get(RTA_OIF))
        self.gateway = _ip(attrs.get(RTA_GATEWAY))


class Rtnl:
    """One NETLINK_ROUTE socket, bound in the network namespace of the thread that made it
    (and staying there whatever that thread does next)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, kind: int, flags: int, body: bytes) -> list[tuple[int, bytes]]:
        """Send one request; the replies before the kernel's acknowledgement (or, for a
        dump, its end)."""
        self.seq += 1
        seq = self.seq
        if flags & NLM_F_DUMP != NLM_F_DUMP:
            flags |= NLM_F_ACK
        self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind,
                                      NLM_F_REQUEST | flags, seq, 0) + body)
        replies = []
        while True:
            data = self.sock.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, mtype, _, mseq, _ = _NLMSGHDR.unpack_from(data, offset)
                payload = data[offset + _NLMSGHDR.size:offset + length]
                offset += (length + 3) & ~3
                if mseq != seq:
                    continue
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise OSError(code, os.strerror(code))
                    return replies
                if mtype == NLMSG_DONE:
                    return replies
                replies.append((mtype, payload))

    def link(self, name: str) -> Link | None:
        try:
            replies = self._request(RTM_GETLINK, 0, _ifinfo() + _attr(IFLA_IFNAME, _name(name)))
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise
        for mtype, payload in replies:
            if mtype == RTM_NEWLINK:
                return Link(payload)
        return None

    def links(self) -> list[Link]:
        return [Link(p) for t, p in self._request(RTM_GETLINK, NLM_F_DUMP, _ifinfo())
                if t == RTM_NEWLINK]

    def addrs(self, index: int = 0) -> list[Address]:
        """IPv4 addresses (of link `index`, if given)."""
        body = _IFADDRMSG.pack(socket.AF_INET, 0, 0, 0, 0)
        found = [Address(p) for t, p in self._request(RTM_GETADDR, NLM_F_DUMP, body)
                 if t == RTM_NEWADDR]
        return [a for a in found if not index or a.index == index]

    def routes(self, table: int = RT_TABLE_MAIN) -> list[Route]:
        """IPv4 routes of `table`."""
        body = _RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
        found = [Route(p) for t, p in self._request(RTM_GETROUTE, NLM_F_DUMP, body)
                 if t == RTM_NEWROUTE]
        return [r for r in found if r.table == table]

    def bridge_add(self, name: str) -> None:
        info = _attr(IFLA_INFO_KIND, b"bridge")
        body = (_ifinfo() + _attr(IFLA_IFNAME, _name(name))
                + _attr(IFLA_LINKINFO | NLA_F_NESTED, info))
        self._request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)

    def set_alias(self, index: int, alias: str) -> None:
        self._request(RTM_NEWLINK, 0, _ifinfo(index) + _attr(IFLA_IFALIAS, alias.encode()))

    def set_up(self, index: int) -> None:
        self._request(RTM_NEWLINK, 0, _ifinfo(index, up=True))

    def veth_add(self, name: str, master: int, peer: str, peer_netns_fd: int,
                 peer_mac: str = "") -> None:
        """The pair in one request: `name` up on bridge `master` here, `peer` in the netns
        of `peer_netns_fd` (with `peer_mac`, if given). The peer is brought up from inside
        (`set_up`): asked at creation, the kernel opens it before the pair is linked and
        fails with ENOTCONN."""
        peer_attrs = _attr(IFLA_IFNAME, _name(peer)) + _attr(IFLA_NET_NS_FD,
                                                             struct.pack("=I", peer_netns_fd))
        if peer_mac:
            peer_attrs += _attr(IFLA_ADDRESS, mac_bytes(peer_mac))
        info = _attr(IFLA_INFO_KIND, b"veth") + _attr(
            IFLA_INFO_DATA | NLA_F_NESTED,
            _attr(VETH_INFO_PEER | NLA_F_NESTED, _ifinfo() + peer_attrs))
        body = (_ifinfo(up=True) + _attr(IFLA_IFNAME, _name(name))
                + _attr(IFLA_MASTER, struct.pack("=I", master))
                + _attr(IFLA_LINKINFO | NLA_F_NESTED, info))
        self._request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)

    def link_del(self, name: str) -> bool:
        """Delete a link by name; False if there was none."""
        try:
            self._request(RTM_DELLINK, 0, _ifinfo() + _attr(IFLA_IFNAME, _name(name)))
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return False
            raise
        return True

    def addr_add(self, index: int, ip: str, prefix_len: int) -> None:
        packed = socket.inet_aton(ip)
        body = (_IFADDRMSG.pack(socket.AF_INET, prefix_len, 0, RT_SCOPE_UNIVERSE, index)
                + _attr(IFA_LOCAL, packed) + _attr(IFA_ADDRESS, packed))
        self._request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body)

    def default_route_add(self, gateway: str) -> None:
        body = (_RTMSG.pack(socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC,
                            RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
                + _attr(RTA_GATEWAY, socket.inet_aton(gateway)))
        self._request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body)
