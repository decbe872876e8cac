"""IP address management: pure functions over subnets and the set of addresses in use.

Allocations themselves are rows in meta.db (a UNIQUE (network, ip) constraint makes a
double allocation impossible even across a crash); this module only decides which
address or subnet to take next.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from runtimed.errors import AlreadyExists, InvalidArgument, ResourceExhausted

IPv4Network = ipaddress.IPv4Network
IPv4Address = ipaddress.IPv4Address

# Where a default or unnamed network's subnet comes from, in order (Docker's default pool).
DEFAULT_POOLS = [f"172.{n}.0.0/16" for n in range(17, 32)] + [
    f"192.168.{n}.0/20" for n in range(0, 256, 16)
]


def parse_subnet(text: str) -> IPv4Network:
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise InvalidArgument(f"invalid subnet {text!r}: {exc}") from None
    if not isinstance(net, IPv4Network):
        raise InvalidArgument(f"subnet {text!r}: only IPv4 subnets are supported")
    if net.prefixlen > 30:
        raise InvalidArgument(f"subnet {text!r} is too small: use a /30 or larger")
    return net


def parse_gateway(subnet: IPv4Network, text: str = "") -> IPv4Address:
    """The given gateway, or the subnet's first host address."""
    if not text:
        return subnet.network_address + 1
    try:
        gateway = ipaddress.IPv4Address(text)
    except ValueError:
        raise InvalidArgument(f"invalid gateway {text!r}") from None
    if gateway not in subnet or gateway in (subnet.network_address, subnet.broadcast_address):
        raise InvalidArgument(f"gateway {gateway} is not a host address of subnet {subnet}")
    return gateway


def overlaps(candidate: IPv4Network, taken: Iterable[IPv4Network]) -> bool:
    return any(candidate.overlaps(t) for t in taken)


def choose_subnet(taken: Iterable[str | IPv4Network], pools: list[str] = DEFAULT_POOLS) -> IPv4Network:
    """The first pool subnet that overlaps none of `taken` (host routes and addresses,
    other networks). Default routes (prefix length 0) are ignored: they overlap all."""
    nets = [ipaddress.ip_network(t, strict=False) for t in taken]
    nets = [n for n in nets if isinstance(n, IPv4Network) and n.prefixlen > 0]
    for text in pools:
        candidate = ipaddress.ip_network(text)
        if not overlaps(candidate, nets):
            return candidate
    raise ResourceExhausted(
        "no free subnet left in the default pools; create the network with an explicit subnet"
    )


def allocate(subnet: IPv4Network, gateway: IPv4Address, used: Iterable[str | IPv4Address],
             after: str | IPv4Address | None = None) -> IPv4Address:
    """The next free host address after `after` (wrapping around), so a released address
    is not handed out again at once (stale ARP entries, connections to the old holder)."""
    taken = {ipaddress.IPv4Address(u) for u in used}
    taken.add(gateway)
    first = int(subnet.network_address) + 1
    last = int(subnet.broadcast_address) - 1
    size = last - first + 1
    start = int(ipaddress.IPv4Address(after)) + 1 if after else first
    if not first <= start <= last:
        start = first
    for offset in range(size):
        candidate = ipaddress.IPv4Address(first + (start - first + offset) % size)
        if candidate not in taken:
            return candidate
    raise ResourceExhausted(f"no free address left in subnet {subnet}")


def check_requested(subnet: IPv4Network, gateway: IPv4Address, text: str,
                    used: Iterable[str]) -> IPv4Address:
    """Validate an address a caller asked for explicitly."""
    try:
        ip = ipaddress.IPv4Address(text)
    except ValueError:
        raise InvalidArgument(f"invalid IP address {text!r}") from None
    if ip not in subnet or ip in (subnet.network_address, subnet.broadcast_address, gateway):
        raise InvalidArgument(f"address {ip} is not a free host address of subnet {subnet}")
    if str(ip) in set(used):
        raise AlreadyExists(f"address {ip} is already in use on this network")
    return ip
