"""Plain records the client library returns: no protobuf objects leak to callers."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime


def timestamp(ts) -> datetime | None:
    """A protobuf Timestamp as an aware datetime; None when unset."""
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return None
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, UTC)


@dataclass
class Descriptor:
    """An OCI content descriptor: what a blob is, its digest and size."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_pb(cls, pb) -> Descriptor:
        return cls(pb.media_type, pb.digest, pb.size, dict(pb.annotations))

    def to_json(self) -> dict:
        out = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


@dataclass
class Image:
    """An image record: a name pointing at a manifest or index."""

    name: str
    target: Descriptor
    labels: dict[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @classmethod
    def from_pb(cls, pb) -> Image:
        return cls(
            name=pb.name,
            target=Descriptor.from_pb(pb.target),
            labels=dict(pb.labels),
            created_at=timestamp(pb.created_at),
            updated_at=timestamp(pb.updated_at),
        )


@dataclass(frozen=True)
class RootfsMount:
    """One mount of a container's root filesystem as its snapshotter describes it
    (containerd's `types.Mount`); Tasks.Create mounts the list at the bundle's rootfs."""

    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = ()

    @classmethod
    def from_pb(cls, pb) -> RootfsMount:
        return cls(pb.type, pb.source, pb.target, tuple(pb.options))


@dataclass
class Container:
    """A container record, its OCI spec decoded from JSON."""

    id: str
    image: str
    spec: dict
    labels: dict[str, str] = field(default_factory=dict)
    runtime: str = ""
    snapshotter: str = ""
    snapshot_key: str = ""
    created_at: datetime | None = None
    updated_at: datetime | None = None
    # The mounts of its snapshot, when known without asking: `containers.create` fills them
    # from Snapshots.Prepare's answer, and `tasks.create` then needs no Snapshots.Mounts.
    # None for a record from Get or List. Not part of the stored record (not compared).
    rootfs: list[RootfsMount] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_pb(cls, pb, rootfs=None) -> Container:
        """`rootfs`: the snapshot's mounts (protobuf `types.Mount`s), when at hand."""
        import json

        spec = {}
        if pb.spec.value:
            try:
                spec = json.loads(pb.spec.value)
            except ValueError:
                spec = {}
        return cls(
            id=pb.id,
            image=pb.image,
            spec=spec,
            labels=dict(pb.labels),
            runtime=pb.runtime.name,
            snapshotter=pb.snapshotter,
            snapshot_key=pb.snapshot_key,
            created_at=timestamp(pb.created_at),
            updated_at=timestamp(pb.updated_at),
            rootfs=None if rootfs is None else [RootfsMount.from_pb(m) for m in rootfs],
        )


@dataclass
class Process:
    """A task (the init process, `id` == container id) or an exec'd process."""

    container_id: str
    id: str
    pid: int
    status: str  # UNKNOWN, CREATED, RUNNING, STOPPED, PAUSED, PAUSING
    exit_status: int = 0
    exited_at: datetime | None = None
    terminal: bool = False

    @classmethod
    def from_pb(cls, pb) -> Process:
        enum = pb.DESCRIPTOR.fields_by_name["status"].enum_type
        value = enum.values_by_number.get(pb.status)
        return cls(
            container_id=pb.container_id,
            id=pb.id,
            pid=pb.pid,
            status=value.name if value else "UNKNOWN",
            exit_status=pb.exit_status,
            exited_at=timestamp(pb.exited_at),
            terminal=pb.terminal,
        )


@dataclass
class ExitStatus:
    """How a process ended: its exit code (128+N for signal N) and when."""

    code: int
    exited_at: datetime | None = None


def __getattr__(name: str):
    """Event and Stats live in ctl.client.monitor: `run` and `exec` need neither (their
    two dataclasses cost ~1 ms to create)."""
    if name in ("Event", "Stats"):
        from ctl.client import monitor

        return getattr(monitor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
