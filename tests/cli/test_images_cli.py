"""ctl load/import, images, image inspect, tag, rmi, history, save — against real runtimed."""

from __future__ import annotations

import json
import tarfile

from tests.cli.conftest import Ctl


def test_load_lists_and_inspects(ctl, test_images):
    image = test_images["busybox"]
    result = ctl("load", "-i", image.archive)
    assert "Loaded image: busybox:latest" in result.stdout
    table = ctl("images").stdout.splitlines()
    assert table[0].split()[:3] == ["REPOSITORY", "TAG", "IMAGE"]
    assert table[1].split()[:2] == ["busybox", "latest"]
    config_digest = image.configs[0]
    assert ctl("images", "-q").stdout.split() == [config_digest.removeprefix("sha256:")[:12]]
    assert ctl("images", "--no-trunc", "-q").stdout.split() == [config_digest]
    doc = json.loads(ctl("image", "inspect", "busybox").stdout)[0]
    assert doc["Id"] == config_digest
    assert doc["Target"]["digest"] == image.target["digest"]
    assert doc["RootFS"]["diff_ids"]
    assert ctl("inspect", "--format", "{{.Os}}/{{.Architecture}}", "busybox").stdout.strip().startswith("linux/")
    assert ctl("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.strip() == "busybox:latest"


def test_load_from_stdin_and_docker_archive(ctl, test_images):
    with open(test_images["busybox-docker"].archive, "rb") as f:
        result = ctl("load", input=f.read())
    assert b"Loaded image: busybox:latest" in result.stdout
    assert json.loads(ctl("image", "inspect", "busybox").stdout)[0]["Id"] == test_images["busybox-docker"].configs[0]


def test_import_with_a_name(ctl, test_images):
    ctl("import", test_images["multilayer"].archive, "example.com/renamed:v1")
    names = ctl("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
    assert "example.com/renamed:v1" in names


def test_tag_rmi(ctl, busybox):
    ctl("tag", "busybox", "localhost:5000/mine:1")
    names = ctl("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
    assert sorted(names) == ["busybox:latest", "localhost:5000/mine:1"]
    ids = set(ctl("images", "-q").stdout.split())
    assert len(ids) == 1  # one image, two names
    out = ctl("rmi", "localhost:5000/mine:1").stdout
    assert "Untagged: localhost:5000/mine:1" in out
    assert ctl("images", "--format", "{{.Repository}}").stdout.split() == ["busybox"]
    missing = ctl("rmi", "nope:1", check=False)
    assert missing.returncode == 1 and "no such image" in missing.stderr


def test_history(ctl, busybox):
    rows = ctl("history", "busybox").stdout.splitlines()
    assert rows[0].split()[:2] == ["IMAGE", "CREATED"]
    assert len(rows) >= 2


def test_save_round_trip(ctl, busybox, tmp_path, test_images):
    archive = tmp_path / "out.tar"
    ctl("save", "-o", str(archive), "busybox")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "index.json" in names and "manifest.json" in names
    other = Ctl(ctl.address, namespace="copy")
    other("load", "-i", str(archive))
    assert other("images", "--no-trunc", "-q").stdout.split() == [test_images["busybox"].configs[0]]
    piped = ctl("save", "busybox", input=b"")  # stdout is a pipe here: allowed
    assert piped.stdout[257:262] == b"ustar"  # a tar header


def test_bad_archive_is_one_clear_line(ctl, tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar archive" * 100)
    result = ctl("load", "-i", str(bad), check=False)
    assert result.returncode == 125
    assert result.stderr.startswith("ctl: ") and "Traceback" not in result.stderr
