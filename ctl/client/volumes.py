"""Named volumes through runtimed's `runtimed.volumes.v1.Volumes` extension service."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from ctl.client.types import timestamp

MODULE = "runtimed.api.volumes.v1.volumes"


@dataclass
class Volume:
    """A named (or anonymous) volume and the containers using it."""

    name: str
    driver: str
    mountpoint: str
    labels: dict[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    anonymous: bool = False
    used_by: list[str] = field(default_factory=list)
    size: int = 0

    @classmethod
    def from_pb(cls, pb) -> Volume:
        return cls(pb.name, pb.driver, pb.mountpoint, dict(pb.labels), timestamp(pb.created_at),
                   pb.anonymous, list(pb.used_by), pb.size)


class VolumesAPI:
    def __init__(self, client):
        self._client = client

    @property
    def _stub(self):
        return self._client.service(MODULE, "Volumes")

    def create(self, name: str = "", labels: dict[str, str] | None = None, driver: str = "local",
               anonymous: bool = False) -> Volume:
        """A volume (an existing name is returned as it is, as Docker does)."""
        pb = self._stub.pb
        return Volume.from_pb(self._stub.Create(pb.CreateVolumeRequest(
            name=name, driver=driver, labels=labels or {}, anonymous=anonymous)).volume)

    def get(self, name: str) -> Volume:
        pb = self._stub.pb
        return Volume.from_pb(self._stub.Get(pb.GetVolumeRequest(name=name)).volume)

    def list(self, filters: list[str] | None = None, with_size: bool = False) -> list[Volume]:
        pb = self._stub.pb
        response = self._stub.List(pb.ListVolumesRequest(filters=filters or [], with_size=with_size))
        return [Volume.from_pb(v) for v in response.volumes]

    def remove(self, name: str, force: bool = False) -> int:
        pb = self._stub.pb
        return self._stub.Remove(pb.RemoveVolumeRequest(name=name, force=force)).reclaimed

    def prune(self, all: bool = False, filters: list[str] | None = None) -> tuple[list[str], int]:
        pb = self._stub.pb
        response = self._stub.Prune(pb.PruneVolumesRequest(filters=filters or [], all=all))
        return list(response.removed), response.reclaimed

    def populate(self, name: str, snapshotter: str, snapshot_key: str, path: str) -> bool:
        """Fill an empty volume from what the container's image has at `path`."""
        pb = self._stub.pb
        return self._stub.Populate(pb.PopulateVolumeRequest(
            name=name, snapshotter=snapshotter, snapshot_key=snapshot_key, path=path)).copied
