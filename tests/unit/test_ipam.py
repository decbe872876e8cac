"""IPAM: subnet choice around host routes, allocation order, exhaustion, validation."""

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtimed.errors import AlreadyExists, InvalidArgument, ResourceExhausted
from runtimed.network import ipam


def test_choose_subnet_skips_routes_addresses_and_other_networks():
    assert str(ipam.choose_subnet([])) == "172.17.0.0/16"
    taken = ["0.0.0.0/0", "172.17.5.0/24", "172.18.0.1/32", "127.0.0.0/8"]
    assert str(ipam.choose_subnet(taken)) == "172.19.0.0/16"
    # a host route covering the whole 172.16/12 pushes into 192.168/16 /20s
    assert str(ipam.choose_subnet(["172.16.0.0/12", "192.168.0.0/24"])) == "192.168.16.0/20"


def test_choose_subnet_exhausted():
    with pytest.raises(ResourceExhausted):
        ipam.choose_subnet(["172.16.0.0/12", "192.168.0.0/16"])


def test_allocate_skips_gateway_and_used_and_rotates():
    net = ipaddress.ip_network("10.0.0.0/29")  # hosts .1-.6
    gw = ipam.parse_gateway(net)
    assert str(gw) == "10.0.0.1"
    assert str(ipam.allocate(net, gw, [])) == "10.0.0.2"
    assert str(ipam.allocate(net, gw, ["10.0.0.2", "10.0.0.3"])) == "10.0.0.4"
    # after the last allocation, not the lowest free: a released address is not reused at once
    assert str(ipam.allocate(net, gw, ["10.0.0.2"], after="10.0.0.4")) == "10.0.0.5"
    assert str(ipam.allocate(net, gw, [], after="10.0.0.6")) == "10.0.0.2"  # wraps
    with pytest.raises(ResourceExhausted):
        ipam.allocate(net, gw, [f"10.0.0.{n}" for n in range(2, 7)])


def test_parse_and_validate():
    with pytest.raises(InvalidArgument):
        ipam.parse_subnet("10.0.0.0/31")
    with pytest.raises(InvalidArgument):
        ipam.parse_subnet("fd00::/64")
    with pytest.raises(InvalidArgument):
        ipam.parse_subnet("nonsense")
    assert str(ipam.parse_subnet("10.1.2.3/24")) == "10.1.2.0/24"
    net = ipam.parse_subnet("10.1.2.0/24")
    with pytest.raises(InvalidArgument):
        ipam.parse_gateway(net, "10.1.3.1")
    with pytest.raises(InvalidArgument):
        ipam.parse_gateway(net, "10.1.2.255")
    gw = ipam.parse_gateway(net, "10.1.2.254")
    assert str(ipam.check_requested(net, gw, "10.1.2.9", [])) == "10.1.2.9"
    with pytest.raises(AlreadyExists):
        ipam.check_requested(net, gw, "10.1.2.9", ["10.1.2.9"])
    with pytest.raises(InvalidArgument):
        ipam.check_requested(net, gw, "10.1.2.254", [])


@given(st.integers(min_value=22, max_value=29), st.data())
def test_allocation_never_repeats_until_exhausted(prefix, data):
    net = ipaddress.ip_network(f"10.9.0.0/{prefix}")
    gw = ipam.parse_gateway(net)
    used: list[str] = []
    last = None
    hosts = net.num_addresses - 3
    steps = data.draw(st.integers(min_value=1, max_value=min(hosts, 40)))
    for _ in range(steps):
        ip = ipam.allocate(net, gw, used, after=last)
        assert ip in net and ip != gw and str(ip) not in used
        assert ip not in (net.network_address, net.broadcast_address)
        used.append(str(ip))
        last = ip
        if data.draw(st.booleans()) and len(used) > 1:
            used.pop(0)  # release the oldest
