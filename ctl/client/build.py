"""Build an image through runtimed's `runtimed.build.v1.Builder` extension service.

The client tars the context directory (leaving out what `.dockerignore` excludes, so
those bytes never travel) and streams it with the Dockerfile's text; the daemon does the
build and streams progress back.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ctl.client.types import Descriptor
from runtimed.errors import InvalidArgument, RuntimedError

MODULE = "runtimed.api.build.v1.build"
CHUNK = 1 << 20


@dataclass
class BuildProgress:
    """One progress report of a build."""

    kind: str  # step, running, log, cached, done, info
    text: str
    step: int = 0
    total: int = 0


@dataclass
class BuildResult:
    """The built image: its names and target descriptor."""

    names: list[str]
    target: Descriptor
    image_id: str


@dataclass
class BuildOptions:
    """docker build's options."""

    tags: list[str] = field(default_factory=list)
    build_args: dict[str, str] = field(default_factory=dict)
    target: str = ""
    no_cache: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    platform: str = ""
    network: str = ""


def context_tar(context_dir: str, out) -> None:
    """Write the context as a tar to `out`, minus what `.dockerignore` excludes."""
    from runtimed.build.context import Ignore

    ignore_file = os.path.join(context_dir, ".dockerignore")
    ignore = Ignore(open(ignore_file).read() if os.path.isfile(ignore_file) else "")
    with tarfile.open(fileobj=out, mode="w") as tar:
        for dirpath, dirnames, filenames in os.walk(context_dir):
            rel_dir = os.path.relpath(dirpath, context_dir)
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                if rel != ".dockerignore" and ignore.ignored(rel):
                    if name in dirnames and not any(r[0] for r in ignore.rules):
                        dirnames.remove(name)  # nothing below can be re-included
                    continue
                tar.add(os.path.join(dirpath, name), arcname=rel, recursive=False)


def _requests(pb, options, dockerfile: str, context_dir: str | None) -> Iterator:
    yield pb.BuildRequest(options=pb.BuildOptions(
        dockerfile=dockerfile, tags=options.tags, build_args=options.build_args,
        target=options.target, no_cache=options.no_cache, labels=options.labels,
        platform=options.platform, network=options.network,
    ))
    if context_dir is None:
        return
    with tempfile.TemporaryFile() as f:
        context_tar(context_dir, f)
        f.seek(0)
        while chunk := f.read(CHUNK):
            yield pb.BuildRequest(context=chunk)


def build(client, context_dir: str | None, dockerfile: str, options: BuildOptions,
          progress: Callable[[BuildProgress], None] | None = None) -> BuildResult:
    """Build `dockerfile` (its text) with `context_dir` as the context (None: empty)."""
    if context_dir is not None and not os.path.isdir(context_dir):
        raise InvalidArgument(f"unable to prepare context: path {context_dir!r} not found")
    stub = client.service(MODULE, "Builder")
    pb = stub.pb
    result = None
    for response in stub.Build(_requests(pb, options, dockerfile, context_dir)):
        if response.WhichOneof("response") == "progress":
            p = response.progress
            if progress is not None:
                progress(BuildProgress(p.kind, p.text, p.step, p.total))
        else:
            r = response.result
            result = BuildResult(list(r.names), Descriptor.from_pb(r.target), r.image_id)
    if result is None:
        raise RuntimedError("build ended without a result")
    return result
