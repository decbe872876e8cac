"""The real `ctr` against runtimed's Snapshots and Diff services: image import unpacks
(through the Go client's Prepare / Diff.Apply / Commit), the chain is listed, and
prepare / mounts / commit / rm / usage / info / label / diff behave as on containerd."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile

import pytest

from runtimed.images.unpack import chain_ids
from runtimed.snapshots import mount as mountlib
from tests import testimages


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return testimages.build(tmp_path_factory.mktemp("images"))


def snapshots(daemon, *extra, namespace=None) -> dict[str, tuple[str, str]]:
    """key -> (parent, kind) from `ctr snapshots [extra] ls`."""
    rows = daemon.ctr("snapshots", *extra, "ls", namespace=namespace).stdout.splitlines()[1:]
    out = {}
    for row in rows:
        cols = row.split()
        if len(cols) == 3:
            out[cols[0]] = (cols[1], cols[2])
        elif len(cols) == 2:
            out[cols[0]] = ("", cols[1])
    return out


def config_labels(daemon, digest: str) -> str:
    for line in daemon.ctr("content", "ls").stdout.splitlines():
        if line.startswith(digest):
            return line
    raise AssertionError(f"{digest} not in content")


def test_import_unpacks_the_chain(daemon, images):
    multi = images["multilayer"]
    daemon.ctr("images", "import", str(multi.path))
    chain = chain_ids(multi.diff_ids)
    listed = snapshots(daemon)
    assert set(chain) <= set(listed)
    for i, chain_id in enumerate(chain):
        parent, kind = listed[chain_id]
        assert kind == "Committed"
        assert parent == (chain[i - 1] if i else "")
    # containerd's labels: the layer blobs know their diff IDs, the config holds the chain
    line = config_labels(daemon, multi.configs[0])
    assert f"containerd.io/gc.ref.snapshot.overlayfs={chain[-1]}" in line
    for layer, diff_id in zip(multi.layers, multi.diff_ids, strict=True):
        assert f"containerd.io/uncompressed={diff_id}" in config_labels(daemon, layer)
    # a second image sharing the base layer reuses its snapshot
    daemon.ctr("images", "import", str(images["busybox"].path))
    assert len(snapshots(daemon)) == len(chain)
    # the chain lives as long as the image: removing it lets the GC take the snapshots
    daemon.ctr("images", "rm", "--sync", multi.name)
    assert set(snapshots(daemon)) == {chain[0]}


def test_prepare_mounts_commit_usage_info_label_rm(daemon, images, tmp_path):
    busybox = images["busybox"]
    daemon.ctr("images", "import", str(busybox.path))
    base = chain_ids(busybox.diff_ids)[-1]
    daemon.ctr("snapshots", "prepare", "work", base)
    assert snapshots(daemon)["work"] == (base, "Active")

    target = tmp_path / "mnt"
    target.mkdir()
    command = daemon.ctr("snapshots", "mounts", str(target), "work").stdout.strip()
    assert command.startswith("mount -t overlay overlay") and "lowerdir=" in command
    subprocess.run(command, shell=True, check=True)
    try:
        assert (target / "bin" / "busybox").exists()
        (target / "hello").write_text("hello\n")
        (target / "bin" / "ls").unlink()
    finally:
        mountlib.unmount_all(target)

    usage = daemon.ctr("snapshots", "usage", "work").stdout.splitlines()
    assert usage[1].split()[0] == "work" and int(usage[1].split()[-1]) >= 2

    layer = daemon.ctr("snapshots", "diff", "work", input=b"").stdout  # bytes: a gzip tar
    with tarfile.open(fileobj=io.BytesIO(layer)) as tf:
        names = tf.getnames()
    assert "hello" in names and "bin/.wh.ls" in names

    daemon.ctr("snapshots", "label", "work", "team=storage")
    info = json.loads(daemon.ctr("snapshots", "info", "work").stdout)
    assert info["Kind"] == "Active" and info["Parent"] == base
    assert info["Labels"]["team"] == "storage"

    daemon.ctr("snapshots", "commit", "done", "work")
    info = json.loads(daemon.ctr("snapshots", "info", "done").stdout)
    assert info["Kind"] == "Committed" and info["Parent"] == base
    assert "work" not in snapshots(daemon)

    refused = daemon.ctr("snapshots", "rm", base, check=False)
    assert refused.returncode != 0 and "failed precondition" in refused.stderr
    daemon.ctr("snapshots", "rm", "done")
    assert "done" not in snapshots(daemon)
    missing = daemon.ctr("snapshots", "info", "done", check=False)
    assert missing.returncode != 0 and "not found" in missing.stderr


def test_view_and_namespaces_and_native(daemon, images, tmp_path):
    busybox = images["busybox"]
    daemon.ctr("images", "import", str(busybox.path))
    base = chain_ids(busybox.diff_ids)[-1]
    out = daemon.ctr("snapshots", "view", "--mounts", "ro-view", base).stdout
    (m,) = json.loads(out)
    assert m["Type"] == "bind" and "ro" in m["Options"]
    # keys are per namespace: the other namespace sees nothing
    assert snapshots(daemon, namespace="other") == {}
    daemon.ctr("snapshots", "prepare", "ro-view", namespace="other")
    assert snapshots(daemon, namespace="other") == {"ro-view": ("", "Active")}
    daemon.ctr("snapshots", "rm", "ro-view", namespace="other")
    # (a view has no gc.root label, so as on containerd the collector may take it)
    # the native snapshotter answers by name, and unpacks too
    daemon.ctr("images", "import", "--snapshotter", "native", str(busybox.path))
    native = snapshots(daemon, "--snapshotter", "native")
    assert native[base] == ("", "Committed")
    out = daemon.ctr("snapshots", "--snapshotter", "native", "prepare", "--mounts", "n1",
                     base).stdout
    (m,) = json.loads(out)
    assert m["Type"] == "bind" and (daemon.root / "snapshots" / "native").as_posix() in m["Source"]
    daemon.ctr("snapshots", "--snapshotter", "native", "rm", "n1")


def test_ctr_run_uses_the_unpacked_chain(daemon, images):
    """`ctr run` finds the image unpacked (no second extraction), runs on an active
    snapshot over the chain, and `--rm` removes that snapshot again."""
    busybox = images["busybox"]
    daemon.ctr("images", "import", str(busybox.path))
    before = snapshots(daemon)
    out = daemon.ctr("run", "--rm", busybox.name, "run1", "sh", "-c",
                     "echo written > /tmp/f && cat /tmp/f && ls /bin | grep -c .").stdout.split()
    assert out[0] == "written" and int(out[1]) > 50
    assert snapshots(daemon) == before
