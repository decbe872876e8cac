"""containerd's own `ctr` pulls and pushes through runtimed (it does the HTTP itself and
writes through Content.Write / reads through Content.Read), against a real registry."""

from __future__ import annotations

import os

from runtimed.images.registry.credentials import Credentials
from runtimed.images.registry.pull import Puller, PullOptions
from runtimed.images.registry.push import Pusher, PushOptions
from tests.registry_server import PASSWORD, USERNAME, build_image, open_store

NS = "default"


def _seed(tmp_path, host, name, **push):
    store = open_store(tmp_path / "seed")
    image = build_image(store, NS, [{"etc/motd": b"hello\n"}, {"bin/x": os.urandom(500_000)}])
    Pusher(store).push(NS, f"{host}/{name}", image.target, PushOptions(**push))
    return store, image


def test_ctr_content_fetch_plain_http(daemon, registry, tmp_path):
    _, image = _seed(tmp_path, registry.host, "team/app:v1")
    ref = f"{registry.host}/team/app:v1"
    daemon.ctr("content", "fetch", "--plain-http", ref)
    images = daemon.ctr("images", "ls").stdout
    assert ref in images and image.target.digest in images
    blobs = set(daemon.ctr("content", "ls", "-q").stdout.split())
    assert {layer.digest for layer in image.layers} <= blobs


def test_ctr_images_pull_plain_http(daemon, registry, tmp_path):
    _, image = _seed(tmp_path, registry.host, "team/app:v1")
    ref = f"{registry.host}/team/app:v1"
    result = daemon.ctr("images", "pull", "--plain-http", ref)
    assert image.target.digest in result.stdout or "done" in result.stdout
    assert image.target.digest in daemon.ctr("images", "ls").stdout
    # the pull unpacked: ctr's own check for the image's snapshot says so
    check = daemon.ctr("images", "check").stdout
    assert ref in check and "complete" in check


def test_ctr_images_push_plain_http_round_trip(daemon, registry, tmp_path):
    seed, image = _seed(tmp_path, registry.host, "team/app:v1")
    daemon.ctr("content", "fetch", "--plain-http", f"{registry.host}/team/app:v1")
    target = f"{registry.host}/pushed/app:v2"
    daemon.ctr("images", "tag", f"{registry.host}/team/app:v1", target)
    daemon.ctr("images", "push", "--plain-http", target)
    fresh = open_store(tmp_path / "fresh")
    pulled = Puller(fresh).pull(NS, target)
    assert pulled.target.digest == image.target.digest
    assert b"".join(fresh.read_chunks(NS, image.layers[1].digest)) == b"".join(
        seed.read_chunks(NS, image.layers[1].digest)
    )


def test_ctr_push_with_basic_auth(daemon, registry_basic, tmp_path):
    creds = Credentials(USERNAME, PASSWORD)
    _, image = _seed(tmp_path, registry_basic.host, "team/app:v1", credentials=creds)
    ref = f"{registry_basic.host}/team/app:v1"
    user = f"{USERNAME}:{PASSWORD}"
    daemon.ctr("content", "fetch", "--plain-http", "--user", user, ref)
    daemon.ctr("images", "tag", ref, f"{registry_basic.host}/other/app:v1")
    daemon.ctr(
        "images", "push", "--plain-http", "--user", user, f"{registry_basic.host}/other/app:v1"
    )
    denied = daemon.ctr(
        "images",
        "push",
        "--plain-http",
        "--user",
        f"{USERNAME}:wrong",
        f"{registry_basic.host}/other/app:v1",
        check=False,
    )
    assert denied.returncode != 0
    assert "unauthorized" in (denied.stderr + denied.stdout).lower()
    fresh = open_store(tmp_path / "fresh")
    pulled = Puller(fresh).pull(
        NS, f"{registry_basic.host}/other/app:v1", PullOptions(credentials=creds)
    )
    assert pulled.target.digest == image.target.digest
