"""Image archives through runtimed's `runtimed.images.v1.Archives` extension service.

The archive bytes are streamed to the daemon (which verifies every blob and unpacks), so
the client needs no access to the daemon's disk.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from ctl.client.types import Descriptor, Image
from runtimed.errors import InvalidArgument

MODULE = "runtimed.api.images.v1.archive"
CHUNK = 1 << 20


def _stub(client):
    return client.service(MODULE, "Archives")


def _requests(pb, source, options) -> Iterator:
    yield pb.ImportRequest(options=options)
    while True:
        data = source.read(CHUNK)
        if not data:
            return
        yield pb.ImportRequest(data=data)


def import_archive(client, source, *, name: str | None = None,
                   progress: Callable[[int, int], None] | None = None, snapshotter: str = "overlayfs",
                   platform: str | None = None, all_platforms: bool = False) -> list[Image]:
    stub = _stub(client)
    pb = stub.pb
    # the daemon unpacks as it imports; the client's pass below is a cheap check then, and
    # unpacks itself against a daemon that has no unpacker
    options = pb.ImportOptions(unpack=True, snapshotter=snapshotter, platform=platform or "",
                               all_platforms=all_platforms)
    opened = None
    total = 0
    if isinstance(source, str | os.PathLike):
        opened = source = open(source, "rb")
        total = os.fstat(source.fileno()).st_size
    try:
        imported: list[Image] = []
        for response in stub.Import(_requests(pb, source, options)):
            kind = response.WhichOneof("response")
            if kind == "progress" and progress and response.progress.action == "read":
                progress(response.progress.offset, total)
            elif kind == "result":
                imported = [
                    Image(name=i.name, target=Descriptor.from_pb(i.target))
                    for i in response.result.images
                ]
    finally:
        if opened is not None:
            opened.close()
    for image in imported:
        _unpack(client, image, snapshotter, platform)
    if name:
        if len(imported) != 1:
            raise InvalidArgument(
                f"the archive holds {len(imported)} images: a name can be given to exactly one"
            )
        imported = [client.images.tag(imported[0].name, name)]
    return imported


def export(client, names: list[str], destination, *, progress: Callable[[int, int], None] | None = None,
           platform: str | None = None, all_platforms: bool = False) -> int:
    stub = _stub(client)
    request = stub.pb.ExportRequest(names=names, all_platforms=all_platforms,
                                    platforms=[platform] if platform else [])
    written = 0
    for response in stub.Export(request):
        destination.write(response.data)
        written += len(response.data)
        if progress:
            progress(written, 0)
    return written


def _unpack(client, image: Image, snapshotter: str, platform: str | None) -> None:
    """Unpack for this host's platform; an image without one (or a daemon without
    snapshots) is left packed, and `containers.create` tries again."""
    from runtimed.errors import NotFound, Unimplemented

    try:
        resolved = client.images.resolve(image, platform)
    except NotFound:
        return
    try:
        if not client.images.is_unpacked(resolved, snapshotter):
            client.images.unpack(resolved, snapshotter)
    except Unimplemented:
        pass
