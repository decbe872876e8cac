"""images, image inspect, rmi, tag, history, load/import, save, pull, push, login, logout."""

from __future__ import annotations

import sys

from ctl.commands import client, err, out, out_documents
from ctl.format import ago, emit, human_size
from runtimed.errors import InvalidArgument


def _split(name: str) -> tuple[str, str]:
    from ctl.client.images import familiar
    from runtimed.build.dangling import is_dangling

    if is_dangling(name):  # an untagged build's image: docker's <none>:<none>
        return "<none>", "<none>"
    short = familiar(name)
    if "@" in short:
        return short.split("@", 1)[0], "<none>"
    repo, _, tag = short.rpartition(":")
    if not repo or "/" in tag:
        return short, "<none>"
    return repo, tag


def _parse_created(config: dict):
    from datetime import datetime

    created = config.get("created")
    if not created:
        return None
    try:
        return datetime.fromisoformat(created.replace("Z", "+00:00")[:32])
    except ValueError:
        return None


def image_row(c, image, no_trunc: bool = False) -> dict:
    repo, tag = _split(image.name)
    row = {"Repository": repo, "Tag": tag, "Digest": image.target.digest, "Name": image.name,
           "ID": "", "CreatedSince": "", "CreatedAt": "", "Size": "", "Labels": image.labels}
    try:
        resolved = c.images.resolve(image)
        image_id = resolved.config_descriptor.digest
        created = _parse_created(resolved.config)
        row["ID"] = image_id if no_trunc else image_id.removeprefix("sha256:")[:12]
        row["CreatedSince"] = ago(created)
        row["CreatedAt"] = created.isoformat() if created else ""
        row["Size"] = human_size(resolved.size)
    except Exception:  # noqa: BLE001 - list the image even when its content is incomplete
        row["ID"] = image.target.digest if no_trunc else image.target.digest.removeprefix("sha256:")[:12]
    return row


def _image_filters(args) -> list[str]:
    filters = []
    for item in args.filter:
        key, eq, value = item.partition("=")
        if not eq:
            raise InvalidArgument(f"invalid filter {item!r}: use KEY=VALUE")
        if key == "label":
            k, _, v = value.partition("=")
            filters.append(f'labels."{k}"=="{v}"' if v else f'labels."{k}"')
        elif key != "reference":
            raise InvalidArgument(f"invalid filter {key!r}: use reference or label")
    return filters


def ls(args) -> int:
    import fnmatch

    from ctl.client.images import familiar

    c = client(args)
    images = c.images.list(_image_filters(args))
    patterns = [i.split("=", 1)[1] for i in args.filter if i.startswith("reference=")]
    if args.reference:
        patterns.append(args.reference)
    if patterns:
        images = [i for i in images if any(
            fnmatch.fnmatch(familiar(i.name), p) or fnmatch.fnmatch(familiar(i.name), p + ":*")
            or fnmatch.fnmatch(i.name, p) for p in patterns)]
    images.sort(key=lambda i: i.name)
    if args.quiet:
        rows = [image_row(c, i, args.no_trunc) for i in images]
        seen: list[str] = []
        for r in rows:
            if r["ID"] not in seen:
                seen.append(r["ID"])
        out("\n".join(seen))
        return 0
    rows = [image_row(c, i, args.no_trunc) for i in images]
    columns = [("REPOSITORY", "Repository"), ("TAG", "Tag")]
    if args.digests:
        columns.append(("DIGEST", "Digest"))
    columns += [("IMAGE ID", "ID"), ("CREATED", "CreatedSince"), ("SIZE", "Size")]
    out(emit(rows, columns, args.format))
    return 0


def inspect_image(c, name: str) -> dict:
    image = c.images.get(name)
    resolved = c.images.resolve(image)
    config = resolved.config
    repo, tag = _split(image.name)
    return {
        "Id": resolved.config_descriptor.digest,
        "RepoTags": [f"{repo}:{tag}"] if tag != "<none>" else [],
        "Name": image.name,
        "Target": image.target.to_json(),
        "Labels": image.labels,
        "Created": config.get("created", ""),
        "Architecture": config.get("architecture", ""),
        "Os": config.get("os", ""),
        "Config": config.get("config") or {},
        "RootFS": config.get("rootfs") or {},
        "History": config.get("history") or [],
        "Size": resolved.size,
        "Manifest": resolved.manifest_descriptor.to_json(),
    }


def inspect(args) -> int:
    c = client(args)
    docs, code = [], 0
    for name in args.names:
        try:
            docs.append(inspect_image(c, name))
        except Exception as exc:  # noqa: BLE001
            from ctl.commands import describe_error

            err(f"ctl: {describe_error(exc)[0]}")
            code = 1
    out_documents(docs, args.format)
    return code


def rm(args) -> int:
    c = client(args)
    code = 0
    for name in args.images:
        try:
            image = c.images.get(name)
            users = [ct.id for ct in c.containers.list() if ct.image == image.name]
            if users and not args.force:
                raise InvalidArgument(
                    f"unable to remove {name}: image is in use by container {users[0]}; use -f to force"
                )
            c.images.remove(image.name)
            from ctl.client.images import familiar
            from runtimed.build.dangling import is_dangling

            if not is_dangling(image.name):
                out(f"Untagged: {familiar(image.name)}")
            out(f"Deleted: {image.target.digest}")
        except Exception as exc:  # noqa: BLE001 - report each, keep going
            from ctl.commands import describe_error

            err(f"ctl: {describe_error(exc)[0]}")
            code = 1
    return code


def tag(args) -> int:
    client(args).images.tag(args.source, args.target)
    return 0


def history(args) -> int:
    from datetime import datetime

    c = client(args)
    resolved = c.images.resolve(args.image)
    entries = list(resolved.config.get("history") or [])
    layers = list(resolved.layers)
    rows = []
    for entry in reversed(entries):
        size = 0
        if not entry.get("empty_layer") and layers:
            size = layers.pop().size
        created = entry.get("created")
        try:
            when = datetime.fromisoformat(created.replace("Z", "+00:00")) if created else None
        except ValueError:
            when = None
        command = entry.get("created_by", "")
        if not args.no_trunc and len(command) > 45:
            command = command[:44] + "…"
        rows.append({"ID": "<missing>", "CreatedSince": ago(when), "CreatedBy": command,
                     "Size": human_size(size), "Comment": entry.get("comment", "")})
    if rows:
        rows[0]["ID"] = resolved.config_descriptor.digest.removeprefix("sha256:")[:12]
    if args.quiet:
        out("\n".join(r["ID"] for r in rows))
        return 0
    out(emit(rows, [("IMAGE", "ID"), ("CREATED", "CreatedSince"), ("CREATED BY", "CreatedBy"),
                    ("SIZE", "Size"), ("COMMENT", "Comment")], args.format))
    return 0


def _progress(quiet: bool, label: str):
    from ctl.progress import Bar

    return None if quiet else Bar(label)


def load(args) -> int:
    source = args.input
    if source is None:
        if sys.stdin.isatty():
            raise InvalidArgument("requested load from stdin, but stdin is a terminal: use -i FILE")
        source = sys.stdin.buffer
    return _import(args, source, None)


def import_(args) -> int:
    source = sys.stdin.buffer if args.file == "-" else args.file
    return _import(args, source, args.reference)


def _import(args, source, name) -> int:
    from ctl.client.images import familiar

    bar = _progress(args.quiet, "Loading")
    try:
        images = client(args).images.import_archive(
            source, name=name, progress=bar.update if bar else None,
            platform=args.platform, all_platforms=args.all_platforms,
        )
    finally:
        if bar:
            bar.close()
    for image in images:
        out(f"Loaded image: {familiar(image.name)}")
    return 0


def save(args) -> int:
    if args.output is None and sys.stdout.isatty():
        raise InvalidArgument("cowardly refusing to write an archive to a terminal: use -o FILE or redirect")
    bar = _progress(args.output is None, "Saving")
    if args.output:
        bar = _progress(False, "Saving")
        import os

        tmp = args.output + ".tmp"
        try:
            with open(tmp, "wb") as f:
                client(args).images.export(args.images, f, progress=bar.update if bar else None,
                                           platform=args.platform, all_platforms=args.all_platforms)
            os.replace(tmp, args.output)
        finally:
            if bar:
                bar.close()
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        client(args).images.export(args.images, sys.stdout.buffer, platform=args.platform,
                                   all_platforms=args.all_platforms)
        sys.stdout.buffer.flush()
    return 0


def pull(args) -> int:
    from ctl.client.images import familiar, normalize
    from ctl.progress import LayerBoard

    board = None if args.quiet else LayerBoard()
    try:
        image = client(args).images.pull(
            args.image, platform=args.platform, all_platforms=args.all_platforms,
            progress=board.update if board else None, insecure=args.insecure_registry,
        )
    finally:
        if board:
            board.close()
    if not args.quiet:
        out(f"Digest: {image.target.digest}")
        out(f"Status: Downloaded image for {familiar(image.name)}")
    out(normalize(args.image))
    return 0


def push(args) -> int:
    from ctl.progress import LayerBoard

    board = None if args.quiet else LayerBoard()
    try:
        client(args).images.push(args.image, platform=args.platform,
                                 progress=board.update if board else None,
                                 insecure=args.insecure_registry)
    finally:
        if board:
            board.close()
    return 0


def _registry_host(server: str) -> str:
    server = server.removeprefix("https://").removeprefix("http://").rstrip("/")
    if server in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        return "docker.io"
    return server.split("/", 1)[0]


def login(args) -> int:
    from runtimed.images.registry import credentials

    host = _registry_host(args.server)
    username = args.username
    password = args.password
    if args.password_stdin:
        if args.password:
            raise InvalidArgument("--password and --password-stdin are mutually exclusive")
        password = sys.stdin.readline().rstrip("\n")
    if not username:
        if not sys.stdin.isatty():
            raise InvalidArgument("cannot prompt for a username: stdin is not a terminal; use -u")
        username = input("Username: ")
    if password is None:
        import getpass

        password = getpass.getpass("Password: ")
    if not username or not password:
        raise InvalidArgument("username and password are required")
    path = credentials.store(host, username, password)
    out(f"Login Succeeded (credentials stored in {path})")
    return 0


def logout(args) -> int:
    from runtimed.errors import NotFound
    from runtimed.images.registry import credentials

    host = _registry_host(args.server)
    try:
        credentials.erase(host)
    except NotFound:
        out(f"Not logged in to {host}")
        return 0
    out(f"Removing login credentials for {host}")
    return 0
