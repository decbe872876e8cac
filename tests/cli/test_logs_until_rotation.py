"""`ctl logs --until` and log rotation (`--log-opt max-size=… max-file=…`): the shim rotates
a detached container's log (also after a restart), ctl rotates its copy of a foreground run,
`ctl logs` reads the rotated set oldest first, `rm` removes it all."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from datetime import datetime

from ctl.client.logs import Follower, RotatingFile, open_set, rotated_paths, since, timestamp
from tests.cli.test_containers_cli import wait_for

STAMP = re.compile(r"^(\S+) (.*)$")


def status(ctl, name: str) -> str:
    return ctl("ps", "-a", "--filter", f"name={name}", "--format", "{{.State}}").stdout.strip()


def log_path(ctl, name: str) -> str:
    return ctl("inspect", "--format", "{{.LogPath}}", name).stdout.strip()


def stamped(ctl, name: str, *flags: str) -> list[tuple[str, str]]:
    lines = ctl("logs", "-t", *flags, name).stdout.splitlines()
    return [STAMP.match(line).groups() for line in lines]


def unix(stamp: str) -> float:
    return datetime.fromisoformat(stamp[:26] + "+00:00").timestamp()


def test_until_cuts_at_the_line_absolute_and_relative(ctl, busybox):
    # the pauses only give the lines distinct stamps; every cut is taken from those stamps
    ctl("run", "-d", "--name", "lgu-cut", "busybox", "sh", "-c",
        "echo one; sleep 0.3; echo two >&2; sleep 0.3; echo three; sleep 5; echo four")
    assert ctl("wait", "lgu-cut").stdout.strip() == "0"
    out = stamped(ctl, "lgu-cut")
    assert [text for _, text in out] == ["one", "three", "four"]
    first, third, fourth = (stamp for stamp, _ in out)
    # absolute: inclusive, as docker's; stderr is cut the same way
    upto_one = ctl("logs", "--until", first, "lgu-cut")
    assert upto_one.stdout == "one\n" and upto_one.stderr == ""
    upto_three = ctl("logs", "--until", third, "lgu-cut")
    assert upto_three.stdout == "one\nthree\n" and upto_three.stderr == "two\n"
    assert ctl("logs", "--until", str(unix(third) + 0.5), "lgu-cut").stdout == "one\nthree\n"
    # combined with --since, --tail and -t
    assert ctl("logs", "--since", third, "--until", third, "lgu-cut").stdout == "three\n"
    assert [t for _, t in stamped(ctl, "lgu-cut", "--until", fourth, "--tail", "2")] == ["three", "four"]
    # relative: a duration ago, cut just after three (10 ms, more than the rounding below):
    # ctl takes "now" later than this test does, which only moves the cut later, towards
    # four 5 s after three, so ctl may take up to ~5 s to start on a loaded machine
    ago = time.time() - (unix(third) + 0.01)
    assert ctl("logs", "--until", f"{ago:.3f}s", "lgu-cut").stdout == "one\nthree\n"
    assert ctl("logs", "--until", "10m", "lgu-cut").stdout == ""
    assert ctl("logs", "--until", "0s", "lgu-cut").stdout == "one\nthree\nfour\n"
    bad = ctl("logs", "--until", "tomorrow", "lgu-cut", check=False)
    assert bad.returncode == 125 and "--until" in bad.stderr


def test_follow_stops_at_until(ctl, busybox):
    ctl("run", "-d", "--name", "lgu-endless", "busybox", "sh", "-c", "echo one; sleep 0.3; echo two; sleep 1000")
    wait_for(lambda: ctl("logs", "lgu-endless").stdout == "one\ntwo\n")
    (first, _), _ = stamped(ctl, "lgu-endless")
    # the task runs on: without --until, -f would not return
    assert ctl("logs", "-f", "--until", first, "lgu-endless", timeout=60).stdout == "one\n"
    future = timestamp(time.time_ns() + 1_000_000_000).decode()
    assert ctl("logs", "-f", "--until", future, "lgu-endless", timeout=60).stdout == "one\ntwo\n"
    ctl("rm", "-f", "lgu-endless")


def test_until_refused_on_raw_logs(ctl, busybox, tmp_path):
    ctl("run", "--name", "lgu-raw", "--log-opt", f"path={tmp_path / 'raw.log'}", "busybox", "echo", "x")
    refused = ctl("logs", "--until", "1h", "lgu-raw", check=False)
    assert refused.returncode == 125 and "--until" in refused.stderr
    assert ctl("logs", "lgu-raw").stdout == "x\n"


def retained(path: str) -> list[str]:
    return [path, *rotated_paths(path)]


def test_detached_container_rotates_and_keeps_rotating_after_a_restart(ctl, busybox):
    ctl("run", "-d", "--name", "lgu-chatty", "--restart", "on-failure:1",
        "--log-opt", "max-size=1k", "--log-opt", "max-file=3",
        "busybox", "sh", "-c", "seq 1 200; exit 1")
    path = log_path(ctl, "lgu-chatty")
    config = ctl("inspect", "--format", "{{json .HostConfig.LogConfig.Config}}", "lgu-chatty").stdout
    assert json.loads(config) == {"format": "cri", "max-size": "1024", "max-file": "3"}
    wait_for(lambda: status(ctl, "lgu-chatty") == "exited"
             and ctl("inspect", "--format", "{{.RestartCount}}", "lgu-chatty").stdout.strip() == "1", timeout=30)
    files = retained(path)
    assert files == [path, path + ".1", path + ".2"]  # max-file 3: the oldest are gone
    assert all(0 < os.path.getsize(name) <= 1024 for name in files)
    numbers = [int(line) for line in ctl("logs", "lgu-chatty").stdout.split()]
    # two runs of 1..200 (~14 KB of records); what is kept is the newest, complete and in order
    assert numbers[-1] == 200 and 1 < numbers[0]
    assert numbers == list(range(numbers[0], 201))
    joined = b"".join(open(name, "rb").read() for name in reversed(files))
    assert len(numbers) == joined.count(b" stdout F ")
    ctl("rm", "lgu-chatty")
    assert not os.path.exists(path) and rotated_paths(path) == []


def test_foreground_run_rotates_its_copy(ctl, busybox):
    run = ctl("run", "--name", "lgu-fg", "--log-opt", "max-size=2k", "--log-opt", "max-file=2",
              "busybox", "seq", "1", "300")
    assert run.stdout.split() == [str(n) for n in range(1, 301)]
    path = log_path(ctl, "lgu-fg")
    assert retained(path) == [path, path + ".1"]
    assert all(0 < os.path.getsize(name) <= 2048 for name in retained(path))
    numbers = [int(line) for line in ctl("logs", "lgu-fg").stdout.split()]
    assert numbers == list(range(numbers[0], 301)) and numbers[0] > 1
    assert [int(t) for _, t in stamped(ctl, "lgu-fg", "--tail", "3")] == [298, 299, 300]
    ctl("rm", "lgu-fg")
    assert not os.path.exists(path) and rotated_paths(path) == []


def test_bad_rotation_options_are_usage_errors_before_anything_is_made(ctl, busybox):
    for opt in ("max-size=abc", "max-size=0", "max-size=-1", "max-file=0", "max-file=two"):
        result = ctl("run", "-d", "--name", "lgu-bad", "--log-opt", "max-size=1m", "--log-opt", opt,
                     "busybox", "true", check=False)
        assert result.returncode == 125, result
        assert opt.split("=")[0] in result.stderr and "Traceback" not in result.stderr
        assert ctl("ps", "-aq").stdout == ""
    empty = ctl("run", "-d", "--log-opt", "path=", "busybox", "true", check=False)
    assert empty.returncode == 125 and "path needs a FILE" in empty.stderr, empty
    assert ctl("ps", "-aq").stdout == ""


def test_rotating_file_and_follower_without_a_daemon(tmp_path):
    path = str(tmp_path / "c.log")
    writer = RotatingFile(path, max_size=100, max_file=3)
    follower = Follower(path, [])
    seen = b""
    lines = [b"%02d-" % n + b"x" * 26 + b"\n" for n in range(40)]  # 30 bytes each
    for n, line in enumerate(lines):
        writer.write(line)
        if n % 5 == 0:  # the follower reads now and then, across one or more rotations
            seen += follower.read()
    seen += follower.read()
    assert seen == b"".join(lines)  # nothing lost, nothing twice, in order
    assert retained(path) == [path, path + ".1", path + ".2"]
    assert all(os.path.getsize(name) <= 100 for name in retained(path))
    kept = b"".join(f.read() for f in open_set(path))
    assert b"".join(lines).endswith(kept) and kept.count(b"\n") == 7  # 3 + 3 + the live 1
    # a line longer than max-size is cut; max-file 1 starts the file over
    writer.close()
    single = RotatingFile(str(tmp_path / "one.log"), max_size=10, max_file=1)
    single.write(b"0123456789abcdef\n")
    assert open(tmp_path / "one.log", "rb").read() == b"abcdef\n"
    single.close()
    follower.close()
    assert since("90s", now=100.0, flag="--until") == timestamp(10_000_000_000)


def test_autoremoved_container_takes_its_rotated_logs(ctl, busybox, tmp_path):
    # the container waits (for the file `go`) once it has written 300 lines, so the rotated
    # files are seen while it runs, before the daemon's autoremove takes them
    ctl("run", "-d", "--rm", "--name", "lgu-gone", "--log-opt", "max-size=1k", "--log-opt", "max-file=3",
        "-v", f"{tmp_path}:/sync", "busybox", "sh", "-c",
        "seq 1 300; until [ -e /sync/go ]; do sleep 0.05; done")
    path = log_path(ctl, "lgu-gone")
    wait_for(lambda: retained(path) == [path, path + ".1", path + ".2"], timeout=30)
    (tmp_path / "go").touch()
    wait_for(lambda: ctl("ps", "-aq", "--filter", "name=lgu-gone").stdout == "", timeout=30)
    assert not os.path.exists(path) and rotated_paths(path) == []


def test_shim_rotates_stdout_and_stderr_as_one_file(tmp_path):
    """shimd's ProcessIO on its own: the two streams of a `file://…?max-size` URI share one
    writer, so interleaved output rotates as one sequence (two writers, each with its own
    size and its own idea of which file is PATH, would overfill or lose lines)."""
    import asyncio

    from ctl.client.logs import Decoder
    from shimd.stdio import ProcessIO, StdioConfig

    path = str(tmp_path / "c.log")
    uri = f"file://{path}?format=cri&max-size=400&max-file=3"
    expected = []

    async def main() -> None:
        io = ProcessIO(StdioConfig(stdout=uri, stderr=uri))
        out, err = os.dup(io.child_fds[1]), os.dup(io.child_fds[2])
        io.spawned()
        for n in range(60):
            for fd, stream, text in ((out, "stdout", b"o%d\n" % n), (err, "stderr", b"e%d\n" % n)):
                os.write(fd, text)
                expected.append((stream, text))
                for _ in range(3):  # let the pump take it before the next write
                    await asyncio.sleep(0)
        os.close(out)
        os.close(err)
        await io.wait_output(10)
        io.close()

    asyncio.run(main())
    assert retained(path) == [path, path + ".1", path + ".2"]
    assert all(0 < os.path.getsize(name) <= 400 for name in retained(path))
    decoder = Decoder()
    kept = [(line.stream, line.data) for f in open_set(path) for line in decoder.feed(f.read())]
    assert len(kept) > 12 and kept == expected[-len(kept):]


def test_follow_reads_across_the_shims_rotations(ctl, busybox, tmp_path):
    # every rotated file is kept (~42 of max-file 60), so whenever `logs -f` looks, nothing
    # it has not read yet is gone: it must print every line once, in order. The second
    # half is written only once `logs -f` has printed the first (the container waits for
    # the file `go`), so it is read while the shim rotates
    ctl("run", "-d", "--name", "lgu-follow", "--log-opt", "max-size=4k", "--log-opt", "max-file=60",
        "-v", f"{tmp_path}:/sync", "busybox", "sh", "-c",
        "seq 1 2000; until [ -e /sync/go ]; do sleep 0.05; done; "
        "for i in $(seq 21 40); do seq $((i * 100 - 99)) $((i * 100)); done")
    follow = subprocess.Popen(ctl.command("logs", "-f", "lgu-follow"), stdout=subprocess.PIPE, text=True)
    try:
        followed = []
        while not followed or followed[-1] != "2000":
            line = follow.stdout.readline()
            if not line:  # EOF: logs -f ended before the first half; a bare loop would spin on ""
                raise AssertionError(f"ctl logs -f exited early ({follow.wait()}) after {followed[-3:]}")
            followed.append(line.strip())
        (tmp_path / "go").touch()
        followed += follow.communicate(timeout=60)[0].split()
    finally:
        follow.kill()
        follow.wait()
    assert followed == [str(n) for n in range(1, 4001)]
    path = log_path(ctl, "lgu-follow")
    assert len(rotated_paths(path)) > 30
    ctl("rm", "lgu-follow")
    assert rotated_paths(path) == []


def test_one_log_file_implementation_for_shim_and_ctl(tmp_path):
    """The log URI, its records and its rotation are runtimed.logfile's, for the shim and
    for ctl alike (they were two copies that could drift), and it loads nothing heavy."""
    import sys

    import pytest

    from ctl.client import logs
    from runtimed import logfile
    from runtimed.errors import InvalidArgument
    from shimd import stdio

    assert issubclass(stdio.RotatingLog, logfile.RotatingFile) and logs.RotatingFile is logfile.RotatingFile
    assert logs.encode is logfile.encode and logs.uri is logfile.uri and logs.rotation is logfile.rotation
    uri = logfile.uri("/l/c.log", max_size=1024, max_file=3)
    assert uri == "file:///l/c.log?format=cri&max-size=1024&max-file=3"
    assert logfile.path_of(uri) == "/l/c.log" and logfile.is_cri(uri) and logfile.rotation(uri) == (1024, 3)
    assert logfile.rotation(logfile.uri("/l/c.log")) is None and logfile.options("/fifo?format=cri") == {}
    with pytest.raises(InvalidArgument):  # one rule: a bad value is an error, not "not rotated"
        logfile.rotation("file:///l/c.log?max-size=big")
    with pytest.raises(InvalidArgument):
        stdio.ProcessIO(stdio.StdioConfig(stdout=f"file://{tmp_path}/x.log?max-size=big"))
    assert logfile.encode(b"a\nb", b"stderr", 1) == logfile.encode(b"a\nb", "stderr", 1) == (
        b"1970-01-01T00:00:00.000000001Z stderr F a\n1970-01-01T00:00:00.000000001Z stderr P b\n")
    # rm and the autoremove take PATH and the rotated files its URI may have made, no others
    names = ["c.log", "c.log.1", "c.log.2", "c.log.3", "d.log", "d.log.1"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    logfile.remove_set(logfile.uri(f"{tmp_path}/c.log", max_size=10, max_file=3))
    logfile.remove_set(logfile.uri(f"{tmp_path}/d.log", cri=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.log.3", "d.log.1"]
    loaded = subprocess.run([sys.executable, "-c", "import sys, runtimed.logfile; print(sorted(sys.modules))"],
                            capture_output=True, text=True, check=True).stdout
    assert "grpc" not in loaded and "google" not in loaded


def test_until_keeps_a_line_begun_before_it_that_ends_after_a_later_line(ctl, busybox, tmp_path):
    """A stdout line begun with a P record before an stderr line has the earlier stamp but
    comes after it: --until keeps it (it was dropped, the selection stopping at the first
    line past --until), with and without -f."""
    path = tmp_path / "c.log"
    ctl("run", "-d", "--name", "lgu-partial", "--log-opt", f"path={path}", "--log-opt", "format=cri",
        "busybox", "sleep", "1000")
    t1, t2, t3, t4 = (timestamp(n * 1_000_000_000).decode() for n in (1, 2, 3, 4))
    path.write_text(f"{t1} stdout P a\n{t3} stderr F late\n{t4} stdout F b\n")
    upto = ctl("logs", "--until", t2, "lgu-partial")
    assert upto.stdout == "ab\n" and upto.stderr == ""
    followed = ctl("logs", "-f", "--until", t2, "lgu-partial", timeout=60)
    assert followed.stdout == "ab\n" and followed.stderr == ""
    ctl("rm", "-f", "lgu-partial")
