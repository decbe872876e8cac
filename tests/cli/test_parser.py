"""The command line parser: building only the command being run parses exactly as the
whole parser does, and everything that lists commands still sees them all."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ctl.__main__ import UsageError, _command_word, _parser_for, build_parser
from tests.cli.conftest import REPO

INVOCATIONS = [
    ["run", "--rm", "-e", "A=1", "-v", "/x:/y", "busybox", "echo", "hi", "-e"],
    ["-a", "/x.sock", "exec", "-it", "box", "sh", "-c", "ls"],
    ["--namespace", "n1", "-D", "ps", "-a", "--format", "json"],
    ["--address=/x.sock", "run", "-d", "--name", "web", "busybox"],
    ["create", "--restart", "always", "busybox"],
    ["image", "ls", "-q"], ["images", "--digests"], ["rmi", "-f", "a", "b"], ["image", "rm", "a"],
    ["ns", "ls"], ["namespace", "create", "n", "a=b"], ["network", "create", "--subnet", "10.9.0.0/24", "n"],
    ["volume", "prune", "-a"], ["version", "--format", "json"], ["system", "df", "-v"],
    ["build", "-t", "a:b", "."], ["container-rm", "-f", "x"], ["logs", "-f", "x"],
    ["stop", "-t", "3", "a", "b"], ["completion", "zsh"],
]


@pytest.mark.parametrize("argv", INVOCATIONS, ids=lambda a: " ".join(a))
def test_one_command_parser_parses_as_the_whole_one(argv):
    full = vars(build_parser().parse_args(argv))
    assert vars(_parser_for(argv).parse_args(argv)) == full


def test_command_word_skips_global_options():
    assert _command_word(["-a", "run", "ps"]) == "ps"  # `run` is the value of -a
    assert _command_word(["--debug", "--namespace", "x", "images"]) == "images"
    assert _command_word(["--address=/s", "version"]) == "version"
    assert _command_word(["--help"]) is None and _command_word([]) is None


def test_unknown_command_lists_every_command():
    parser = _parser_for(["nosuch"])
    with pytest.raises(UsageError) as info:
        parser.parse_args(["nosuch"])
    assert "invalid choice" in str(info.value) and "'volume'" in str(info.value)


def test_completion_lists_every_command():
    result = subprocess.run([sys.executable, "-m", "ctl", "completion", "bash"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0
    for name in ("run", "exec", "images", "volume", "network", "ns", "completion"):
        assert f" {name} " in result.stdout


@pytest.mark.parametrize("group", ["image", "system", "volume", "network", "ns"])
def test_group_without_subcommand_prints_its_help(group):
    result = subprocess.run([sys.executable, "-m", "ctl", group], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    name = "namespace" if group == "ns" else group
    assert result.stdout.startswith(f"usage: ctl {name} ")
