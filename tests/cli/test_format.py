"""Output formatting: tables, JSON lines, Go-like templates, sizes and times."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from ctl.client.cio import DetachKeys, parse_detach_keys
from ctl.format import emit, human_duration, human_size, parse_time, render_template
from runtimed.errors import InvalidArgument

ROWS = [{"ID": "abc", "Image": "busybox", "Labels": {"a.b": "c"}},
        {"ID": "def", "Image": "alpine", "Labels": {}}]
COLUMNS = [("CONTAINER ID", "ID"), ("IMAGE", "Image")]


def test_table_json_template():
    assert emit(ROWS, COLUMNS, None).splitlines() == [
        "CONTAINER ID   IMAGE", "abc            busybox", "def            alpine"]
    lines = emit(ROWS, COLUMNS, "json").splitlines()
    assert [json.loads(line)["ID"] for line in lines] == ["abc", "def"]
    assert emit(ROWS, COLUMNS, "{{.ID}}:{{.Image}}") == "abc:busybox\ndef:alpine"
    assert emit(ROWS, COLUMNS, "table {{.ID}}\\t{{.Image}}").splitlines()[0] == "ID    IMAGE"
    assert emit(ROWS, COLUMNS, None, "ID", quiet=True) == "abc\ndef"


def test_template_functions():
    row = ROWS[0]
    assert render_template("{{json .Labels}}", row) == '{"a.b": "c"}'
    assert render_template("{{upper .Image}}", row) == "BUSYBOX"
    assert render_template("{{.Labels.a}}", {"Labels": {"a": "x"}}) == "x"
    assert render_template("{{.Missing}}", row) == "<no value>"
    with pytest.raises(InvalidArgument):
        render_template("{{nosuchfunc .ID}}", row)


def test_sizes_and_durations():
    assert human_size(1030000) == "1.03MB" and human_size(999) == "999B"
    assert human_duration(0.2) == "Less than a second"
    assert human_duration(5) == "5 seconds" and human_duration(7200) == "2 hours"
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_time("10m", now) == now - timedelta(minutes=10)
    assert parse_time("2026-01-01T00:00:00Z", now) == now
    with pytest.raises(InvalidArgument):
        parse_time("yesterday-ish", now)


def test_detach_keys():
    assert parse_detach_keys("ctrl-p,ctrl-q") == b"\x10\x11"
    keys = DetachKeys()
    assert keys(b"ab\x10c") == b"ab\x10c"  # a lone ctrl-p followed by something else passes
    assert keys(b"x\x10") == b"x"  # held back: might be the start of the sequence
    assert keys(b"\x11") is None  # completed across two reads
    with pytest.raises(InvalidArgument):
        parse_detach_keys("ctrl-p,meta-q")
