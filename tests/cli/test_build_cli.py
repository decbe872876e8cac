"""`ctl build` against a real runtimed: RUN in real containers, layers, cache, stages."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

import pytest

from tests.cli.conftest import Ctl
from tests.registry_server import registry  # noqa: F401 - fixture

NAMESPACE = "buildtests"  # not `default`: the leak check then sees only these tests' containers


@pytest.fixture
def ctl(ctl):
    """The conftest `ctl`, in a namespace of these tests' own."""
    return Ctl(ctl.address, NAMESPACE)


def _context(tmp_path: Path, dockerfile: str, files: dict[str, str] | None = None) -> Path:
    ctx = tmp_path / "ctx"
    ctx.mkdir(exist_ok=True)
    (ctx / "Dockerfile").write_text(dockerfile)
    for name, text in (files or {}).items():
        path = ctx / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return ctx


def _config(ctl: Ctl, name: str) -> dict:
    return json.loads(ctl("image", "inspect", name).stdout)[0]


MULTI_STEP = """\
FROM busybox
RUN echo built > /built.txt && echo output-of-run
COPY hello.txt /app/
ENV GREETING="hello there" OTHER=x
WORKDIR /app
RUN chown 1000 /app
USER 1000
CMD ["sh", "-c", "cat /built.txt hello.txt; echo $GREETING; pwd; id -u"]
"""


def test_multi_step_build_runs(ctl, busybox, tmp_path):
    ctx = _context(tmp_path, MULTI_STEP, {"hello.txt": "from the context\n"})
    built = ctl("build", "-t", "app:1", "-t", "app:2", str(ctx))
    out = built.stdout
    assert "Step 1/8 : FROM busybox" in out and "Step 8/8 : CMD" in out
    assert "output-of-run" in out and "---> Running in" in out
    assert "Successfully tagged app:1" in out and "Successfully tagged app:2" in out
    ran = ctl("run", "--rm", "app:1")
    assert ran.stdout == "built\nfrom the context\nhello there\n/app\n1000\n"
    # the user's own command still sees the image's env, workdir and user
    assert ctl("run", "--rm", "app:2", "sh", "-c", "echo $OTHER; ls -n /app/hello.txt").stdout.split()[:4] == [
        "x", "-rw-r--r--", "1", "0"]
    one = _config(ctl, "app:1")
    assert one["Target"]["digest"] == _config(ctl, "app:2")["Target"]["digest"]


def test_rebuild_hits_the_cache_with_the_same_digest(ctl, busybox, tmp_path):
    ctx = _context(tmp_path, MULTI_STEP.replace("echo built", "sleep 1; echo built"),
                   {"hello.txt": "x\n"})
    start = time.monotonic()
    first = ctl("build", "-t", "cached", str(ctx))
    first_time = time.monotonic() - start
    assert "Using cache" not in first.stdout
    digest = _config(ctl, "cached")["Target"]["digest"]
    start = time.monotonic()
    second = ctl("build", "-t", "cached", str(ctx))
    second_time = time.monotonic() - start
    assert second.stdout.count("Using cache") == 7  # every step after FROM
    assert "Running in" not in second.stdout
    assert second_time < first_time - 1
    assert _config(ctl, "cached")["Target"]["digest"] == digest
    # a changed source invalidates that step and everything after it, not before
    (ctx / "hello.txt").write_text("changed\n")
    third = ctl("build", "-t", "cached", str(ctx))
    assert third.stdout.split("Step 3/8")[0].count("Using cache") == 1
    assert "Using cache" not in third.stdout.split("Step 3/8")[1].split("Step 4/8")[0]
    assert _config(ctl, "cached")["Target"]["digest"] != digest
    fresh = ctl("build", "--no-cache", "-t", "cached2", str(ctx))
    assert "Using cache" not in fresh.stdout and "Running in" in fresh.stdout


def test_multi_stage_copy_from_and_target(ctl, busybox, tmp_path):
    ctx = _context(tmp_path, """\
ARG BASE=busybox
FROM ${BASE} AS builder
RUN mkdir /out && echo artifact > /out/a.txt && echo junk > /junk
FROM builder AS unused
RUN false
FROM scratch
COPY --from=builder /out/a.txt /a.txt
COPY --from=0 /bin/busybox /bin/sh
CMD ["/bin/sh", "-c", "echo $(cat /a.txt); ls /"]
""")
    built = ctl("build", "-t", "staged", str(ctx))
    assert "RUN false" not in built.stdout  # a stage nothing needs is not built
    ran = ctl("run", "--rm", "staged")
    assert ran.stdout.startswith("artifact\n") and "a.txt" in ran.stdout.split()
    assert "junk" not in ran.stdout
    target = ctl("build", "--target", "builder", "-t", "first", str(ctx))
    assert "Step 2/2" in target.stdout and "scratch" not in target.stdout
    assert ctl("run", "--rm", "first", "cat", "/junk").stdout == "junk\n"
    missing = ctl("build", "--target", "nope", str(ctx), check=False)
    assert missing.returncode == 1 and "nope" in missing.stderr


def test_failing_run_is_one_clear_line_and_leaves_nothing(ctl, busybox, tmp_path, daemon):
    ctx = _context(tmp_path, "FROM busybox\nRUN echo before > /x\nRUN echo oops; exit 3\n")
    failed = ctl("build", "-t", "broken", str(ctx), check=False)
    assert failed.returncode == 1
    assert failed.stderr.strip().count("\n") == 0
    assert "line 3" in failed.stderr and "echo oops; exit 3" in failed.stderr
    assert "non-zero code: 3" in failed.stderr
    assert "oops" in failed.stdout
    assert ctl("images", "-q", "broken").stdout == ""
    assert ctl("ps", "-a", "-q").stdout == ""
    assert daemon.ctr("leases", "ls", "-q", namespace=NAMESPACE).stdout.strip() == ""
    snapshots = daemon.ctr("snapshots", "ls", namespace=NAMESPACE).stdout
    assert "Active" not in snapshots and "View" not in snapshots


def test_dockerignore_excludes_files(ctl, busybox, tmp_path):
    ctx = _context(tmp_path, "FROM busybox\nCOPY . /ctx/\nCMD [\"ls\", \"-a\", \"/ctx\", \"/ctx/keep\"]\n", {
        ".dockerignore": "secret.txt\n*.log\nkeep/*.tmp\n",
        "secret.txt": "s", "a.log": "l", "ok.txt": "o", "keep/k.txt": "k", "keep/x.tmp": "t",
    })
    ctl("build", "-t", "ignored", str(ctx))
    listing = ctl("run", "--rm", "ignored").stdout.split()
    assert "ok.txt" in listing and "Dockerfile" in listing and "k.txt" in listing
    assert "secret.txt" not in listing and "a.log" not in listing and "x.tmp" not in listing


def test_add_extracts_local_tar_and_refuses_urls(ctl, busybox, tmp_path):
    ctx = _context(tmp_path, "FROM busybox\nADD files.tar.gz /opt/\nADD plain.txt /opt/plain\n",
                   {"plain.txt": "p\n"})
    data = b"inside the archive\n"
    with tarfile.open(ctx / "files.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("dir/file.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    ctl("build", "-t", "added", str(ctx))
    out = ctl("run", "--rm", "added", "cat", "/opt/dir/file.txt", "/opt/plain").stdout
    assert out == "inside the archive\np\n"
    (ctx / "Dockerfile").write_text("FROM busybox\nADD http://example.com/x /x\n")
    refused = ctl("build", str(ctx), check=False)
    assert refused.returncode == 1 and "line 2" in refused.stderr and "network" in refused.stderr


def test_build_args_labels_quiet_and_metadata(ctl, busybox, tmp_path):
    ctx = _context(tmp_path, """\
FROM busybox
ARG WHO=nobody
ARG UNUSED_DEFAULT=1
ENV GREETING=hello-${WHO}
LABEL org.example.who=${WHO}
EXPOSE 8080 53/udp
VOLUME /data
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s --retries=2 CMD true
ONBUILD RUN echo later
ENTRYPOINT ["/bin/echo"]
RUN echo "$WHO" > /who
""")
    quiet = ctl("build", "-q", "--build-arg", "WHO=ctl", "--label", "extra=yes", "-t", "meta",
                str(ctx))
    assert quiet.stdout.strip().startswith("sha256:") and "Step" not in quiet.stdout
    assert ctl("run", "--rm", "meta", "hi").stdout == "hi\n"
    assert ctl("run", "--rm", "--entrypoint", "cat", "meta", "/who").stdout == "ctl\n"
    inspected = ctl("image", "inspect", "--format", "json", "meta").stdout
    assert "hello-ctl" in inspected and "org.example.who" in inspected


def test_dockerfile_errors_and_missing_sources(ctl, busybox, tmp_path):
    ctx = _context(tmp_path, "FROM busybox\nRUN true\nBOGUS x\n")
    bad = ctl("build", str(ctx), check=False)
    assert bad.returncode == 1 and "line 3" in bad.stderr and "BOGUS" in bad.stderr
    (ctx / "Dockerfile").write_text("FROM busybox\nCOPY absent.txt /\n")
    missing = ctl("build", str(ctx), check=False)
    assert missing.returncode == 1 and "absent.txt" in missing.stderr and "line 2" in missing.stderr
    (ctx / "Dockerfile").write_text("FROM 127.0.0.1:9/nosuchimage:1\n")  # nothing listens
    base = ctl("build", str(ctx), check=False)
    assert base.returncode == 1 and "nosuchimage" in base.stderr and "pulling" in base.stderr
    alt = tmp_path / "Other.dockerfile"
    alt.write_text("FROM busybox\nCMD [\"echo\", \"from -f\"]\n")
    ctl("build", "-f", str(alt), "-t", "alt", str(ctx))
    assert ctl("run", "--rm", "alt").stdout == "from -f\n"


def test_base_image_pulled_from_the_registry(ctl, busybox, tmp_path, registry):  # noqa: F811
    ref = f"{registry.host}/base/busybox:1"
    ctl("tag", "busybox", ref)
    ctl("push", ref)
    other = Ctl(ctl.address, namespace="fresh")
    ctx = _context(tmp_path, f"FROM {ref}\nRUN echo on-pulled > /x\n")
    other("build", "-t", "onpulled", str(ctx))
    assert other("run", "--rm", "onpulled", "cat", "/x").stdout == "on-pulled\n"


def test_build_push_and_pull_in_another_namespace(ctl, busybox, tmp_path, registry):  # noqa: F811
    ref = f"{registry.host}/built/app:1"
    ctx = _context(tmp_path, "FROM busybox\nRUN echo pushed > /p\nCMD [\"cat\", \"/p\"]\n")
    ctl("build", "-t", ref, str(ctx))
    ctl("push", ref)
    other = Ctl(ctl.address, namespace="puller")
    other("pull", ref)
    assert other("run", "--rm", "--pull", "never", ref).stdout == "pushed\n"


def test_stdin_dockerfile_network_modes_and_history(ctl, busybox):
    dockerfile = "FROM busybox\nRUN ls /sys/class/net > /default-net\n" \
                 "RUN --network=host ls /sys/class/net > /host-net\n"
    built = ctl("build", "-t", "nets", "-", input=dockerfile)
    assert "Successfully tagged nets:latest" in built.stdout
    default_net = ctl("run", "--rm", "nets", "cat", "/default-net").stdout.split()
    host_net = ctl("run", "--rm", "nets", "cat", "/host-net").stdout.split()
    assert default_net == ["lo"]  # RUN has an empty network namespace by default
    # the host's links (others come and go while tests run: compare the overlap)
    assert set(host_net) & set(os.listdir("/sys/class/net")) - {"lo"}
    history = ctl("history", "--no-trunc", "nets").stdout
    assert "/bin/sh -c ls /sys/class/net > /default-net" in history


def test_untagged_build_is_a_dangling_image_run_by_its_id(ctl, busybox, tmp_path):
    ctx = _context(tmp_path, 'FROM busybox\nCMD ["echo", "no tag"]\n')
    built = ctl("build", str(ctx)).stdout
    assert "Successfully built" in built and "Successfully tagged" not in built
    short = built.split("Successfully built ")[1].split()[0]
    row = next(r.split() for r in ctl("images").stdout.splitlines()[1:] if short in r)
    assert row[:3] == ["<none>", "<none>", short]  # as `docker images` shows it
    assert ctl("run", "--rm", short).stdout == "no tag\n"
    assert json.loads(ctl("image", "inspect", short).stdout)[0]["RepoTags"] == []
    removed = ctl("rmi", short).stdout
    assert "Untagged" not in removed and "Deleted: sha256:" in removed
    assert short not in ctl("images").stdout
