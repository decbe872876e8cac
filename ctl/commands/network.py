"""`ctl network ...` and the network part of `ctl run/create` (-p, --network, --hostname)."""

from __future__ import annotations

from dataclasses import asdict

from ctl.commands import client, err, out, parse_labels
from ctl.format import document, emit

HOST_MODES = ("host",)


def _networks():
    from ctl.client import networks

    return networks


def ls(args) -> int:
    rows = []
    for n in _networks().list_networks(client(args), args.filter):
        rows.append({"ID": n.id[:12] if not args.no_trunc else n.id, "Name": n.name,
                     "Driver": n.driver, "Subnet": n.subnet, "Bridge": n.bridge,
                     "Containers": len(n.containers)})
    columns = [("NETWORK ID", "ID"), ("NAME", "Name"), ("DRIVER", "Driver"),
               ("SUBNET", "Subnet"), ("CONTAINERS", "Containers")]
    out(emit(rows, columns, args.format, "ID", args.quiet))
    return 0


def create(args) -> int:
    network = _networks().create(client(args), args.name, subnet=args.subnet or "",
                                 gateway=args.gateway or "", driver=args.driver,
                                 labels=parse_labels(args.label))
    out(network.id)
    return 0


def inspect(args) -> int:
    found, code = [], 0
    for name in args.names:
        try:
            n = _networks().get(client(args), name)
        except Exception as exc:  # noqa: BLE001 - report each, keep going, as docker does
            from ctl.commands import describe_error

            err(f"ctl: {describe_error(exc)[0]}")
            code = 1
            continue
        found.append({"Name": n.name, "Id": n.id, "Driver": n.driver,
                      "Created": n.created_at.isoformat() if n.created_at else "",
                      "IPAM": {"Config": [{"Subnet": n.subnet, "Gateway": n.gateway}] if n.subnet else []},
                      "Bridge": n.bridge, "Labels": n.labels, "Containers": n.containers})
    if found:
        out(document(found if not args.format or args.format == "json" else found[0], args.format))
    return code


def rm(args) -> int:
    code = 0
    for name in args.names:
        try:
            _networks().remove(client(args), name)
            out(name)
        except Exception as exc:  # noqa: BLE001
            from ctl.commands import describe_error

            err(f"ctl: {describe_error(exc)[0]}")
            code = 1
    return code


def connect(args) -> int:
    _networks().attach(client(args), args.container, args.network, aliases=args.alias, ip=args.ip or "")
    return 0


def disconnect(args) -> int:
    _networks().detach(client(args), args.container, args.network)
    return 0


def attachment(args) -> int:
    """`ctl network attachment CONTAINER`: where the container's network lives."""
    att = _networks().inspect(client(args), args.container)
    out(document(asdict(att), args.format))
    return 0


def start_attach_for_run(c, args, container_id: str, opts):
    """Give a container being created its network, before its spec is written. The
    request is sent at once and the daemon sets the network up while the caller looks up
    the image; `result()` returns the attachment, already applied to `opts` (None for
    host networking: the spec keeps the host's netns and mounts the host's name files)
    or raises its error, a bad flag's too, so an image error still comes first."""
    from runtimed.errors import InvalidArgument

    networks = _networks()
    try:
        ports = [networks.parse_publish(p) for p in args.publish]
        network = args.network or "default"
        if network in HOST_MODES:
            if ports:
                raise InvalidArgument(f"-p/--publish has no effect with --network {network}: use a bridge network")
            return _Settled(None)
        pending = networks.start_attach(c, container_id, "" if network in ("default", "bridge") else network,
                                        hostname=args.hostname or "", ports=ports)
    except Exception as exc:  # noqa: BLE001 - raised by result(), after the image's errors
        return _Settled(error=exc)

    def applied(att):
        networks.apply_to_spec(att, opts)
        return att

    return pending.then(applied)


class _Settled:
    """An attachment known without asking (None), or the error in asking for one."""

    def __init__(self, value=None, error: Exception | None = None):
        self.value = value
        self.error = error

    def result(self):
        if self.error is not None:
            raise self.error
        return self.value

    def cancel(self) -> None:
        pass
