"""The network helper: a single-threaded process that does all netlink and netns work.

runtimed is multithreaded (gRPC, asyncio, worker threads), and entering a network
namespace (setns/unshare) acts on one thread only. So runtimed execs `python3 -m runtimed.network.helper` once, lazily, and sends it
one JSON request per line on stdin; each answer is one JSON line on stdout:
`{"ok": true, "result": ...}` or `{"ok": false, "error": "...", "kind": "NotFound"}`.

Namespaces are entered only here: unshare(CLONE_NEWNET) to create one (bind-mounted on
a file so it outlives this process), setns into one just long enough to open a netlink
socket there (the socket stays bound to that namespace), setns back at once. Netlink
requests are raw (`runtimed.network.rtnl`): the helper starts in ~50 ms, not pyroute2's
~350 ms, and an attach is one request to it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import sys
from contextlib import contextmanager

from runtimed.network.rtnl import LOOPBACK_INDEX, RT_TABLE_LOCAL, RT_TABLE_MAIN, Rtnl

CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)


class HelperError(Exception):
    kind = "Unavailable"


class NotFoundError(HelperError):
    kind = "NotFound"


class ConflictError(HelperError):
    kind = "FailedPrecondition"


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _host_fd() -> int:
    return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


@contextmanager
def _entered(path: str):
    """Run the body inside the netns bind-mounted at `path`, then return to ours."""
    home = _host_fd()
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        os.close(home)
        raise NotFoundError(f"network namespace {path} does not exist") from None
    try:
        _check(_libc.setns(target, CLONE_NEWNET), f"setns {path}")
        try:
            yield
        finally:
            _check(_libc.setns(home, CLONE_NEWNET), "setns back to the host")
    finally:
        os.close(target)
        os.close(home)


# Bridges whose address, alias and NAT rule `bridge_up` saw to in this helper's life: an
# attach then only checks (one request) that the bridge still exists and is up.
_verified: set[str] = set()


def _iptables(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["iptables", "-w", "5", *args], capture_output=True, text=True)


def _masquerade_rule(bridge: str, subnet: str) -> list[str]:
    return ["-t", "nat", "POSTROUTING", "-s", subnet, "!", "-o", bridge, "-j", "MASQUERADE",
            "-m", "comment", "--comment", f"runtimed:{bridge}"]


def _rule(action: str, rule: list[str]) -> list[str]:
    return [rule[0], rule[1], action, *rule[2:]]


# ---- operations ------------------------------------------------------------------------

def host_prefixes() -> list[str]:
    """Every IPv4 prefix the host routes or holds an address in (to pick free subnets)."""
    with Rtnl() as nl:
        found = set()
        for route in nl.routes(RT_TABLE_MAIN) + nl.routes(RT_TABLE_LOCAL):
            if route.dst and route.dst_len:
                found.add(f"{route.dst}/{route.dst_len}")
        for addr in nl.addrs():
            found.add(f"{addr.address}/{addr.prefix_len}")
        return sorted(found)


def links() -> list[dict]:
    with Rtnl() as nl:
        found = nl.links()
    names = {link.index: link.name for link in found}
    return [{"name": link.name, "kind": link.kind,
             "master": names.get(link.master) if link.master else None, "alias": link.alias}
            for link in found]


def _routed_elsewhere(nl: Rtnl, subnet: str, bridge: str) -> bool:
    import ipaddress

    net = ipaddress.ip_network(subnet)
    names = {link.index: link.name for link in nl.links()}
    for route in nl.routes(RT_TABLE_MAIN):
        if not route.dst or not route.dst_len:
            continue
        if (names.get(route.oif) != bridge
                and net.overlaps(ipaddress.ip_network(f"{route.dst}/{route.dst_len}"))):
            return True
    return False


def bridge_up(name: str, address: str, subnet: str, masquerade: bool = True,
              exclusive: bool = False, alias: str = "") -> dict:
    """Create (or repair) the bridge with its gateway address; outbound NAT if possible.
    `exclusive` (a new network): fail if the device exists or the subnet is routed
    elsewhere, which another daemon may have done since the subnet was chosen."""
    with Rtnl() as nl:
        link = nl.link(name)
        if exclusive and (link is not None or _routed_elsewhere(nl, subnet, name)):
            raise ConflictError(f"bridge {name} or subnet {subnet} was taken meanwhile")
        if link is None:
            nl.bridge_add(name)
            link = nl.link(name)
            if link is None:
                raise NotFoundError(f"bridge {name} vanished as it was made")
        ip, prefix = address.split("/")
        if ip not in {a.address for a in nl.addrs(link.index)}:
            nl.addr_add(link.index, ip, int(prefix))
        if alias:  # who owns it, so another runtimed can tell an orphan (see sweep)
            nl.set_alias(link.index, alias)
        nl.set_up(link.index)
    nat = False
    if masquerade:
        try:
            with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
                f.write("1")
            rule = _masquerade_rule(name, subnet)
            if _iptables(*_rule("-C", rule)).returncode != 0:
                nat = _iptables(*_rule("-A", rule)).returncode == 0
            else:
                nat = True
        except OSError:
            nat = False
    _verified.add(name)
    return {"nat": nat}


def bridge_down(name: str, subnet: str = "") -> None:
    """Delete the bridge and its NAT rules (found by their comment when the subnet is
    not known, as for an orphan)."""
    _verified.discard(name)
    try:
        saved = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout
        for line in saved.splitlines():
            if line.startswith("-A ") and (f'"runtimed:{name}"' in line or f" runtimed:{name} " in line):
                import shlex

                _iptables("-t", "nat", "-D", *shlex.split(line)[1:])
    except OSError:
        pass
    with Rtnl() as nl:
        nl.link_del(name)


def nat_orphans_down() -> int:
    """Delete runtimed NAT rules whose bridge no longer exists (a runtimed killed
    between removing a bridge's rules and the bridge never leaves this order reversed:
    rules go first, so a rule without its bridge is always an orphan)."""
    import re
    import shlex

    try:
        saved = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout
    except OSError:
        return 0
    with Rtnl() as nl:
        present = {link.name for link in nl.links()}
    removed = 0
    for line in saved.splitlines():
        found = re.search(r'--comment "?runtimed:([\w.-]+)"?', line)
        if line.startswith("-A ") and found and found.group(1) not in present:
            if _iptables("-t", "nat", "-D", *shlex.split(line)[1:]).returncode == 0:
                removed += 1
    return removed


def _new_netns(path: str) -> Rtnl:
    """A new network namespace, kept alive by a bind mount of its nsfs file on `path`
    (a leftover of a crash there is replaced), with lo up; returns a netlink socket
    inside it."""
    if os.path.lexists(path):
        netns_delete(path)
    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    os.close(fd)
    home = _host_fd()
    try:
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        try:
            _check(_libc.mount(b"/proc/thread-self/ns/net", path.encode(), None, MS_BIND, None),
                   f"bind mount netns on {path}")
            inner = Rtnl()
        finally:
            _check(_libc.setns(home, CLONE_NEWNET), "setns back to the host")
    except BaseException:
        _libc.umount2(path.encode(), MNT_DETACH)
        os.unlink(path)
        raise
    finally:
        os.close(home)
    try:
        inner.set_up(LOOPBACK_INDEX)
    except BaseException:
        inner.close()
        raise
    return inner


def _netns_socket(path: str) -> Rtnl:
    with _entered(path):
        return Rtnl()


def netns_create(path: str) -> None:
    _new_netns(path).close()


def netns_delete(path: str) -> None:
    """Unmount and remove; the namespace (and veth ends in it) goes when unused."""
    if _libc.umount2(path.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"umount {path}: {os.strerror(err)}")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def endpoint_add(netns: str, bridge: str, host_if: str, ifname: str, address: str,
                 gateway: str, default_route: bool, mac: str = "", new_netns: bool = False,
                 bridge_setup: dict | None = None) -> dict:
    """A veth pair: `host_if` up on the bridge, its peer `ifname` (with `mac`, if given)
    up inside `netns` with the address and, if asked, the default route. With
    `new_netns`, the netns is made first; with `bridge_setup` (the arguments of
    `bridge_up`), a bridge that is gone or down, or not yet seen to by this helper, is
    brought up first. So an attach is one request (see `runtimed.network.rtnl`)."""
    with Rtnl() as nl:
        bridge_link = nl.link(bridge)
        if bridge_setup is not None and (bridge_link is None or not bridge_link.up
                                         or bridge not in _verified):
            bridge_up(**bridge_setup)
            bridge_link = nl.link(bridge)
        if bridge_link is None:
            raise NotFoundError(f"bridge {bridge} does not exist")
        inner = _new_netns(netns) if new_netns else _netns_socket(netns)
        try:
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                try:
                    nl.veth_add(host_if, bridge_link.index, ifname, fd, mac)
                except FileExistsError:
                    # a pair half made before a crash goes whole; else ifname is taken
                    if not nl.link_del(host_if):
                        raise ConflictError(f"interface {ifname} already exists in {netns}") from None
                    nl.veth_add(host_if, bridge_link.index, ifname, fd, mac)
            finally:
                os.close(fd)
            try:
                link = inner.link(ifname)
                if link is None:
                    raise NotFoundError(f"interface {ifname} vanished from {netns}")
                inner.set_up(link.index)
                ip, prefix = address.split("/")
                inner.addr_add(link.index, ip, int(prefix))
                if default_route:
                    inner.default_route_add(gateway)
            except BaseException:
                nl.link_del(host_if)
                raise
        finally:
            inner.close()
    return {"mac": link.mac}


def endpoint_ok(netns: str, bridge: str, host_if: str, ifname: str, address: str,
                gateway: str, default_route: bool) -> bool:
    """Whether an endpoint is whole, as `endpoint_add` leaves it: `host_if` up on the
    bridge, `ifname` up in `netns` with the address (and the default route). A process
    killed in the middle of `endpoint_add` leaves a pair that is not."""
    with Rtnl() as nl:
        host, bridge_link = nl.link(host_if), nl.link(bridge)
    if host is None or bridge_link is None or host.master != bridge_link.index or not host.up:
        return False
    try:
        inner = _netns_socket(netns)
    except NotFoundError:
        return False
    with inner:
        link = inner.link(ifname)
        if link is None or not link.up:
            return False
        ip, prefix = address.split("/")
        if not any(a.address == ip and a.prefix_len == int(prefix)
                   for a in inner.addrs(link.index)):
            return False
        if default_route and not any(r.dst_len == 0 and r.gateway == gateway
                                     for r in inner.routes(RT_TABLE_MAIN)):
            return False
    return True


def endpoint_del(host_if: str) -> None:
    """Deleting the host end of a veth pair deletes both ends."""
    with Rtnl() as nl:
        nl.link_del(host_if)


def sandbox_del(host_ifs: list[str], netns: str = "") -> None:
    """A detach in one request: the container's veth pairs, then its netns. Goes through
    every step; raises at the end if any failed (the caller keeps its records)."""
    failures = []
    with Rtnl() as nl:
        for name in host_ifs:
            try:
                nl.link_del(name)
            except OSError as exc:
                failures.append(f"delete {name}: {exc}")
    if netns:
        try:
            netns_delete(netns)
        except OSError as exc:
            failures.append(str(exc))
    if failures:
        raise HelperError("; ".join(failures))


OPERATIONS = {
    f.__name__: f
    for f in (host_prefixes, links, bridge_up, bridge_down, nat_orphans_down, netns_create,
              netns_delete, endpoint_add, endpoint_ok, endpoint_del, sandbox_del)
}


def handle(request: dict) -> dict:
    op = OPERATIONS.get(request.get("op", ""))
    if op is None:
        return {"ok": False, "kind": "InvalidArgument", "error": f"unknown op {request.get('op')!r}"}
    try:
        return {"ok": True, "result": op(**request.get("args", {}))}
    except HelperError as exc:
        return {"ok": False, "kind": exc.kind, "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - reported to runtimed, which maps it
        return {"ok": False, "kind": "Unavailable", "error": f"{request['op']}: {type(exc).__name__}: {exc}"}


def _wait_for_predecessor(path: str, timeout: float = 30.0) -> None:
    """Hold `path` locked for this helper's life. A runtimed killed with SIGKILL leaves
    its helper finishing the request it was given (it exits at end of input); the next
    runtimed's helper waits for it here, so two never work on the same state at once."""
    import fcntl
    import time

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return  # kept open (and locked) until this process exits
        except BlockingIOError:
            if time.monotonic() > deadline:
                sys.stderr.write(f"network helper: {path} still locked; going ahead\n")
                return
            time.sleep(0.02)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--lock":
        _wait_for_predecessor(sys.argv[2])
    for line in sys.stdin:
        if not line.strip():
            continue
        reply = handle(json.loads(line))
        try:
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:  # runtimed is gone (killed); the work is done anyway
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # quiet exit
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
