"""version, info, events, system df/prune, namespace …, completion.

ctl.format (json, shlex, its template regex) is imported by the commands that print
through it: `ctl version` does not."""

from __future__ import annotations

import sys

from ctl.commands import client, err, out, parse_labels
from runtimed.errors import InvalidArgument


def group(args) -> int:
    """`ctl image` / `ctl system` / `ctl namespace` without a subcommand: show its help."""
    args.parser.parse_args([args.command, "--help"])
    return 0


def version(args) -> int:
    from runtimed import __version__

    info = {"Client": {"Version": __version__, "Namespace": args.namespace},
            "Server": None}
    error = None
    try:
        v = client(args).version()
        info["Server"] = {"Version": v["version"], "Revision": v["revision"], "Address": args.address}
    except Exception as exc:  # noqa: BLE001 - the client part is still worth printing
        error = exc
    if args.format:
        from ctl.format import document

        out(document(info, args.format))
    else:
        lines = ["Client:", f" Version:    {__version__}", f" Namespace:  {args.namespace}"]
        if info["Server"]:
            s = info["Server"]
            lines += ["", "Server:", f" Version:    {s['Version']}", f" Revision:   {s['Revision']}",
                      f" Address:    {s['Address']}"]
        out("\n".join(lines))
    if error is not None:
        raise error
    return 0


def _counts(c) -> dict:
    containers = c.containers.list()
    tasks = {t.id: t.status for t in c.tasks.list()}
    running = sum(1 for s in tasks.values() if s == "RUNNING")
    paused = sum(1 for s in tasks.values() if s in ("PAUSED", "PAUSING"))
    return {
        "Containers": len(containers), "ContainersRunning": running,
        "ContainersPaused": paused, "ContainersStopped": len(containers) - running - paused,
    }


def info(args) -> int:
    import os
    import platform

    c = client(args)
    v = c.version()
    data = {"ServerVersion": v["version"], "Revision": v["revision"], "Address": args.address,
            "Namespace": args.namespace}
    data.update(_counts(c))
    data["Images"] = len(c.images.list())
    try:
        plugins = c.plugins()
        data["Snapshotters"] = sorted(p["id"] for p in plugins if p["type"] == "io.containerd.snapshotter.v1")
        data["Runtimes"] = sorted(p["id"] for p in plugins if p["type"].startswith("io.containerd.runtime"))
    except Exception:  # noqa: BLE001 - introspection is optional for info
        pass
    data["Namespaces"] = [n["name"] for n in c.list_namespaces()]
    try:
        data["ID"] = c.server_info()["uuid"]
    except Exception:  # noqa: BLE001
        pass
    data["Kernel"] = platform.release()
    data["OperatingSystem"] = _os_name()
    data["Architecture"] = platform.machine()
    data["CPUs"] = os.cpu_count()
    data["CgroupVersion"] = "2" if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else "1"
    if args.format:
        from ctl.format import document

        out(document(data, args.format))
        return 0
    lines = []
    for key, value in data.items():
        if isinstance(value, list):
            value = ", ".join(value)
        lines.append(f" {key}: {value}")
    out("Server:\n" + "\n".join(lines))
    return 0


def _os_name() -> str:
    try:
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return "Linux"


def df(args) -> int:
    from ctl.format import emit, human_size

    c = client(args)
    images = c.images.list()
    containers = c.containers.list()
    in_use = {ct.image for ct in containers}
    image_size = 0
    reclaimable = 0
    for image in images:
        try:
            size = c.images.resolve(image).size
        except Exception:  # noqa: BLE001 - a broken image still counts, with no size
            size = 0
        image_size += size
        if image.name not in in_use:
            reclaimable += size
    tasks = {t.id: t.status for t in c.tasks.list()}
    active = sum(1 for ct in containers if tasks.get(ct.id) in ("RUNNING", "PAUSED", "PAUSING"))
    snaps = c._stub("snapshots")
    container_size = 0
    for ct in containers:
        try:
            usage = snaps.Usage(snaps.pb.UsageRequest(snapshotter=ct.snapshotter or "overlayfs",
                                                      key=ct.snapshot_key or ct.id))
            container_size += usage.size
        except Exception:  # noqa: BLE001 - a container without a snapshot has no size
            pass
    rows = [
        {"Type": "Images", "TotalCount": len(images), "Active": len({i.name for i in images} & in_use),
         "Size": human_size(image_size), "Reclaimable": human_size(reclaimable)},
        {"Type": "Containers", "TotalCount": len(containers), "Active": active,
         "Size": human_size(container_size), "Reclaimable": ""},
    ]
    out(emit(rows, [("TYPE", "Type"), ("TOTAL", "TotalCount"), ("ACTIVE", "Active"),
                    ("SIZE", "Size"), ("RECLAIMABLE", "Reclaimable")], args.format))
    return 0


def prune(args) -> int:
    if not args.force:
        what = "all stopped containers" + (" and all images without a container" if args.all else "")
        sys.stderr.write(f"WARNING! This will remove {what}.\nAre you sure you want to continue? [y/N] ")
        sys.stderr.flush()
        answer = sys.stdin.readline().strip().lower()
        if answer not in ("y", "yes"):
            return 0
    c = client(args)
    tasks = {t.id: t.status for t in c.tasks.list()}
    removed = []
    for ct in c.containers.list():
        if tasks.get(ct.id, "STOPPED") in ("STOPPED", "CREATED", "UNKNOWN"):
            c.containers.remove(ct.id, force=True)
            removed.append(ct.id)
    if removed:
        out("Deleted Containers:\n" + "\n".join(removed) + "\n")
    if args.all:
        used = {ct.image for ct in c.containers.list()}
        deleted = []
        for image in c.images.list():
            if image.name not in used:
                c.images.remove(image.name)
                deleted.append(image.name)
        if deleted:
            out("Deleted Images:\n" + "\n".join(f"untagged: {n}" for n in deleted) + "\n")
    return 0


# events -------------------------------------------------------------------------------

_TYPE_TOPICS = {
    "container": r"^/(containers|tasks)/",
    "image": r"^/images/",
    "snapshot": r"^/snapshot/",
    "namespace": r"^/namespaces/",
    "content": r"^/content/",
}


def event_filters(items: list[str]) -> list[str]:
    """docker's `key=value` filters → one containerd filter (selectors AND together)."""
    selectors = []
    for item in items:
        if any(op in item for op in ("==", "!=", "~=")):
            selectors.append(item)
            continue
        key, eq, value = item.partition("=")
        if not eq:
            raise InvalidArgument(f"invalid filter {item!r}: use KEY=VALUE")
        if key == "type":
            if value not in _TYPE_TOPICS:
                raise InvalidArgument(f"invalid filter type={value}: one of {', '.join(_TYPE_TOPICS)}")
            selectors.append(f'topic~="{_TYPE_TOPICS[value]}"')
        elif key == "event":
            selectors.append(f'topic~="/{value}$"')
        elif key == "container":
            selectors.append(f'event.container_id=="{value}"')
        elif key == "image":
            selectors.append(f'event.name~="{value}"')
        elif key == "namespace":
            selectors.append(f'namespace=="{value}"')
        elif key == "topic":
            selectors.append(f'topic=="{value}"')
        else:
            raise InvalidArgument(f"invalid filter {key!r}: use type, event, container, image, namespace or topic")
    return [",".join(selectors)] if selectors else []


def events(args) -> int:
    import json
    from datetime import UTC, datetime

    from ctl.format import parse_time, render_template

    since = parse_time(args.since) if args.since else None
    until = parse_time(args.until) if args.until else None
    if until is not None and args.until and not any(ch in args.until for ch in "-:T"):
        # a duration means "for this long from now", as in `--until 10s`
        now = datetime.now(UTC)
        until = now + (now - until)
    c = client(args)
    stream = c.events(event_filters(args.filter))
    import threading

    if until is not None:
        delay = max(0.0, (until - datetime.now(UTC)).total_seconds())
        timer = threading.Timer(delay, stream.cancel)
        timer.daemon = True
        timer.start()
    try:
        for event in stream:
            if since is not None and event.timestamp and event.timestamp < since:
                continue
            row = {"Time": event.timestamp.isoformat() if event.timestamp else "",
                   "Namespace": event.namespace, "Topic": event.topic, "Type": event.type_url,
                   "Event": event.payload}
            if args.format == "json":
                out(json.dumps(row, default=str, sort_keys=True))
            elif args.format:
                out(render_template(args.format, row))
            else:
                out(str(event))
            if until is not None and datetime.now(UTC) >= until:
                break
    finally:
        stream.cancel()
    return 0


# namespaces ---------------------------------------------------------------------------

def ns_ls(args) -> int:
    from ctl.format import emit

    rows = []
    for n in client(args).list_namespaces():
        labels = ",".join(f"{k}={v}" for k, v in sorted(n["labels"].items()))
        rows.append({"Name": n["name"], "Labels": labels})
    out(emit(rows, [("NAME", "Name"), ("LABELS", "Labels")], args.format, "Name", args.quiet))
    return 0


def ns_create(args) -> int:
    client(args).create_namespace(args.name, parse_labels(args.labels))
    return 0


def ns_rm(args) -> int:
    code = 0
    for name in args.names:
        try:
            client(args).remove_namespace(name)
            out(name)
        except Exception as exc:  # noqa: BLE001 - report each, keep going, as docker rm does
            from ctl.commands import describe_error

            err(f"ctl: {describe_error(exc)[0]}")
            code = 1
    return code


def ns_label(args) -> int:
    client(args).label_namespace(args.name, parse_labels(args.labels))
    return 0


# completion ---------------------------------------------------------------------------

def completion(args) -> int:
    parser = args.parser
    commands = []
    for action in parser._subparsers._group_actions:
        commands += sorted(action.choices)
    words = " ".join(commands)
    if args.shell == "zsh":
        out(f"#compdef ctl\n_arguments '1: :({words})' '*: :_files'")
        return 0
    out(
        "_ctl() {\n"
        '  local cur="${COMP_WORDS[COMP_CWORD]}"\n'
        "  if [ $COMP_CWORD -eq 1 ]; then\n"
        f'    COMPREPLY=( $(compgen -W "{words}" -- "$cur") )\n'
        "  else\n"
        '    COMPREPLY=( $(compgen -f -- "$cur") )\n'
        "  fi\n"
        "}\n"
        "complete -F _ctl ctl"
    )
    return 0
