"""ctl volume … and volumes on run: named, anonymous, the image's VOLUME, rm -v, restarts."""

from __future__ import annotations

import json

from tests.cli.conftest import Ctl


def test_named_volume_outlives_containers_and_restarts(ctl, busybox, daemon):
    assert ctl("volume", "create", "--label", "app=db", "data").stdout.strip() == "data"
    ctl("run", "--rm", "-v", "data:/data", "busybox", "sh", "-c", "echo persisted > /data/f")
    daemon.restart()
    assert ctl("run", "--rm", "-v", "data:/data:ro", "busybox", "cat", "/data/f").stdout == "persisted\n"
    assert ctl("run", "--rm", "--mount", "type=volume,source=data,target=/d,readonly", "busybox",
               "touch", "/d/x", check=False).returncode != 0
    listed = [json.loads(line) for line in ctl("volume", "ls", "--format", "json").stdout.splitlines()]
    assert [(v["Name"], v["Labels"]) for v in listed] == [("data", {"app": "db"})]
    assert ctl("volume", "ls", "-q", "--filter", "label=app=db").stdout.split() == ["data"]
    doc = json.loads(ctl("volume", "inspect", "data").stdout)[0]
    assert doc["Driver"] == "local" and doc["Mountpoint"].endswith("_data")


def test_in_use_anonymous_and_image_volumes(ctl, busybox, test_images):
    ctl("load", "-q", "-i", test_images["multilayer"].archive)
    # the image declares VOLUME /data: a fresh anonymous volume filled from the image
    out = ctl("run", "--name", "ml", "runtimed/multilayer", "cat", "/data/keep.txt").stdout
    assert out == "kept, and changed in layer 3\n"
    anonymous = [v for v in ctl("volume", "ls", "-q").stdout.split()]
    assert len(anonymous) == 1
    ctl("volume", "create", "shared")
    ctl("run", "-d", "--name", "holder", "-v", "shared:/s", "-v", "/scratch", "busybox", "sleep", "1000")
    refused = ctl("volume", "rm", "shared", check=False)
    assert refused.returncode == 1 and "in use" in refused.stderr
    assert len(ctl("volume", "ls", "-q").stdout.split()) == 3
    ctl("rm", "-f", "-v", "holder")  # its anonymous /scratch goes, the named one stays
    ctl("rm", "-v", "ml")
    assert ctl("volume", "ls", "-q").stdout.split() == ["shared"]
    ctl("volume", "rm", "shared")
    # run --rm removes the anonymous volumes it made
    ctl("run", "--rm", "-v", "/tmpdata", "busybox", "true")
    assert ctl("volume", "ls", "-q").stdout.strip() == ""


def test_prune(ctl, busybox):
    ctl("volume", "create", "keepme")
    ctl("run", "--name", "a", "-v", "/anon", "busybox", "true")
    ctl("rm", "a")  # without -v the anonymous volume stays behind
    assert len(ctl("volume", "ls", "-q").stdout.split()) == 2
    ctl("volume", "prune", "-f")
    assert ctl("volume", "ls", "-q").stdout.split() == ["keepme"]
    ctl("volume", "prune", "-a", "-f")
    assert Ctl(ctl.address)("volume", "ls", "-q").stdout.strip() == ""
