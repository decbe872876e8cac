"""Fixtures for driving the real `ctl` command against a real runtimed."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import testimages

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Ctl:
    """Runs `python -m ctl --address <daemon> ...` and returns the CompletedProcess."""

    address: str
    namespace: str = "default"

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "ctl", "--address", self.address, "--namespace",
                self.namespace, *args]

    def __call__(self, *args: str, check: bool = True, input: str | bytes | None = None,
                 timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
        text = not isinstance(input, bytes)
        result = subprocess.run(
            self.command(*args), capture_output=True, input=input, text=text, timeout=timeout,
            cwd=REPO, env={**os.environ, **(env or {})},
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"ctl {' '.join(args)} exited {result.returncode}:\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result


@pytest.fixture(scope="session")
def test_images(tmp_path_factory) -> dict:
    return testimages.build(tmp_path_factory.mktemp("images"))


@pytest.fixture
def ctl(daemon):
    """A `Ctl` for the daemon; containers a failed test left are removed afterwards."""
    ctl = Ctl(daemon.address)
    yield ctl
    for namespace in ctl("namespace", "ls", "-q", check=False).stdout.split():
        scoped = Ctl(daemon.address, namespace)
        ids = scoped("ps", "-a", "-q", "--no-trunc", check=False).stdout.split()
        if ids:
            scoped("rm", "-f", *ids, check=False)


@pytest.fixture
def busybox(ctl, test_images) -> str:
    """runtimed with busybox loaded through `ctl load`; the image's full name."""
    ctl("load", "-q", "-i", test_images["busybox"].archive)
    return test_images["busybox"].name
