"""The per-container /etc/hosts, /etc/resolv.conf and /etc/hostname files.

The client bind-mounts each file into the container, so an update must keep the inode:
a bind mount of a file pins the inode, and a rename-over would leave the container with
the old one. Updates therefore overwrite in place (one write of the whole content, then
truncate), as Docker does for its hosts files.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

HOST_RESOLV_CONF = Path("/etc/resolv.conf")
HOST_HOSTS = Path("/etc/hosts")

LOCAL_ENTRIES = (
    "127.0.0.1\tlocalhost\n"
    "::1\tlocalhost ip6-localhost ip6-loopback\n"
    "fe00::0\tip6-localnet\n"
    "ff00::0\tip6-mcastprefix\n"
    "ff02::1\tip6-allnodes\n"
    "ff02::2\tip6-allrouters\n"
)


@dataclass
class HostEntry:
    ip: str
    names: list[str] = field(default_factory=list)


def render_hosts(own: list[HostEntry], peers: list[HostEntry]) -> str:
    """localhost, then the container's own addresses, then its peers on shared networks."""
    lines = [LOCAL_ENTRIES]
    seen = set()
    for entry in [*own, *peers]:
        names = [n for n in dict.fromkeys(entry.names) if n]
        if not names or (entry.ip, tuple(names)) in seen:
            continue
        seen.add((entry.ip, tuple(names)))
        lines.append(f"{entry.ip}\t{' '.join(names)}\n")
    return "".join(lines)


def render_resolv_conf(host_text: str) -> str:
    """The host's resolver settings without loopback nameservers: a resolver listening
    on the host's 127.0.0.53 is not reachable from the container's own loopback."""
    out = []
    for line in host_text.splitlines():
        words = line.split()
        if not words or words[0].startswith(("#", ";")):
            continue
        if words[0] == "nameserver":
            if len(words) < 2:
                continue
            try:
                if ipaddress.ip_address(words[1].split("%")[0]).is_loopback:
                    continue
            except ValueError:
                continue
        if words[0] in ("nameserver", "search", "domain", "options"):
            out.append(" ".join(words) + "\n")
    return "".join(out)


def host_resolv_conf() -> str:
    try:
        return render_resolv_conf(HOST_RESOLV_CONF.read_text(errors="replace"))
    except OSError:
        return ""


def write_in_place(path: Path, text: str) -> None:
    """Replace the content of `path` keeping its inode (see the module docstring)."""
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)
