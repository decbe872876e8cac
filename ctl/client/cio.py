"""A task's stdio as containerd's clients do it: FIFOs in a private directory.

The daemon's shim opens the FIFOs by path; the client copies between them and its own
stdin/stdout/stderr. Output FIFOs are opened with a blocking open in the copying thread
(it returns once the shim opened its end), so an EOF really means the process's output is
closed. `Stdio.file` sends output to a file instead (`file://` URIs, as `ctr run
--log-uri`), which is how detached containers keep their logs without a client attached.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

FIFO_ROOT_CANDIDATES = ("/run/ctl/fifo",)
# After the process exited, its output gets OUTPUT_GRACE seconds to reach EOF (docker waits
# 2 s for a container's or an exec's streams, containerd's shim 2 s for its copies before
# Delete closes them); past it the copying stops once no byte has moved for OUTPUT_QUIET
# seconds, and OUTPUT_LIMIT seconds after the exit at the latest.
OUTPUT_GRACE = 2.0
OUTPUT_QUIET = 0.2
OUTPUT_LIMIT = 10.0


@dataclass
class Stdio:
    """The stdin/stdout/stderr strings given to Tasks.Create or Tasks.Exec."""

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False

    @classmethod
    def null(cls) -> Stdio:
        return cls()

    @classmethod
    def file(cls, path: str) -> Stdio:
        """stdout and stderr appended to one file on the daemon's host."""
        uri = "file://" + os.path.abspath(path)
        return cls(stdout=uri, stderr=uri)


def _fifo_root() -> str:
    for candidate in FIFO_ROOT_CANDIDATES:
        try:
            os.makedirs(candidate, mode=0o700, exist_ok=True)
            return candidate
        except OSError:
            continue
    import tempfile

    return tempfile.gettempdir()


def _private_dir(root: str) -> str:
    """tempfile.mkdtemp(prefix="ctl-", dir=root), without importing tempfile (and shutil)."""
    while True:
        path = os.path.join(root, "ctl-" + os.urandom(6).hex())
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue


@dataclass
class FifoSet:
    """FIFOs for one process: `<dir>/<id>-stdin|-stdout|-stderr` (ctr's names)."""

    directory: str
    stdio: Stdio

    @classmethod
    def create(cls, process_id: str, *, stdin: bool, stdout: bool = True, stderr: bool = True,
               terminal: bool = False) -> FifoSet:
        directory = _private_dir(_fifo_root())
        paths = {}
        for name, wanted in (("stdin", stdin), ("stdout", stdout), ("stderr", stderr and not terminal)):
            if wanted:
                path = os.path.join(directory, f"{process_id}-{name}")
                os.mkfifo(path, 0o600)
                paths[name] = path
        return cls(directory, Stdio(terminal=terminal, **paths))

    def remove(self) -> None:
        for name in ("stdin", "stdout", "stderr"):
            path = getattr(self.stdio, name)
            if path:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        try:
            os.rmdir(self.directory)
        except OSError:  # something else was put there: remove it all
            import shutil

            shutil.rmtree(self.directory, ignore_errors=True)


class Attachment:
    """Copies between the FIFOs and local files until the process's output ends.

    A class of its own, not a dataclass: it holds threads and a lock, not a record (and
    a dataclass costs ~0.6 ms of every `ctl run` and `exec` to create)."""

    def __init__(
        self, fifos: FifoSet, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None,
        stderr: BinaryIO | None = None, tee: BinaryIO | None = None,
        tee_encode: Callable[[bytes, str], bytes] | None = None,
        on_stdin_eof: Callable[[], None] | None = None,
        stdin_filter: Callable[[bytes], bytes | None] | None = None,
        on_detach: Callable[[], None] | None = None,
    ):
        self.fifos = fifos
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.tee = tee  # a copy of all output (the container's log file)
        self.tee_encode = tee_encode  # (data, stream) → log records
        self.on_stdin_eof = on_stdin_eof
        self.stdin_filter = stdin_filter  # returns None → detach
        self.on_detach = on_detach
        self._outputs: list[threading.Thread] = []
        self._stdin_fd: int | None = None
        self._cancelled = False
        self._stopped = False  # output is no longer copied (`wait` gave up on it)
        self._moved_at = 0.0  # monotonic time of the last byte read or written on
        self._moving = 0  # copiers between a read that returned data and its write's end
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the copiers. Each FIFO is opened by a blocking open in its thread: it
        returns once the shim has opened its end, so nothing is written before a reader
        exists and an output EOF really means the process side closed."""
        s = self.fifos.stdio
        if s.stdin and self.stdin is not None:
            threading.Thread(target=self._copy_stdin, daemon=True).start()
        for path, dest in ((s.stdout, self.stdout), (s.stderr, self.stderr)):
            if path:
                t = threading.Thread(target=self._copy_output, args=(path, dest), daemon=True)
                t.start()
                self._outputs.append(t)

    def _copy_stdin(self) -> None:
        try:
            fd = os.open(self.fifos.stdio.stdin, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return
        with self._lock:
            if self._cancelled:
                os.close(fd)
                return
            self._stdin_fd = fd
        src = self.stdin.fileno()
        try:
            while True:
                data = os.read(src, 32768)
                if not data:
                    break
                if self.stdin_filter is not None:
                    data = self.stdin_filter(data)
                    if data is None:
                        if self.on_detach:
                            self.on_detach()
                        return
                fd = self._stdin_fd
                if fd is None:
                    return
                _write_all(fd, data)
        except OSError:
            pass
        self.close_stdin()
        if self.on_stdin_eof:
            try:
                self.on_stdin_eof()
            except Exception:  # noqa: BLE001 - the process may be gone already
                pass

    def close_stdin(self) -> None:
        with self._lock:
            fd, self._stdin_fd = self._stdin_fd, None
        if fd is not None:
            os.close(fd)

    def _copy_output(self, path: str, dest: BinaryIO | None) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            out = None  # dest's fd, asked for with the first output (a spool makes its file then)
            while True:
                data = os.read(fd, 32768)
                with self._lock:
                    if not data or self._stopped:  # given up: our end closes, the holder is
                        break  # taken for gone (the shim buffers, then drops, never blocks)
                    self._moving += 1
                try:
                    if dest is not None:
                        if out is None:
                            out = dest.fileno()
                        _write_all(out, data)
                    if self.tee is not None:
                        if self.tee_encode is not None:
                            stream = "stderr" if path == self.fifos.stdio.stderr else "stdout"
                            data = self.tee_encode(data, stream)
                        with self._lock:
                            if not self._stopped:  # once wait() gave up, its caller closes the tee
                                self.tee.write(data)
                                self.tee.flush()
                finally:
                    with self._lock:
                        self._moving -= 1
                        self._moved_at = time.monotonic()
        except OSError:
            pass
        finally:
            os.close(fd)

    def wait(self, grace: float | None = OUTPUT_GRACE, limit: float = OUTPUT_LIMIT) -> bool:
        """After the process exited: wait until its output reached EOF (the shim closes its
        ends when no process holds the output open any more); True if it did.

        Something else may hold it open: a background child of an exec'd process (it lives
        as long as the container), or a process outside the container's pid namespace (one
        that reopened /proc/<pid>/fd/1, or was passed the descriptor), which the end of the
        container does not kill. So after `grace` seconds the copying stops as soon as no
        copier has moved a byte for OUTPUT_QUIET seconds (output still draining late on a
        busy machine, or into a slow local reader, is not cut), and after `limit` seconds
        in any case (a background writer that never pauses); the copiers then close their
        FIFO ends and return (what arrives later is not read: the shim drops it once its
        buffer is full) and never write to the tee again, so the caller may close it. `grace=None`: until EOF, however long (a capture: a cut tar is a corrupt
        copy)."""
        if grace is None:
            for t in self._outputs:
                t.join()
            return True
        now = time.monotonic()
        soft, hard = now + grace, now + max(grace, limit)
        for t in self._outputs:
            t.join(max(soft - time.monotonic(), 0))
        while any(t.is_alive() for t in self._outputs):
            with self._lock:
                now = time.monotonic()
                if now >= hard or (not self._moving and now - self._moved_at >= OUTPUT_QUIET):
                    self._stopped = True
                    break
            next(t for t in self._outputs if t.is_alive()).join(OUTPUT_QUIET / 2)
        else:
            return True
        self._wake_copiers()
        return False

    def _wake_copiers(self) -> None:
        """A copier that `wait` gave up on may be blocked reading a FIFO nobody writes to:
        one byte (dropped) wakes it, so it closes its end and returns instead of living on
        with its fd until the holder closes. A full FIFO needs none (its copier has data to
        read); a FIFO without a reader any more refuses the open (ENXIO)."""
        for path in (self.fifos.stdio.stdout, self.fifos.stdio.stderr):
            if not path:
                continue
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                os.write(fd, b"\0")
            except OSError:
                pass
            finally:
                os.close(fd)

    def cancel(self) -> None:
        """Unblock copiers still waiting for the shim to open a FIFO (creation failed)."""
        s = self.fifos.stdio
        with self._lock:
            self._cancelled = True
        for path, flags in ((s.stdout, os.O_WRONLY), (s.stderr, os.O_WRONLY), (s.stdin, os.O_RDONLY)):
            if path:
                try:
                    fd = os.open(path, flags | os.O_NONBLOCK)
                    os.close(fd)
                except OSError:
                    pass
        self.close_stdin()

    def close(self) -> None:
        self.close_stdin()
        self.fifos.remove()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class DetachKeys:
    """Recognises docker's detach sequence (ctrl-p ctrl-q by default) in typed input."""

    def __init__(self, spec: str = "ctrl-p,ctrl-q"):
        self.sequence = parse_detach_keys(spec)
        self._matched = b""

    def __call__(self, data: bytes) -> bytes | None:
        if not self.sequence:
            return data
        out = bytearray()
        for byte in data:
            b = bytes([byte])
            if self.sequence.startswith(self._matched + b):
                self._matched += b
                if self._matched == self.sequence:
                    return None
                continue
            out += self._matched + b
            self._matched = b""
        return bytes(out)


def parse_detach_keys(spec: str) -> bytes:
    """`ctrl-p,ctrl-q` → b'\\x10\\x11'; `a,b` → b'ab'; '' → no detach."""
    out = bytearray()
    for key in filter(None, (k.strip() for k in spec.split(","))):
        if key.lower().startswith("ctrl-") and len(key) == 6:
            ch = key[5].lower()
            if "a" <= ch <= "z":
                out.append(ord(ch) - ord("a") + 1)
            else:
                out.append({"@": 0, "[": 27, "\\": 28, "]": 29, "^": 30, "_": 31}.get(ch, 0))
        elif len(key) == 1:
            out.append(ord(key))
        else:
            from runtimed.errors import InvalidArgument

            raise InvalidArgument(f"invalid detach key {key!r}: use ctrl-<letter> or a single character")
    return bytes(out)
