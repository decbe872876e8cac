"""ctl's stdio copiers (ctl/client/cio.py) on their own: FIFOs with a writer played by the
test, as the shim (or whatever holds the output) would."""

from __future__ import annotations

import os
import tempfile

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


def test_output_held_open_is_given_up_on_and_later_output_dropped(tmp_path):
    """A writer that keeps the FIFO open without writing: wait() returns (False) after the
    grace; what comes after that is read (the writer is never blocked) but not copied."""
    attachment, dest, writer = _attached(tmp_path)
    try:
        os.write(writer, b"before\n")
        assert attachment.wait(grace=0.1) is False
        assert _contents(dest) == b"before\n"
        os.write(writer, b"after\n")
    finally:
        os.close(writer)
    for t in attachment._outputs:  # EOF ends the copier: it has read "after" by then
        t.join(30)
        assert not t.is_alive()
    assert _contents(dest) == b"before\n"
