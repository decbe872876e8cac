"""`ctl logs -t/--since/--tail` on the CRI-format logs the shim stamps (and that ctl writes
for a foreground run), and that a restarted container keeps appending to the same log."""

from __future__ import annotations

import re
from datetime import datetime

from ctl.client.logs import Decoder, encode, since, timestamp
from tests.cli.test_containers_cli import wait_for

STAMP = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z ")


def status(ctl, name: str) -> str:
    return ctl("ps", "-a", "--filter", f"name={name}", "--format", "{{.State}}").stdout.strip()


def test_logs_timestamps_since_tail_and_streams(ctl, busybox):
    ctl("run", "-d", "--name", "talk", "busybox", "sh", "-c",
        "echo one; echo two >&2; sleep 1; echo three; printf four")
    wait_for(lambda: status(ctl, "talk") == "exited")
    plain = ctl("logs", "talk")
    assert plain.stdout == "one\nthree\nfour" and plain.stderr == "two\n"
    stamped = ctl("logs", "-t", "talk").stdout.encode().splitlines()
    assert [STAMP.sub(b"", line) for line in stamped] == [b"one", b"three", b"four"]
    assert all(STAMP.match(line) for line in stamped)
    first = datetime.fromisoformat(stamped[0][:26].decode() + "+00:00")  # to microseconds
    later = ctl("logs", "--since", str(first.timestamp() + 0.5), "talk")
    assert later.stdout == "three\nfour" and later.stderr == ""
    assert ctl("logs", "--since", stamped[0][:30].decode(), "talk").stdout.startswith("one\n")
    assert ctl("logs", "--since", "1h", "talk").stdout == "one\nthree\nfour"
    tail = ctl("logs", "--tail", "2", "-t", "talk").stdout.encode().splitlines()
    assert [STAMP.sub(b"", line) for line in tail] == [b"three", b"four"]
    bad = ctl("logs", "--since", "yesterday", "talk", check=False)
    assert bad.returncode == 125 and "--since" in bad.stderr


def test_follow_and_foreground_runs_are_stamped_too(ctl, busybox):
    ctl("run", "-d", "--name", "slow", "busybox", "sh", "-c", "echo a; sleep 0.8; echo b")
    assert ctl("logs", "-f", "slow").stdout == "a\nb\n"
    assert ctl("run", "--name", "fg", "busybox", "sh", "-c", "echo hi; echo err >&2").stdout == "hi\n"
    out = ctl("logs", "-t", "fg")
    assert STAMP.match(out.stdout.encode()) and out.stdout.endswith(" hi\n")
    assert STAMP.match(out.stderr.encode()) and out.stderr.endswith(" err\n")


def test_restarted_container_appends_to_its_stamped_log(ctl, busybox):
    ctl("run", "-d", "--name", "again", "--restart", "on-failure:1", "busybox",
        "sh", "-c", "echo run; exit 1")
    wait_for(lambda: status(ctl, "again") == "exited"
             and ctl("logs", "again").stdout == "run\nrun\n", timeout=10)
    lines = ctl("logs", "-t", "again").stdout.splitlines()
    assert len(lines) == 2 and lines[0] < lines[1]


def test_decoder_and_since_parsing():
    records = encode(b"ab", "stdout", 1) + encode(b"c\nd\n", "stdout", 2) + encode(b"e", "stderr", 3)
    decoder = Decoder()
    lines = list(decoder.feed(records[:10])) + list(decoder.feed(records[10:]))
    assert [(line.stream, line.data) for line in lines] == [("stdout", b"abc\n"), ("stdout", b"d\n")]
    assert lines[0].timestamp == timestamp(1)
    assert [line.data for line in decoder.flush()] == [b"e"]
    assert since("90s", now=100.0) == timestamp(10_000_000_000)
    assert since("1m30s", now=100.0) == timestamp(10_000_000_000)
    assert since("2026-11-28T00:00:00Z") == b"2026-11-28T00:00:00.000000000Z"
    # a record's own stamp selects that record: exact to the nanosecond (a float loses it)
    assert since("2026-11-28T04:11:31.760723073Z") == b"2026-11-28T04:11:31.760723073Z"
    assert since("2026-11-28T04:11:31.5+01:00") == b"2026-11-28T03:11:31.500000000Z"


def test_log_opt_path_is_raw_unless_format_cri(ctl, busybox, tmp_path):
    raw, stamped = tmp_path / "raw.log", tmp_path / "cri.log"
    ctl("run", "--log-opt", f"path={raw}", "busybox", "echo", "plain")
    ctl("run", "--log-opt", f"path={stamped}", "--log-opt", "format=cri", "busybox", "echo", "x")
    assert raw.read_text() == "plain\n"
    assert STAMP.match(stamped.read_bytes()) and stamped.read_text().endswith(" stdout F x\n")
    assert ctl("logs", "-t", "--since", "1h", ctl("ps", "-aq", "-l").stdout.strip()).stdout.endswith(" x\n")
    assert ctl("run", "--log-opt", "driver=syslog", "busybox", "true", check=False).returncode == 125
