"""ctl build: docker's classic output (Step N/M, ---> Running in, Successfully tagged)."""

from __future__ import annotations

import os
import sys

from ctl.commands import client, describe_error, out
from runtimed.errors import InvalidArgument


def _pairs(items: list[str], what: str, environ: bool = False) -> dict[str, str]:
    result = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not key:
            raise InvalidArgument(f"invalid {what} {item!r}: use KEY=VALUE")
        if not eq and environ:  # docker: `--build-arg NAME` takes NAME from the environment
            if key not in os.environ:
                continue
            value = os.environ[key]
        result[key] = value
    return result


def _printer(quiet: bool):
    def show(p) -> None:
        if quiet:
            return
        if p.kind == "step":
            out(f"Step {p.step}/{p.total} : {p.text}")
        elif p.kind in ("running", "cached", "done", "info"):
            out(p.text)
        elif p.kind == "log":
            out(p.text)

    return show


def build(args) -> int:
    from ctl.client.build import BuildOptions
    from ctl.client.build import build as run_build
    from ctl.client.images import familiar

    try:
        context = None if args.context == "-" else args.context
        if args.file == "-" or args.context == "-":
            dockerfile = sys.stdin.read()
        else:
            path = args.file or os.path.join(args.context, "Dockerfile")
            try:
                with open(path) as f:
                    dockerfile = f.read()
            except FileNotFoundError:
                raise InvalidArgument(f"unable to prepare context: Dockerfile {path!r} not found") from None
        options = BuildOptions(
            tags=list(args.tag), build_args=_pairs(args.build_arg, "--build-arg", environ=True),
            target=args.target or "", no_cache=args.no_cache,
            labels=_pairs(args.label, "--label"), platform=args.platform or "",
            network=args.network or "",
        )
        result = run_build(client(args), context, dockerfile, options, _printer(args.quiet))
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - docker build exits 1 with one line
        message, _ = describe_error(exc)
        print(f"ctl: {message}", file=sys.stderr)
        return 1
    if args.quiet:
        out(result.image_id)
        return 0
    out(f"Successfully built {result.image_id.removeprefix('sha256:')[:12]}")
    for name in result.names:
        out(f"Successfully tagged {familiar(name)}")
    return 0
