"""ctl version, namespace …, info, completion, exit codes and error lines, start-up cost."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.cli.conftest import REPO, Ctl


def test_help_needs_no_grpc():
    """`ctl --help` and usage errors never import grpc (start-up is benchmarked)."""
    code = ("import sys; from ctl.__main__ import main; rc = main(sys.argv[1:]); "
            "assert 'grpc' not in sys.modules and 'pyroute2' not in sys.modules, 'heavy import'; "
            "sys.exit(rc)")
    ok = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert "run" in ok.stdout and "images" in ok.stdout
    bad = subprocess.run([sys.executable, "-c", code, "run"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 125
    assert "the following arguments are required" in bad.stderr


def test_unreachable_daemon_is_one_line_and_125(tmp_path):
    ctl = Ctl(str(tmp_path / "nothing.sock"))
    result = ctl("ps", check=False)
    assert result.returncode == 125
    assert result.stderr.strip().count("\n") == 0
    assert "cannot connect to runtimed" in result.stderr and "Traceback" not in result.stderr


def test_version(ctl):
    text = ctl("version").stdout
    assert "Client:" in text and "Server:" in text
    data = json.loads(ctl("version", "--format", "json").stdout)
    assert data["Server"]["Version"] and data["Client"]["Namespace"] == "default"
    assert ctl("version", "--format", "{{.Server.Address}}").stdout.strip() == ctl.address


def test_namespaces(ctl):
    ctl("namespace", "create", "team-a", "owner=me")
    listed = ctl("namespace", "ls").stdout
    assert "team-a" in listed and "owner=me" in listed
    ctl("ns", "label", "team-a", "owner=", "tier=gold")
    rows = [json.loads(line) for line in ctl("ns", "ls", "--format", "json").stdout.splitlines()]
    assert {"Name": "team-a", "Labels": "tier=gold"} in rows
    assert "team-a" in ctl("ns", "ls", "-q").stdout.split()
    ctl("ns", "rm", "team-a")
    assert "team-a" not in ctl("ns", "ls", "-q").stdout.split()
    missing = ctl("ns", "rm", "team-a", check=False)
    assert missing.returncode == 1 and "not found" in missing.stderr.lower()
    bad = ctl("ns", "create", "Bad Name!", check=False)
    assert bad.returncode == 125 and "Traceback" not in bad.stderr


def test_other_namespace_is_isolated(ctl, busybox):
    other = Ctl(ctl.address, namespace="elsewhere")
    assert other("images", "-q").stdout.strip() == ""
    assert ctl("images", "-q").stdout.strip() != ""


def test_info_and_completion(ctl, busybox):
    info = json.loads(ctl("info", "--format", "json").stdout)
    assert info["Images"] == 1 and info["Containers"] == 0
    assert "default" in info["Namespaces"]
    assert "CgroupVersion" in ctl("system", "info").stdout
    script = ctl("completion", "bash").stdout
    assert "complete -F _ctl ctl" in script and " run " in script
