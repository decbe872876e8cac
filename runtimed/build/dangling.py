"""Names of dangling images: a build result (or any image) that has no tag.

containerd's image store needs a name for every record, so an untagged `docker build`
keeps its result under Docker's own name for it in the containerd image store,
`moby-dangling@<manifest digest>` (moby's daemon/containerd/image_delete.go): Docker
shows it as `<none>:<none>`, and so does `ctl images`. The record keeps the image from
the collector and makes it findable by its ID, as with docker.
"""

from __future__ import annotations

PREFIX = "moby-dangling@"


def name(digest: str) -> str:
    """The record name for a dangling image whose target is `digest`."""
    return PREFIX + digest


def is_dangling(image_name: str) -> bool:
    """Whether the name is a dangling image's."""
    return image_name.startswith(PREFIX)
