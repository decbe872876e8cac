"""Pull and push as the daemon offers them: under a lease, with the image record written
and the layers unpacked.

A pull holds a temporary lease (unless the caller gave one) so the garbage collector
cannot take blobs between their commit and the image record that roots them; the record
is created, or its target updated when the name exists (as `ctr pull` does), and only
then is the lease dropped. A pull that fails for a transient reason (connection, deadline,
cancellation) leaves its lease to expire (an hour): until then its partial downloads
stay, and a retry resumes them.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field

from runtimed.errors import (
    AlreadyExists,
    Canceled,
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    Unavailable,
)
from runtimed.images import reference as references
from runtimed.images.manifest import Descriptor
from runtimed.images.registry.hosts import RegistryHosts
from runtimed.images.registry.layers import LayerPipeline
from runtimed.images.registry.pull import Puller, PullOptions, PullResult
from runtimed.images.registry.push import Pusher, PushOptions
from runtimed.images.registry.remote import Progress, ProgressFn
from runtimed.metadata import images as image_records

log = logging.getLogger("runtimed.registry")

LEASE_EXPIRY = datetime.timedelta(hours=1)


@dataclass
class PullRequest:
    reference: str
    options: PullOptions = field(default_factory=PullOptions)
    labels: dict[str, str] = field(default_factory=dict)
    unpack: bool = False
    snapshotter: str = ""
    platform: str = ""  # the platform to unpack ("linux/arm64"); empty: this host's


class RegistryTransfers:
    """The daemon's pull and push: content store, image store, leases and the unpacker."""

    def __init__(
        self,
        content,
        images,
        leases,
        hosts: RegistryHosts,
        unpacker=None,
    ):
        self.content = content
        self.images = images
        self.leases = leases
        self.hosts = hosts
        self._unpacker = unpacker

    def pull(self, ns: str, request: PullRequest, progress: ProgressFn | None = None) -> PullResult:
        report = progress or (lambda p: None)
        options = request.options
        name = str(references.parse(request.reference))
        unpacker = self._unpacker if request.unpack else None
        if request.unpack and unpacker is None:
            raise FailedPrecondition("unpack requested but this daemon has no unpacker yet")
        temporary = None
        if options.lease is None:
            expires = datetime.datetime.now(datetime.UTC) + LEASE_EXPIRY
            temporary = self.leases.create(
                ns, labels={"containerd.io/gc.expire": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}
            ).id
            options.lease = temporary
        try:
            if unpacker is not None and not options.all_platforms:
                pipeline = self._pipeline(unpacker, ns, request.snapshotter, options.lease)
                options.on_layer = pipeline.on_layer
            result = Puller(self.content, self.hosts).pull(ns, name, options, report)
            self._record(ns, result, request.labels)
            if unpacker is not None:
                unpacker.unpack(
                    ns,
                    result.name,
                    snapshotter=request.snapshotter or None,
                    platform=request.platform or None,
                    lease=options.lease,
                )
                for manifest in result.manifests:
                    report(
                        Progress(
                            manifest.digest,
                            manifest.media_type,
                            "unpacked",
                            manifest.size,
                            manifest.size,
                        )
                    )
        except (Unavailable, DeadlineExceeded, Canceled):
            # transient: the temporary lease is left to expire (an hour) and keeps the
            # partial downloads, so a retry resumes them
            raise
        except BaseException:
            self._drop(ns, temporary)
            raise
        self._drop(ns, temporary)
        return result

    def _drop(self, ns: str, lease_id: str | None) -> None:
        if lease_id is not None:
            try:
                self.leases.delete(ns, lease_id)
            except NotFound:
                pass

    @staticmethod
    def _pipeline(unpacker, ns: str, snapshotter: str, lease: str | None) -> LayerPipeline:
        from runtimed.snapshots import DEFAULT

        name = snapshotter or DEFAULT
        sn = unpacker.snapshotters.get(name)
        if sn is None:
            raise NotFound(
                f"snapshotter {name!r} is not available "
                f"(have: {', '.join(sorted(unpacker.snapshotters)) or 'none'})"
            )
        return LayerPipeline(unpacker.content, sn, unpacker.differ, ns, lease)

    def _record(self, ns: str, result: PullResult, labels: dict[str, str]) -> None:
        target = image_records.Descriptor(
            result.target.media_type,
            result.target.digest,
            result.target.size,
            dict(result.target.annotations),
        )
        image = image_records.Image(result.name, target, dict(labels))
        try:
            self.images.create(ns, image)
        except AlreadyExists:
            paths = ["target", *(f"labels.{key}" for key in labels)]
            self.images.update(ns, image, paths)

    def push(
        self,
        ns: str,
        image_name: str,
        reference: str = "",
        options: PushOptions | None = None,
        progress: ProgressFn | None = None,
    ) -> tuple[str, Descriptor]:
        """Push the stored image `image_name` to `reference` (default: its own name)."""
        record = self.images.get(ns, image_name)
        target = Descriptor(
            record.target.media_type,
            record.target.digest,
            record.target.size,
            dict(record.target.annotations),
        )
        ref = str(references.parse(reference or image_name))
        pushed = Pusher(self.content, self.hosts).push(ns, ref, target, options, progress)
        return ref, pushed
