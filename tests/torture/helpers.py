"""Checks the torture tests share: metadata and content consistency after a crash, what a
daemon holds (fds, threads, memory, mounts), and which shims run."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from runtimed.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from runtimed.api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from runtimed.api.containerd.services.namespaces.v1 import namespace_pb2, namespace_pb2_grpc
from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from runtimed.api.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from runtimed.api.containerd.services.version.v1 import version_pb2_grpc
from tests.conftest import mounts_under

SNAPSHOTTERS = ("overlayfs", "native")
INDEX_TYPES = {"application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json"}
MANIFEST_TYPES = {"application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json"}


def md(namespace: str) -> tuple[tuple[str, str], ...]:
    return (("containerd-namespace", namespace),)


def version(channel: grpc.Channel) -> str:
    from google.protobuf import empty_pb2

    stub = version_pb2_grpc.VersionStub(channel)
    return stub.Version(empty_pb2.Empty(), timeout=10).version


def blob_path(root: Path, digest: str) -> Path:
    algorithm, hexpart = digest.split(":", 1)
    return root / "content" / "blobs" / algorithm / hexpart


def corrupt_blobs(root: Path) -> list[str]:
    """Blobs whose bytes do not hash to their name (re-hashes every committed blob)."""
    bad = []
    base = root / "content" / "blobs" / "sha256"
    for path in base.iterdir() if base.is_dir() else []:
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except FileNotFoundError:
            continue  # collected meanwhile: gone is not corrupt
        if h.hexdigest() != path.name:
            bad.append(path.name)
    return bad


def list_content(channel: grpc.Channel, namespace: str) -> dict[str, int]:
    """Digest → size of every blob the namespace holds."""
    return {i.digest: i.size for reply in content_pb2_grpc.ContentStub(channel).List(
        content_pb2.ListContentRequest(), metadata=md(namespace), timeout=30)
        for i in reply.info}


def _whole(root: Path, digest: str, size: int) -> bool:
    try:
        return blob_path(root, digest).stat().st_size == size
    except FileNotFoundError:
        return False


def _held_whole(content, namespace: str, root: Path, info) -> bool:
    """A listed blob is on disk whole, or the namespace no longer holds it.

    The GC may collect a blob between the List and the look at the disk: `ctr images
    import` writes an index that only its lease holds, collected 100 ms after the import
    ends, which is when a check after the import runs (it failed once in CI so). runtimed
    changes a blob's row and its file together under its metadata lock, which its reads
    wait for, so a blob still listed when asked again must be on disk: asked until the
    answers agree, a row with no file is still found."""
    for _ in range(3):
        if _whole(root, info.digest, info.size):
            return True
        try:
            info = content.Info(content_pb2.InfoRequest(digest=info.digest),
                                metadata=md(namespace), timeout=30).info
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return True  # collected meanwhile: gone is not broken
            raise
    return _whole(root, info.digest, info.size)


def _children(root: Path, media_type: str, digest: str) -> list[dict]:
    if media_type not in INDEX_TYPES | MANIFEST_TYPES:
        return []
    doc = json.loads(blob_path(root, digest).read_bytes())
    if media_type in INDEX_TYPES:
        return doc.get("manifests", [])
    return [doc["config"], *doc.get("layers", [])]


def metadata_problems(channel: grpc.Channel, root: Path) -> list[str]:
    """Every image's target (and what it references) is present, content the metadata
    lists exists on disk, and every snapshot's parent exists, in every namespace."""
    problems = []
    names = [n.name for n in namespace_pb2_grpc.NamespacesStub(channel).List(
        namespace_pb2.ListNamespacesRequest(), timeout=30).namespaces]
    images = images_pb2_grpc.ImagesStub(channel)
    content = content_pb2_grpc.ContentStub(channel)
    snapshots = snapshots_pb2_grpc.SnapshotsStub(channel)
    for name in names:
        for info in [i for reply in content.List(content_pb2.ListContentRequest(),
                                                 metadata=md(name), timeout=30)
                     for i in reply.info]:
            if not _held_whole(content, name, root, info):
                problems.append(f"{name}: content {info.digest} listed but not on disk whole")
        for image in images.List(images_pb2.ListImagesRequest(), metadata=md(name),
                                 timeout=30).images:
            pending = [{"mediaType": image.target.media_type, "digest": image.target.digest}]
            while pending:
                desc = pending.pop()
                if not blob_path(root, desc["digest"]).exists():
                    problems.append(f"{name}: image {image.name} misses {desc['digest']}")
                    continue
                pending += _children(root, desc["mediaType"], desc["digest"])
        for snapshotter in SNAPSHOTTERS:
            infos = [i for reply in snapshots.List(
                snapshots_pb2.ListSnapshotsRequest(snapshotter=snapshotter),
                metadata=md(name), timeout=30) for i in reply.info]
            keys = {i.name for i in infos}
            for info in infos:
                if info.parent and info.parent not in keys:
                    problems.append(f"{name}: snapshot {info.name} has no parent {info.parent}")
    return problems


@dataclass
class Task:
    namespace: str
    id: str
    pid: int
    status: int
    exit_status: int


def list_tasks(channel: grpc.Channel, namespaces: list[str]) -> dict[tuple[str, str], Task]:
    stub = tasks_pb2_grpc.TasksStub(channel)
    found = {}
    for name in namespaces:
        for t in stub.List(tasks_pb2.ListTasksRequest(), metadata=md(name), timeout=30).tasks:
            found[(name, t.id)] = Task(name, t.id, t.pid, t.status, t.exit_status)
    return found


def shim_pids(state: Path) -> set[int]:
    """Processes running shimd for this daemon (not the zygote that forks them)."""
    marker = str(state).encode()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline and b"shimd" in cmdline and b"zygote" not in cmdline:
            found.add(int(entry))
    return found


def orphan_problems(base: Path, state: Path, tasks: dict[tuple[str, str], Task]) -> list[str]:
    """Mounts and shims that belong to no task runtimed reports."""
    problems = []
    bundles = {str(state / "tasks" / ns / id) for ns, id in tasks}
    for target in mounts_under(base):
        if not any(target == b or target.startswith(b + "/") for b in bundles):
            problems.append(f"orphaned mount {target}")
    expected = set()
    for ns, id in tasks:
        try:
            expected.add(int((state / "tasks" / ns / id / "shim.pid").read_text()))
        except (OSError, ValueError):
            pass
    for pid in shim_pids(state):
        if pid not in expected and _alive(pid):
            problems.append(f"orphaned shim pid {pid}: {_cmdline(pid)}")
    return problems


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "?"


@dataclass
class Footprint:
    """What a daemon process holds; compared before and after load."""

    fds: int
    threads: int
    rss_kib: int
    mounts: int

    @classmethod
    def of(cls, pid: int, base: Path) -> Footprint:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        threads = len(os.listdir(f"/proc/{pid}/task"))
        rss = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
        return cls(fds, threads, rss, len(mounts_under(base)))
