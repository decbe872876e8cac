"""volume create, ls, inspect, rm, prune."""

from __future__ import annotations

import sys
from dataclasses import asdict

from ctl.commands import client, describe_error, err, out, out_documents, parse_labels
from ctl.format import emit, human_size
from runtimed.errors import InvalidArgument


def _filters(items: list[str]) -> list[str]:
    """docker's `name=`, `label=k[=v]`, `driver=`, `dangling=` → containerd filters."""
    out_filters = []
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise InvalidArgument(f"invalid filter {item!r}: use KEY=VALUE")
        if key == "label":
            k, _, v = value.partition("=")
            out_filters.append(f'labels."{k}"=="{v}"' if v else f'labels."{k}"')
        elif key in ("name", "driver"):
            out_filters.append(f'{key}~="{value}"' if key == "name" else f'{key}=="{value}"')
        else:
            raise InvalidArgument(f"invalid filter {key!r}: use name, driver or label")
    return [",".join(out_filters)] if out_filters else []


def create(args) -> int:
    volume = client(args).volumes.create(args.name or "", parse_labels(args.label), args.driver)
    out(volume.name)
    return 0


def ls(args) -> int:
    volumes = client(args).volumes.list(_filters(args.filter))
    rows = [{"Driver": v.driver, "Name": v.name, "Mountpoint": v.mountpoint, "Labels": v.labels,
             "Anonymous": v.anonymous} for v in sorted(volumes, key=lambda v: v.name)]
    out(emit(rows, [("DRIVER", "Driver"), ("VOLUME NAME", "Name")], args.format, "Name", args.quiet))
    return 0


def inspect(args) -> int:
    c = client(args)
    docs, code = [], 0
    for name in args.names:
        try:
            v = c.volumes.get(name)
            doc = asdict(v)
            doc["created_at"] = v.created_at.isoformat() if v.created_at else ""
            docs.append({"Name": v.name, "Driver": v.driver, "Mountpoint": v.mountpoint,
                         "Labels": v.labels, "CreatedAt": doc["created_at"], "Anonymous": v.anonymous,
                         "UsedBy": v.used_by, "Size": v.size})
        except Exception as exc:  # noqa: BLE001
            err(f"ctl: {describe_error(exc)[0]}")
            code = 1
    out_documents(docs, args.format)
    return code


def rm(args) -> int:
    c = client(args)
    code = 0
    for name in args.names:
        try:
            c.volumes.remove(name, force=args.force)
            out(name)
        except Exception as exc:  # noqa: BLE001
            err(f"ctl: {describe_error(exc)[0]}")
            code = 1
    return code


def prune(args) -> int:
    if not args.force:
        what = "all volumes not used by a container" if args.all else "all anonymous volumes not used by a container"
        sys.stderr.write(f"WARNING! This will remove {what}.\nAre you sure you want to continue? [y/N] ")
        sys.stderr.flush()
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            return 0
    removed, reclaimed = client(args).volumes.prune(all=args.all, filters=_filters(args.filter))
    if removed:
        out("Deleted Volumes:\n" + "\n".join(removed) + "\n")
    out(f"Total reclaimed space: {human_size(reclaimed)}")
    return 0
