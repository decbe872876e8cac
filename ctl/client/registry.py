"""Pull and push through runtimed's `runtimed.registry.v1.Registry` extension service.

The daemon speaks to the registry (verified, resumable, concurrent); the client streams
per-blob progress back to the caller and passes the user's stored credentials
(docker's config.json, read here because the daemon may run as another user).
"""

from __future__ import annotations

from collections.abc import Callable

from ctl.client.types import Descriptor, Image
from runtimed.images import platforms as platform_specs
from runtimed.images import reference as references

MODULE = "runtimed.api.registry.v1.registry"

# state names the service reports → the words docker prints
STATES = {
    "waiting": "Waiting", "downloading": "Downloading", "uploading": "Pushing",
    "exists": "Already exists", "mounted": "Mounted from another repository",
    "unpacking": "Extracting", "unpacked": "Pull complete", "done": "Download complete",
}

Progress = Callable[[str, str, int, int], None]


def _options(pb, host: str, insecure: bool):
    from runtimed.images.registry import credentials

    options = pb.TransferOptions(insecure=insecure)
    stored = credentials.load(host)
    if stored is not None:
        options.auth.username = stored.username
        options.auth.password = stored.password
        options.auth.identity_token = stored.identity_token
    return options


def _platform(p):
    from runtimed.api.containerd.types import platform_pb2

    return platform_pb2.Platform(os=p.os, architecture=p.architecture, variant=p.variant)


def _report(progress: Progress | None, blob) -> None:
    if progress is not None:
        progress(blob.digest, STATES.get(blob.state, blob.state), blob.offset, blob.total)


def pull(client, reference: str, *, platform: str | None = None, all_platforms: bool = False,
         progress: Progress | None = None, insecure: bool = False,
         snapshotter: str = "overlayfs") -> Image:
    """Fetch `reference` into the store and unpack it for this host."""
    stub = client.service(MODULE, "Registry")
    pb = stub.pb
    ref = references.parse(reference)
    request = pb.PullRequest(
        # the daemon unpacks layer N as soon as it is in, overlapping download and unpack
        reference=str(ref), all_platforms=all_platforms, unpack=True, snapshotter=snapshotter,
        options=_options(pb, ref.domain, insecure),
    )
    if platform:
        request.platforms.append(_platform(platform_specs.parse(platform)))
    image = None
    for response in stub.Pull(request):
        if response.WhichOneof("response") == "progress":
            _report(progress, response.progress)
        else:
            image = Image(name=response.result.name, target=Descriptor.from_pb(response.result.target))
    if image is None:
        from runtimed.errors import RuntimedError

        raise RuntimedError(f"pull of {reference} ended without a result")
    resolved = client.images.resolve(image, platform)
    if not client.images.is_unpacked(resolved, snapshotter):
        if progress is not None:
            progress(resolved.chain_id, "Extracting", 0, 0)
        client.images.unpack(resolved, snapshotter)
        if progress is not None:
            progress(resolved.chain_id, "Pull complete", 0, 0)
    return image


def push(client, name: str, *, reference: str = "", platform: str | None = None,
         progress: Progress | None = None, insecure: bool = False) -> Descriptor:
    stub = client.service(MODULE, "Registry")
    pb = stub.pb
    ref = references.parse(reference or name)
    request = pb.PushRequest(image=name, reference=reference,
                             options=_options(pb, ref.domain, insecure))
    if platform:
        request.platforms.append(_platform(platform_specs.parse(platform)))
    target = None
    for response in stub.Push(request):
        if response.WhichOneof("response") == "progress":
            _report(progress, response.progress)
        else:
            target = Descriptor.from_pb(response.result.target)
    return target
