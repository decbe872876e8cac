"""A process's stdio as containerd clients hand it over: FIFO paths (the client reads and
writes the other ends), `file://` paths, empty (null), or a terminal.

The container never writes into a client's FIFO directly: it writes into a pipe (or a pty)
and the shim pumps that into the FIFO, buffering up to a limit and then reading no more
until the client catches up, so a slow client loses nothing (an exported file system or a
`cp` through `tar` must arrive whole). Only when the FIFO has taken nothing for
OUTPUT_STALL seconds with the buffer full is the client taken for gone: the oldest output
is then dropped, so a container whose client detached never blocks for longer than that.
Stdin is never dropped. Output FIFOs are opened read-write (a detached client leaving does
not make writes fail) and closed when the process side reaches EOF, so a client waiting
for EOF returns.

A `file://` URI ending in `?format=cri` asks for a log with a timestamp per line: the
process then writes into a pipe and the shim appends records in the CRI log format that
containerd's CRI plugin and the kubelet use, `<RFC3339Nano> <stdout|stderr> <F|P> <data>`
(F: the data ended a line, P: it did not; the newline itself is not stored), each read
stamped as it arrives, so `ctl logs -t/--since` need no other index. `max-size=N&max-file=M`
in a `file://` URI's query rotate the file (docker's json-file options, see runtimed.logfile).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
import struct
import tempfile
import termios
from dataclasses import dataclass

from runtimed import logfile
from runtimed.errors import InvalidArgument

BUFFER_LIMIT = 1 << 20
OUTPUT_STALL = 5.0  # seconds without progress, buffer full: the reader is gone


class RotatingLog(logfile.RotatingFile):
    """A rotated `file://` log (runtimed.logfile.RotatingFile) shared by a process's stdout
    and stderr pumps, so their interleaved output rotates as one file; closed when the
    last pump releases it."""

    def __init__(self, path: str, max_size: int, max_file: int, fd: int | None = None):
        super().__init__(path, max_size, max_file, fd)
        self.users = 0

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            self.close()


@dataclass(frozen=True)
class StdioConfig:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


class Pump:
    """Copy bytes from `src` to `dst` without ever blocking the event loop."""

    def __init__(self, src: int, dst: int | RotatingLog | None, close_dst: bool = True, stamp: bytes = b"",
                 output: bool = True):
        self.src, self.dst = src, dst
        self.output = output  # output may be dropped once its reader is gone; stdin never
        self.stamp = stamp  # b"stdout"/b"stderr": write CRI log records
        self.close_dst = close_dst
        self.buffer = bytearray()
        self.eof = False
        self.done = asyncio.get_running_loop().create_future()
        self._loop = asyncio.get_running_loop()
        self._writing = False
        self._paused = False  # stopped reading `src` until `dst` takes what is buffered
        self._dropping = False  # output whose reader stalled: keep the newest BUFFER_LIMIT
        self._stall_timer: asyncio.TimerHandle | None = None
        os.set_blocking(src, False)
        if isinstance(dst, RotatingLog):
            dst.users += 1
        elif dst is not None:
            with contextlib.suppress(OSError):
                os.set_blocking(dst, False)
        self._loop.add_reader(src, self._read)

    def _read(self) -> None:
        try:
            data = os.read(self.src, 65536)
        except BlockingIOError:
            return
        except OSError as exc:  # EIO: the pty's other side is closed
            if exc.errno != errno.EIO:
                raise
            data = b""
        if not data:
            self.eof = True
            self._loop.remove_reader(self.src)
            self._flush()
            return
        if self.dst is None:
            return
        if self.stamp:
            data = logfile.encode(data, self.stamp)
        self.buffer += data
        if len(self.buffer) > BUFFER_LIMIT:
            if self._dropping:
                excess = len(self.buffer) - BUFFER_LIMIT
                del self.buffer[:excess]
            else:  # back-pressure; the stall timer decides whether the reader is gone
                self._loop.remove_reader(self.src)
                self._paused = True
                if self.output and self._stall_timer is None:
                    self._stall_timer = self._loop.call_later(OUTPUT_STALL, self._stalled)
        self._flush()

    def _stalled(self) -> None:
        self._stall_timer = None
        if self._paused and not self.eof:
            logging.getLogger("shimd").warning(
                "output not read for %.0f s: the client is taken for gone, oldest output dropped",
                OUTPUT_STALL)
            self._dropping = True
            self._paused = False
            self._loop.add_reader(self.src, self._read)

    def _progress(self) -> None:
        self._dropping = False
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _flush(self) -> None:
        while self.buffer and self.dst is not None:
            try:
                if isinstance(self.dst, RotatingLog):
                    written = self.dst.write(self.buffer)
                else:
                    written = os.write(self.dst, self.buffer)
            except BlockingIOError:
                if not self._writing:
                    self._loop.add_writer(self.dst, self._flush)
                    self._writing = True
                return
            except OSError:  # EPIPE: the reader is gone for good
                self.buffer.clear()
                break
            del self.buffer[:written]
            self._progress()
        if self._paused and not self.eof:  # the buffer is empty: read again
            self._loop.add_reader(self.src, self._read)
            self._paused = False
        if self._writing:
            self._loop.remove_writer(self.dst)
            self._writing = False
        if self.eof:
            self.close()

    def idle(self) -> bool:
        """Nothing buffered or waiting: the pump can be handed over as its two fds."""
        return (not self.buffer and not self._writing and not self._paused
                and self._stall_timer is None and not self.eof)

    def snapshot(self, keep) -> dict:
        """What restores this pump in the next worker (shimd/keeper.py); `keep(fd, wake)`
        hands an fd over and returns its index."""
        if isinstance(self.dst, RotatingLog):
            dst = {"log": [self.dst.path, self.dst.max_size, self.dst.max_file],
                   "fd": keep(self.dst.fd)}
        else:
            dst = None if self.dst is None else {"fd": keep(self.dst)}
        return {"src": keep(self.src, wake=True), "dst": dst, "close_dst": self.close_dst,
                "stamp": self.stamp.decode(), "output": self.output}

    @classmethod
    def restore(cls, record: dict, fds: list[int], logs: dict[str, RotatingLog]) -> Pump:
        dst = record["dst"]
        if dst is not None and "log" in dst:
            path, max_size, max_file = dst["log"]
            if path not in logs:
                logs[path] = RotatingLog(path, max_size, max_file, fds[dst["fd"]])
            dst = logs[path]
        elif dst is not None:
            dst = fds[dst["fd"]]
        return cls(fds[record["src"]], dst, close_dst=record["close_dst"],
                   stamp=record["stamp"].encode(), output=record["output"])

    def drain(self) -> None:
        """Read what is already waiting in `src` (used before closing stdin)."""
        while not self.eof:
            before = len(self.buffer)
            self._read()
            if len(self.buffer) == before:
                break

    def close(self) -> None:
        if self.done.done():
            return
        self._loop.remove_reader(self.src)
        self._progress()
        if self._writing:
            self._loop.remove_writer(self.dst)
        with contextlib.suppress(OSError):
            os.close(self.src)
        if isinstance(self.dst, RotatingLog):
            with contextlib.suppress(OSError):
                self.dst.release()
        elif self.dst is not None and self.close_dst:
            with contextlib.suppress(OSError):
                os.close(self.dst)
        self.done.set_result(None)


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def _file_path(uri: str) -> str | None:
    if uri.startswith(logfile.PREFIX):
        return logfile.path_of(uri)
    if uri.startswith("binary://"):
        raise InvalidArgument("binary:// stdio (logging binaries) is not supported by shimd")
    return None


class ProcessIO:
    """Sets up the fds a process gets and the pumps between them and the client's paths.

    `child_fds` goes to the OCI runtime (and through it to the process); call
    `spawned()` once the runtime command has started so the shim holds no child ends.
    """

    def __init__(self, config: StdioConfig, *, set_up: bool = True):
        """`set_up=False`: an empty one, for `restore`."""
        self.config = config
        self.child_fds: tuple[int, int, int] = (-1, -1, -1)
        self.pumps: list[Pump] = []
        self.stdin_pump: Pump | None = None
        self.console: int | None = None
        self._console_dir: str | None = None
        self._listener: socket.socket | None = None
        self._to_close: list[int] = []
        self._pending: list[tuple[int, int | RotatingLog | None, bool, bytes]] = []
        self._logs: dict[str, RotatingLog] = {}  # stdout and stderr into one rotated file
        self.console_socket: str | None = None
        if not set_up:
            return
        if config.terminal:
            self._open_console_socket()
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            self._to_close.append(null)
            self.child_fds = (null, null, null)
        else:
            try:
                self.child_fds = (self._stdin(), self._output(config.stdout, b"stdout"),
                                  self._output(config.stderr, b"stderr"))
            except BaseException:  # a bad URI, a missing FIFO: nothing opened stays open
                self.close()
                raise

    def _open_console_socket(self) -> None:
        self._console_dir = tempfile.mkdtemp(prefix="shimd-pty-")
        self.console_socket = os.path.join(self._console_dir, "pty.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.console_socket)
        self._listener.listen(1)
        self._listener.setblocking(False)

    async def receive_console(self, timeout: float = 30.0) -> None:
        """Accept the pty master the runtime sends over the console socket (SCM_RIGHTS)."""
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        conn, _ = await asyncio.wait_for(loop.sock_accept(self._listener), timeout)
        with conn:
            conn.setblocking(True)
            conn.settimeout(timeout)
            _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
        if not fds:
            raise InvalidArgument("the OCI runtime sent no terminal over the console socket")
        self.console = fds[0]
        self._close_console_socket()

    def _close_console_socket(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._console_dir:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self._console_dir, "pty.sock"))
                os.rmdir(self._console_dir)
            self._console_dir = None

    def _stdin(self) -> int:
        path = self.config.stdin
        if not path:
            fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            self._to_close.append(fd)
            return fd
        file = _file_path(path)
        if file is not None:
            fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
            self._to_close.append(fd)
            return fd
        return self._pipe(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), is_stdin=True)

    def _output(self, path: str, stream: bytes) -> int:
        if not path:
            fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            self._to_close.append(fd)
            return fd
        file = _file_path(path)
        if file is not None and (logfile.is_cri(path) or logfile.rotation(path)):
            return self._pipe(self._log(file, path), stamp=stream if logfile.is_cri(path) else b"")
        if file is not None or not _is_fifo(path):
            fd = os.open(file or path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._to_close.append(fd)
            return fd
        return self._pipe(os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))

    def _pipe(self, other: int | RotatingLog, is_stdin: bool = False, stamp: bytes = b"") -> int:
        """A pipe between the process and `other` (open already: a FIFO, a log), pumped
        once the process is spawned; the process's end is returned. Every fd is held
        where `close` finds it, or closed, whatever fails."""
        try:
            read_end, write_end = os.pipe()
        except OSError:
            if isinstance(other, int):
                os.close(other)
            raise
        if is_stdin:
            self._to_close.append(read_end)
            self._pending.append((other, write_end, True, stamp))
            return read_end
        self._to_close.append(write_end)
        self._pending.append((read_end, other, False, stamp))
        return write_end

    def _log(self, file: str, uri: str) -> int | RotatingLog:
        rotation = logfile.rotation(uri)
        if rotation is None:
            return os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        if file not in self._logs:
            self._logs[file] = RotatingLog(file, *rotation)
        return self._logs[file]

    def spawned(self) -> None:
        """The runtime holds the child ends now: drop ours, start pumping."""
        for fd in self._to_close:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._to_close.clear()
        for src, dst, is_stdin, stamp in self._pending:
            pump = Pump(src, dst, stamp=stamp, output=not is_stdin)
            self.pumps.append(pump)
            if is_stdin:
                self.stdin_pump = pump
        self._pending.clear()
        if self.console is not None:
            if self.config.stdout:
                stamp = b"stdout" if logfile.is_cri(self.config.stdout) else b""
                self.pumps.append(Pump(os.dup(self.console), self._console_out(), stamp=stamp))
            if self.config.stdin and not _file_path(self.config.stdin):
                fifo = os.open(self.config.stdin, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                self.stdin_pump = Pump(fifo, os.dup(self.console), output=False)
                self.pumps.append(self.stdin_pump)

    def _console_out(self) -> int:
        path = self.config.stdout
        file = _file_path(path)
        if file is not None:
            return self._log(file, path)
        if not _is_fifo(path):
            return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)

    def quiescent(self) -> bool:
        """Set up, every pump idle: it can be handed over to the shim's keeper."""
        return (not self._pending and self._listener is None
                and all(p.idle() for p in self.pumps if not p.done.done()))

    def snapshot(self, keep) -> dict:
        pumps = [p for p in self.pumps if not p.done.done()]
        c = self.config
        return {
            "config": [c.stdin, c.stdout, c.stderr, c.terminal],
            "console": None if self.console is None else keep(self.console),
            "pumps": [p.snapshot(keep) for p in pumps],
            "stdin": pumps.index(self.stdin_pump) if self.stdin_pump in pumps else None,
        }

    @classmethod
    def restore(cls, record: dict, fds: list[int]) -> ProcessIO:
        io = cls(StdioConfig(*record["config"]), set_up=False)
        if record["console"] is not None:
            io.console = fds[record["console"]]
        logs: dict[str, RotatingLog] = {}
        io.pumps = [Pump.restore(p, fds, logs) for p in record["pumps"]]
        if record["stdin"] is not None:
            io.stdin_pump = io.pumps[record["stdin"]]
        return io

    def close_stdin(self) -> None:
        if self.stdin_pump is not None:
            self.stdin_pump.drain()
            self.stdin_pump.eof = True
            self.stdin_pump._flush()
            self.stdin_pump.close()

    def resize(self, width: int, height: int) -> None:
        if self.console is None:
            raise InvalidArgument("the process has no terminal to resize")
        fcntl.ioctl(self.console, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    async def wait_output(self, timeout: float) -> None:
        """Let buffered output reach the clients (bounded: nobody may be reading)."""
        outputs = [p.done for p in self.pumps if p is not self.stdin_pump]
        if outputs:
            await asyncio.wait(outputs, timeout=timeout)

    def close(self) -> None:
        for fd in self._to_close:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._to_close.clear()
        for src, dst, _, _ in self._pending:
            for fd in (src, dst):
                with contextlib.suppress(OSError, TypeError):
                    os.close(fd)
        self._pending.clear()
        for log in self._logs.values():  # never handed to a pump
            if log.users <= 0:
                log.release()
        for pump in self.pumps:
            pump.close()
        if self.console is not None:
            with contextlib.suppress(OSError):
                os.close(self.console)
            self.console = None
        self._close_console_socket()
