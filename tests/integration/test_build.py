"""The Builder service through the client library: config, history, layers, snapshots,
COPY semantics and the stream contract, on a real runtimed."""

from __future__ import annotations

import os
import time

import pytest

from ctl.client import Client
from ctl.client.build import BuildOptions, build
from runtimed.errors import InvalidArgument, NotFound
from runtimed.images.unpack import chain_ids
from tests import testimages
from tests.cli.conftest import Ctl


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict:
    return testimages.build(tmp_path_factory.mktemp("images"))


NAMESPACE = "buildtests"  # not `default`: the leak check then sees only these tests' containers


@pytest.fixture
def client(daemon, images):
    daemon.ctr("images", "import", images["busybox"].archive, namespace=NAMESPACE)
    with Client(daemon.address, NAMESPACE) as c:
        yield c


def _ctx(tmp_path, files: dict[str, str]) -> str:
    ctx = tmp_path / "ctx"
    for name, text in files.items():
        path = ctx / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    ctx.mkdir(exist_ok=True)
    return str(ctx)


DOCKERFILE = """\
FROM busybox
LABEL stage=one
RUN echo hi > /hi
EXPOSE 8080 53/udp
VOLUME ["/data"]
STOPSIGNAL SIGINT
HEALTHCHECK --interval=5s --retries=2 CMD wget -q localhost
ONBUILD RUN echo later
COPY a.txt /a.txt
SHELL ["/bin/sh", "-ec"]
CMD echo shell form
"""


def test_config_history_layers_and_snapshots(client, daemon, images, tmp_path):
    seen = []
    result = build(client, _ctx(tmp_path, {"a.txt": "a"}), DOCKERFILE,
                   BuildOptions(tags=["meta:1"], labels={"extra": "yes"}), seen.append)
    resolved = client.images.resolve("docker.io/library/meta:1")
    assert result.names == ["docker.io/library/meta:1"]
    assert result.image_id == resolved.config_descriptor.digest
    assert result.target.digest == resolved.image.target.digest
    config = resolved.config
    c = config["config"]
    assert c["Labels"] == {"stage": "one", "extra": "yes"}
    assert c["ExposedPorts"] == {"8080/tcp": {}, "53/udp": {}}
    assert c["Volumes"] == {"/data": {}}
    assert c["StopSignal"] == "SIGINT"
    assert c["Healthcheck"] == {"Test": ["CMD-SHELL", "wget -q localhost"],
                                "Interval": 5_000_000_000, "Retries": 2}
    assert c["OnBuild"] == ["RUN echo later"]
    assert c["Cmd"] == ["/bin/sh", "-ec", "echo shell form"]
    base = client.images.resolve("docker.io/library/busybox:latest")
    history = config["history"][len(base.config["history"]):]
    assert len(history) == 10
    assert history[1]["created_by"] == "/bin/sh -c echo hi > /hi"
    assert "empty_layer" not in history[1] and history[0]["empty_layer"] is True
    assert "COPY file:" in history[7]["created_by"]
    # one layer per filesystem step, on top of the base's
    assert len(resolved.layers) == len(base.layers) + 2
    assert len(config["rootfs"]["diff_ids"]) == len(resolved.layers)
    top = chain_ids(config["rootfs"]["diff_ids"])[-1]
    info = daemon.ctr("snapshots", "info", top, namespace=NAMESPACE).stdout
    assert "Committed" in info
    kinds = [p.kind for p in seen]
    assert kinds.count("step") == 11 and "done" in kinds and "cached" not in kinds
    again = []
    rebuilt = build(client, _ctx(tmp_path, {"a.txt": "a"}), DOCKERFILE,
                    BuildOptions(tags=["meta:1"], labels={"extra": "yes"}), again.append)
    assert [p.kind for p in again].count("cached") == 10  # every step after FROM: CACHED
    assert rebuilt.target.digest == result.target.digest


def test_copy_rules(client, daemon, tmp_path):
    files = {"dir/x.txt": "x", "dir/sub/y.txt": "y", "one.txt": "1\n", "g1.cfg": "g", "g2.cfg": "g"}
    ctx = _ctx(tmp_path, files)
    os.symlink("one.txt", os.path.join(ctx, "link"))
    build(client, ctx, """\
FROM busybox
WORKDIR /w
COPY dir /copied
COPY dir/ rel/
COPY one.txt /file-renamed
COPY one.txt /newdir/
COPY *.cfg /cfgs/
COPY --chown=1000:1001 one.txt /owned
COPY --chmod=600 one.txt /moded
COPY link /link
RUN mkdir /existing
COPY one.txt /existing
""", BuildOptions(tags=["copies"]))
    out = Ctl(daemon.address, NAMESPACE)("run", "--rm", "copies", "sh", "-c", """
        ls /copied /copied/sub /w/rel; cat /file-renamed /newdir/one.txt; ls /cfgs
        stat -c '%u:%g %a' /owned /moded; readlink /link; cat /existing/one.txt""").stdout
    assert out.split() == ["/copied:", "sub", "x.txt", "/copied/sub:", "y.txt", "/w/rel:", "sub",
                           "x.txt", "1", "1", "g1.cfg", "g2.cfg", "1000:1001", "644", "0:0", "600",
                           "one.txt", "1"]


def test_bad_requests_are_invalid_argument(client):
    with pytest.raises(InvalidArgument, match="line 1"):
        build(client, None, "RUN x\n", BuildOptions())
    stub = client.service("runtimed.api.build.v1.build", "Builder")
    pb = stub.pb
    with pytest.raises(InvalidArgument, match="options"):
        list(stub.Build(iter([pb.BuildRequest(context=b"x")])))
    with pytest.raises(InvalidArgument, match="tar"):
        list(stub.Build(iter([pb.BuildRequest(options=pb.BuildOptions(dockerfile="FROM busybox")),
                              pb.BuildRequest(context=b"not a tar" * 100)])))
    with pytest.raises(InvalidArgument, match="platform"):
        build(client, None, "FROM busybox\n", BuildOptions(platform="linux/s390x"))


def test_empty_context_and_scratch(client, daemon):
    result = build(client, None, "FROM scratch\nENV A=1\n", BuildOptions(tags=["empty"]))
    resolved = client.images.resolve("docker.io/library/empty:latest")
    assert resolved.layers == [] and result.image_id == resolved.config_descriptor.digest
    assert "A=1" in resolved.config["config"]["Env"]


def test_entrypoint_keeps_cmd_of_the_same_stage_only(client):
    build(client, None, 'FROM busybox\nCMD ["a"]\nENTRYPOINT ["e"]\n', BuildOptions(tags=["ep1"]))
    c = client.images.resolve("docker.io/library/ep1:latest").config["config"]
    assert c["Cmd"] == ["a"] and c["Entrypoint"] == ["e"]
    build(client, None, 'FROM ep1\nENTRYPOINT ["f"]\n', BuildOptions(tags=["ep2"]))
    c = client.images.resolve("docker.io/library/ep2:latest").config["config"]
    assert c["Cmd"] is None and c["Entrypoint"] == ["f"]


def test_from_platform_other_than_the_host_is_refused(client):
    with pytest.raises(InvalidArgument, match="line 2.*platform"):
        build(client, None, "ARG P=linux/s390x\nFROM --platform=$P busybox\n", BuildOptions())


def _leftovers(daemon) -> dict:
    return {
        "containers": daemon.ctr("containers", "ls", "-q", namespace=NAMESPACE).stdout.split(),
        "tasks": daemon.ctr("tasks", "ls", "-q", namespace=NAMESPACE).stdout.split(),
        "leases": daemon.ctr("leases", "ls", "-q", namespace=NAMESPACE).stdout.split(),
        "scratch snapshots": [
            line for line in daemon.ctr("snapshots", "ls", namespace=NAMESPACE).stdout.splitlines()
            if "Active" in line or "View" in line],
    }


def _start_slow_build(client):
    """A build whose RUN sleeps; returns the response stream once the RUN is running."""
    stub = client.service("runtimed.api.build.v1.build", "Builder")
    pb = stub.pb
    stream = stub.Build(iter([pb.BuildRequest(options=pb.BuildOptions(
        dockerfile="FROM busybox\nRUN echo started; sleep 60\n", tags=["slow"]))]))
    responses = iter(stream)  # kept alive by the caller: dropping it cancels the call
    for response in responses:
        if response.progress.kind == "log" and response.progress.text == "started":
            return stream, responses
    raise AssertionError("the RUN step never started")


def test_cancelled_build_leaves_nothing(client, daemon):
    stream, _responses = _start_slow_build(client)
    assert _leftovers(daemon)["tasks"]  # the RUN container is there while it runs
    stream.cancel()
    deadline = time.monotonic() + 20
    while any(_leftovers(daemon).values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _leftovers(daemon) == {"containers": [], "tasks": [], "leases": [],
                                  "scratch snapshots": []}
    with pytest.raises(NotFound):
        client.images.get("slow")


def test_daemon_crash_mid_build_is_cleaned_up_at_restart(client, daemon):
    _stream, _responses = _start_slow_build(client)
    daemon.kill9()
    daemon.start()
    assert _leftovers(daemon) == {"containers": [], "tasks": [], "leases": [],
                                  "scratch snapshots": []}
    # the same build works afterwards
    with Client(daemon.address, NAMESPACE) as fresh:
        build(fresh, None, "FROM busybox\nRUN echo again\n", BuildOptions(tags=["again"]))


def test_onbuild_triggers_run_in_the_child_build(client, daemon, tmp_path):
    build(client, None, "FROM busybox\nONBUILD RUN echo triggered > /t\nONBUILD ENV CHILD=1\n",
          BuildOptions(tags=["parent"]))
    parent = client.images.resolve("docker.io/library/parent:latest").config["config"]
    assert parent["OnBuild"] == ["RUN echo triggered > /t", "ENV CHILD=1"]
    seen = []
    build(client, None, "FROM parent\nRUN cat /t\n", BuildOptions(tags=["child"]), seen.append)
    assert any(p.kind == "info" and "2 build triggers" in p.text for p in seen)
    assert "triggered" in [p.text for p in seen if p.kind == "log"]
    child = client.images.resolve("docker.io/library/child:latest").config["config"]
    assert "OnBuild" not in child and "CHILD=1" in child["Env"]


def test_untagged_build_keeps_a_dangling_image(client, daemon, images):
    dockerfile = "FROM busybox\nRUN echo untagged > /hi\n"
    result = build(client, None, dockerfile, BuildOptions())
    assert result.names == []
    dangling = f"moby-dangling@{result.target.digest}"  # Docker's name in a containerd store
    assert [i.name for i in client.images.list() if i.target.digest == result.target.digest] \
        == [dangling]
    # a collection (the base image's removal, synchronous) keeps it: the record holds it
    daemon.ctr("images", "rm", "--sync", "docker.io/library/busybox:latest", namespace=NAMESPACE)
    short = result.image_id.removeprefix("sha256:")[:12]
    assert client.images.get(short).name == dangling
    ctl = Ctl(daemon.address, NAMESPACE)
    assert ctl("run", "--rm", short, "cat", "/hi").stdout == "untagged\n"
    assert ctl("run", "--rm", result.image_id, "cat", "/hi").stdout == "untagged\n"
    rows = ctl("images").stdout.splitlines()
    assert any(r.split()[:3] == ["<none>", "<none>", short] for r in rows)

    # tagging it by building it again with -t: the dangling record goes, the tag has it
    daemon.ctr("images", "import", images["busybox"].archive, namespace=NAMESPACE)
    tagged = build(client, None, dockerfile, BuildOptions(tags=["now-tagged"]))
    assert tagged.target.digest == result.target.digest
    names = [i.name for i in client.images.list() if i.target.digest == result.target.digest]
    assert names == ["docker.io/library/now-tagged:latest"]
    # an untagged rebuild of a tagged image adds no dangling record
    assert build(client, None, dockerfile, BuildOptions()).target.digest == result.target.digest
    names = [i.name for i in client.images.list() if i.target.digest == result.target.digest]
    assert names == ["docker.io/library/now-tagged:latest"]
    ctl("rmi", "now-tagged")


def test_an_untagged_result_racing_a_tagged_build_of_it_leaves_no_dangling_record(tmp_path):
    """An untagged build finds no image naming its manifest; before it records the
    dangling image, a tagged build of the same manifest creates its tag and drops the
    dangling record (none yet). The check and the creation are one transaction, so the
    tagged build's steps wait for it and drop the record: only the tag is left."""
    import threading
    import types

    from runtimed.build.builder import _Run
    from runtimed.images.manifest import Descriptor
    from runtimed.metadata.db import Database
    from runtimed.metadata.images import Image, ImageStore

    db = Database(tmp_path / "meta.db")
    store = ImageStore(db)
    target = Descriptor("application/vnd.oci.image.manifest.v1+json", "sha256:" + "1" * 64, 100)
    run = _Run.__new__(_Run)  # only what the two record steps use
    run.b, run.ns = types.SimpleNamespace(images=store), NAMESPACE

    def tagged_build() -> None:  # builder.py: create the tag, then drop the dangling record
        store.create(NAMESPACE, Image("docker.io/library/tagged:latest", target))
        run._drop_dangling(target)

    tagger = threading.Thread(target=tagged_build)
    listed = store.list

    def list_then_race(ns, filters=None):
        images = listed(ns, filters)
        if tagger.ident is None:  # the first listing: the tagged build runs now
            tagger.start()
            tagger.join(1.0)  # (it waits for the transaction: the join times out)
        return images

    store.list = list_then_race
    try:
        run._keep_untagged(target)
    finally:
        tagger.join(30)
        store.list = listed
    assert [i.name for i in store.list(NAMESPACE)] == ["docker.io/library/tagged:latest"]
    db.close()
