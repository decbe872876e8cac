"""`ctl run -it` under a real pseudo-terminal: typing, resize, detach keys, exit codes."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import termios
import time

from tests.cli.conftest import REPO


class Session:
    """`ctl ...` on the slave side of a pty we hold the master of."""

    def __init__(self, argv: list[str], rows: int = 30, cols: int = 100):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become ctl
            os.chdir(REPO)
            os.execvp(argv[0], argv)
        self.resize(rows, cols)
        self.buffer = b""

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def expect(self, token: bytes, timeout: float = 20) -> bytes:
        deadline = time.monotonic() + timeout
        while token not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{token!r} not seen; got {self.buffer[-500:]!r}")
            ready, _, _ = select.select([self.fd], [], [], min(remaining, 0.2))
            if ready:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:
                    data = b""
                if not data:
                    raise AssertionError(f"{token!r} not seen before EOF; got {self.buffer[-500:]!r}")
                self.buffer += data
        head, _, self.buffer = self.buffer.partition(token)
        return head + token

    def type(self, text: bytes) -> None:
        os.write(self.fd, text)

    def wait(self, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            try:  # keep draining so the child never blocks on a full pty
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.buffer += os.read(self.fd, 4096)
            except OSError:
                time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError("ctl did not exit")


def test_interactive_shell_resize_and_exit_code(ctl, busybox):
    session = Session(ctl.command("run", "--rm", "-it", "--name", "tty1", "busybox", "sh"))
    session.expect(b"# ")
    session.type(b"echo $((6*7))\r")
    session.expect(b"42")
    session.type(b"stty size\r")
    session.expect(b"30 100")
    session.resize(40, 123)
    os.kill(session.pid, signal.SIGWINCH)
    time.sleep(0.5)
    session.type(b"stty size\r")
    session.expect(b"40 123")
    session.type(b"tty\r")
    session.expect(b"/dev/pts/")
    session.type(b"exit 7\r")
    assert session.wait() == 7
    assert ctl("ps", "-a", "-q").stdout.strip() == ""


def test_detach_keys_leave_it_running(ctl, busybox):
    session = Session(ctl.command("run", "-it", "--name", "tty2", "busybox", "sh"))
    session.expect(b"# ")
    session.type(b"echo still here > /tmp/mark\r")
    session.expect(b"# ")
    session.type(b"\x10\x11")
    assert session.wait() == 0
    assert ctl("ps", "--format", "{{.Names}} {{.State}}").stdout.split() == ["tty2", "running"]
    assert ctl("exec", "tty2", "cat", "/tmp/mark").stdout == "still here\n"
    exec_session = Session(ctl.command("exec", "-it", "tty2", "sh"))
    exec_session.expect(b"# ")
    exec_session.type(b"exit 9\r")
    assert exec_session.wait() == 9
    ctl("rm", "-f", "tty2")
