"""ctl's stdio copiers (ctl/client/cio.py) on their own: FIFOs with a writer played by the
test, as the shim (or whatever holds the output) would."""

from __future__ import annotations

import fcntl
import io
import os
import tempfile
import threading

import pytest

from ctl.client import cio


def _attached(tmp_path):
    fifos = cio.FifoSet(str(tmp_path), cio.Stdio(stdout=str(tmp_path / "out")))
    os.mkfifo(fifos.stdio.stdout)
    dest = tempfile.TemporaryFile()
    attachment = cio.Attachment(fifos, stdout=dest)
    attachment.start()
    writer = os.open(fifos.stdio.stdout, os.O_WRONLY)  # returns once the copier opened its end
    return attachment, dest, writer


def _contents(dest) -> bytes:
    return os.pread(dest.fileno(), 1 << 20, 0)


def test_wait_for_eof(tmp_path):
    attachment, dest, writer = _attached(tmp_path)
    os.write(writer, b"all of it\n")
    os.close(writer)
    assert attachment.wait() is True and _contents(dest) == b"all of it\n"
    assert attachment.wait(None) is True


def test_output_held_open_is_given_up_on_and_its_copier_ends(tmp_path):
    """A writer that keeps the FIFO open without writing: wait() returns (False) after the
    grace, and the copier closes its end and returns at once (it lived on, with its fd,
    until the writer closed: a thread and an fd per such container in a long-lived
    embedder); the writer then finds no reader."""
    attachment, dest, writer = _attached(tmp_path)
    try:
        os.write(writer, b"before\n")
        assert attachment.wait(grace=0.1) is False
        for t in attachment._outputs:
            t.join(30)
            assert not t.is_alive()
        assert _contents(dest) == b"before\n"
        with pytest.raises(BrokenPipeError):  # the copier's end is closed
            os.write(writer, b"after\n")
    finally:
        os.close(writer)
    assert _contents(dest) == b"before\n"


def test_a_copier_given_up_on_while_writing_never_writes_to_the_closed_tee(tmp_path, monkeypatch):
    """At the hard limit a copier may be inside a write to a slow local reader; once that
    ends, it must not write to the tee the caller closed meanwhile (ValueError in its
    thread before: a traceback on stderr)."""
    failures = []
    monkeypatch.setattr(threading, "excepthook", failures.append)
    fifos = cio.FifoSet(str(tmp_path), cio.Stdio(stdout=str(tmp_path / "out")))
    os.mkfifo(fifos.stdio.stdout)
    slow_read, slow_write = os.pipe()  # a local reader that reads nothing until told
    fcntl.fcntl(slow_write, fcntl.F_SETPIPE_SZ, 4096)
    tee = io.BytesIO()
    with open(slow_write, "wb", buffering=0) as dest:
        attachment = cio.Attachment(fifos, stdout=dest, tee=tee)
        attachment.start()
        writer = os.open(fifos.stdio.stdout, os.O_WRONLY)
        try:
            os.write(writer, b"x" * 32768)  # the copier blocks on the full local pipe
            assert attachment.wait(grace=0.1, limit=0.3) is False
            tee.close()
            while attachment._outputs[0].is_alive():  # the local reader catches up
                os.read(slow_read, 65536)
                attachment._outputs[0].join(0.05)
        finally:
            os.close(writer)
            os.close(slow_read)
    assert failures == []
