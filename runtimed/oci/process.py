"""The process part of an OCI spec, on its own for `exec`: the user from the image's
passwd and group files, the environment, an exec's process. `ctl exec` imports only
this module (spec.py's records and the seccomp profile cost its start 2-4 ms);
runtimed.oci.spec gives the same names.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

from runtimed.errors import NotFound

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class User:
    """A resolved process user: ids, groups and home."""

    uid: int
    gid: int
    additional_gids: list[int] = field(default_factory=list)
    home: str = "/"


# reads a file of the image's root filesystem ("/etc/passwd"), None when absent
FileReader = Callable[[str], bytes | None]


def merge_env(base: list[str], overrides: list[str]) -> list[str]:
    """Later entries replace earlier ones with the same key, keeping the first position."""
    out: dict[str, str] = {}
    for entry in [*base, *overrides]:
        key = entry.split("=", 1)[0]
        out[key] = entry
    return list(out.values())


def _parse_db(data: bytes | None) -> list[list[str]]:
    if not data:
        return []
    rows = []
    for line in data.decode(errors="replace").splitlines():
        if line and not line.startswith("#"):
            rows.append(line.split(":"))
    return rows


def resolve_user(user: str, read_file: FileReader | None) -> User:
    """`name`, `uid`, `name:group`, `uid:gid` → ids, through the image's passwd and group.

    As Docker: a numeric uid absent from passwd is fine (gid 0); a name that is not there
    is an error.
    """
    name, _, group = (user or "0").partition(":")
    passwd = _parse_db(read_file("/etc/passwd")) if read_file else []
    groups = _parse_db(read_file("/etc/group")) if read_file else []
    entry = None
    for row in passwd:
        if len(row) >= 4 and (row[0] == name or (name.isdigit() and row[2] == name)):
            entry = row
            break
    if entry is not None:
        uid, gid, home = int(entry[2]), int(entry[3]), entry[5] if len(entry) > 5 else "/"
        username = entry[0]
    elif name.isdigit():
        uid, gid, home, username = int(name), 0, "/", None
    else:
        raise NotFound(f"unable to find user {name}: no matching entries in passwd file")
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            match = [r for r in groups if len(r) >= 3 and r[0] == group]
            if not match:
                raise NotFound(f"unable to find group {group}: no matching entries in group file")
            gid = int(match[0][2])
    extra = []
    if username is not None and not group:
        for row in groups:
            if len(row) >= 4 and username in row[3].split(",") and row[2].isdigit():
                g = int(row[2])
                if g != gid and g not in extra:
                    extra.append(g)
    return User(uid=uid, gid=gid, additional_gids=extra, home=home)


def exec_process(
    base: dict, args: list[str], *, env: list[str] = (), cwd: str | None = None,
    user: User | None = None, terminal: bool = False,
) -> dict:
    """An OCI Process for exec: the container's process with a new command line."""
    proc = copy.deepcopy(base)
    proc["args"] = list(args)
    proc["terminal"] = terminal
    proc["env"] = merge_env(proc.get("env") or [DEFAULT_PATH], list(env))
    if terminal and not any(e.startswith("TERM=") for e in proc["env"]):
        proc["env"].append("TERM=xterm")
    if cwd:
        proc["cwd"] = cwd
    if user is not None:
        proc["user"] = {"uid": user.uid, "gid": user.gid}
        if user.additional_gids:
            proc["user"]["additionalGids"] = user.additional_gids
    proc.pop("consoleSize", None)
    return proc
