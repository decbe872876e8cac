"""shimd.stdio on its own (no shim, no daemon)."""

from __future__ import annotations

import os

import pytest

from runtimed.errors import InvalidArgument
from shimd.stdio import ProcessIO, StdioConfig


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_bad_stdio_uri_leaves_no_fd_open(tmp_path):
    """stdin from a FIFO and stdout into a CRI log are set up before stderr's URI is found
    bad: the error reaches the caller and nothing opened stays open."""
    fifo = tmp_path / "stdin"
    os.mkfifo(fifo)
    before = _open_fds()
    with pytest.raises(InvalidArgument):
        ProcessIO(StdioConfig(stdin=str(fifo), stdout=f"file://{tmp_path}/out.log?format=cri",
                              stderr=f"file://{tmp_path}/err.log?max-size=big"))
    assert _open_fds() == before
