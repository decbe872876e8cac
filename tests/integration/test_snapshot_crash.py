"""kill -9 of runtimed in the middle of an unpack: the next start repairs the snapshot
store (no half-built or half-removed tree, no mount left), and importing again completes
the chain with the right content."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from runtimed.images.unpack import chain_ids
from runtimed.snapshots import mount as mountlib
from tests import testimages

MD = [("containerd-namespace", "default")]


@pytest.fixture(autouse=True)
def _extract_while_unpacking(monkeypatch):
    """Layers staged during the import (diff/staging.py) are moved into place in a
    millisecond, too quick to kill the daemon in the middle: this crash is the one
    of an extraction. (A crash while staging leaves only the staging directory, which
    tests/unit/test_diff_staging.py shows the next start empties.)"""
    monkeypatch.setenv("RUNTIMED_LAYER_STAGING", "0")


def big_image(path) -> list[str]:
    layout = testimages.Layout()
    layers = []
    for n in range(3):
        tar = testimages.Layer().dir("data").file(f"data/blob{n}", os.urandom(24 << 20)).tar()
        layers.append((testimages.gzip_bytes(tar, level=1), testimages.sha256(tar)))
    manifest, _ = layout.image(layers, {}, testimages.host_arch())
    layout.write(path, [testimages.named(manifest, "docker.io/test/big:latest")])
    return [diff for _, diff in layers]


def names(daemon) -> dict[str, int]:
    stub = snapshots_pb2_grpc.SnapshotsStub(daemon.channel())
    return {i.name: i.kind for r in stub.List(pb.ListSnapshotsRequest(), metadata=MD)
            for i in r.info}


def test_kill9_during_unpack_then_restart_and_reimport(daemon, tmp_path):
    archive = tmp_path / "big.tar"
    chain = chain_ids(big_image(archive))
    importer = subprocess.Popen(["ctr", "-a", daemon.address, "images", "import", str(archive)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = names(daemon)
            if chain[0] in found and any(n.startswith("extract-") for n in found):
                break  # the second layer is being extracted right now
            time.sleep(0.01)
        else:
            raise AssertionError("the unpack never reached its second layer")
        daemon.kill9()
    finally:
        importer.wait(30)

    daemon.start()
    store = daemon.root / "snapshots" / "overlayfs" / "snapshots"
    leftovers = [e for e in os.listdir(store) if not e.isdigit()]
    assert leftovers == []
    assert not [p for p in mountlib.mountpoints() if p.startswith(str(daemon.base))]
    assert os.listdir(daemon.root / "tmpmounts") == []

    daemon.ctr("images", "import", str(archive))
    found = names(daemon)
    assert all(found[c] == pb.COMMITTED for c in chain)
    view = daemon.ctr("snapshots", "view", "--mounts", "check", chain[-1]).stdout
    target = tmp_path / "view"
    target.mkdir()
    import json

    mountlib.mount_all([mountlib.Mount(m["Type"], m["Source"], m["Options"])
                        for m in json.loads(view)], target)
    try:
        assert sorted(os.listdir(target / "data")) == ["blob0", "blob1", "blob2"]
        assert all((target / "data" / f"blob{n}").stat().st_size == 24 << 20 for n in range(3))
    finally:
        mountlib.unmount_all(target)
