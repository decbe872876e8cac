"""tests/testimages.py: deterministic, cached, and the images hold what tests rely on."""

from __future__ import annotations

import gzip
import io
import json
import stat
import subprocess
import sys
import tarfile

from tests import testimages


def blobs(path):
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isreg()}


def layer_members(archive, digest) -> dict[str, tarfile.TarInfo]:
    data = gzip.decompress(blobs(archive)["blobs/sha256/" + digest.split(":")[1]])
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return {m.name: m for m in tf.getmembers()}


def test_deterministic_across_fresh_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNTIMED_TESTIMAGES_CACHE", str(tmp_path / "cache1"))
    first = testimages.build(tmp_path / "out1")
    monkeypatch.setenv("RUNTIMED_TESTIMAGES_CACHE", str(tmp_path / "cache2"))
    second = testimages.build(tmp_path / "out2")
    for key in first:
        assert first[key].target == second[key].target
        assert first[key].path.read_bytes() == second[key].path.read_bytes()
    # a second build is served from the cache: same inode, hard-linked
    again = testimages.build(tmp_path / "out3")
    assert again["busybox"].path.stat().st_ino == second["busybox"].path.stat().st_ino


def test_busybox_image_contents(tmp_path):
    bb = testimages.build(tmp_path)["busybox"]
    files = blobs(bb.path)
    index = json.loads(files["index.json"])
    assert index["manifests"][0]["annotations"]["io.containerd.image.name"] == bb.name
    config = json.loads(files["blobs/sha256/" + bb.configs[0].split(":")[1]])
    assert config["config"]["Cmd"] == ["sh"]
    assert config["os"] == "linux" and config["architecture"] == testimages.host_arch()
    assert any(e.startswith("PATH=") for e in config["config"]["Env"])
    members = layer_members(bb.path, bb.layers[0])
    assert members["bin/sh"].issym() and members["bin/sh"].linkname == "busybox"
    for applet in ("echo", "cat", "ls", "sleep", "true", "nc", "id", "hostname", "ps", "mount"):
        assert f"bin/{applet}" in members
    assert stat.S_IMODE(members["tmp"].mode) == 0o1777
    assert members["bin/busybox"].size == testimages.BUSYBOX.stat().st_size


def test_multilayer_has_the_tricky_entries(tmp_path):
    ml = testimages.build(tmp_path)["multilayer"]
    data = layer_members(ml.path, ml.layers[1])
    changes = layer_members(ml.path, ml.layers[2])
    assert data["data/hard"].islnk() and data["data/link"].issym() and data["data/fifo"].isfifo()
    assert data["data/setuid"].mode & stat.S_ISUID
    assert "data/.wh.remove-me.txt" in changes and ".wh.gone" in changes
    assert "opaque/.wh..wh..opq" in changes
    config = json.loads(blobs(ml.path)["blobs/sha256/" + ml.configs[0].split(":")[1]])
    assert config["config"]["Volumes"] == {"/data": {}}
    assert ml.layers[0] == testimages.build(tmp_path)["busybox"].layers[0]  # shared base


def test_script_entry_point(tmp_path):
    out = subprocess.run([sys.executable, testimages.__file__, str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    assert "busybox.tar" in out and (tmp_path / "images.json").exists()
    assert {p.name for p in tmp_path.iterdir()} >= {
        "busybox.tar", "busybox-docker.tar", "multilayer.tar", "multiplatform.tar"}
