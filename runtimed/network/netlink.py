"""runtimed's side of the network helper (see `runtimed.network.helper`).

One helper process, started on first use and restarted if it dies; calls are serialized
by a lock, so any worker thread may call, and no runtimed thread ever changes namespace.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading

from runtimed import errors


class NetlinkHelper:
    def __init__(self, lock_path: str | None = None):
        """`lock_path` (in the daemon's state dir): the helper holds it for its life, so
        the helper of a restarted runtimed waits for a predecessor still finishing."""
        self.lock_path = lock_path
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._ever_started = False

    @property
    def started(self) -> bool:
        """Whether network work happened in this process's lifetime."""
        return self._ever_started

    def _start(self) -> subprocess.Popen:
        self._ever_started = True
        lock = ["--lock", self.lock_path] if self.lock_path else []
        return subprocess.Popen(
            [sys.executable, "-m", "runtimed.network.helper", *lock],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            close_fds=True,
        )

    def call(self, op: str, **args):
        request = json.dumps({"op": op, "args": args}) + "\n"
        with self._lock:
            for attempt in (0, 1):
                if self._proc is None or self._proc.poll() is not None:
                    self._proc = self._start()
                try:
                    self._proc.stdin.write(request)
                    self._proc.stdin.flush()
                    line = self._proc.stdout.readline()
                except (BrokenPipeError, OSError):
                    line = ""
                if line:
                    break
                self._reap()
                if attempt:
                    raise errors.Unavailable(f"network helper exited during {op}")
        reply = json.loads(line)
        if reply["ok"]:
            return reply["result"]
        error = getattr(errors, reply.get("kind", ""), errors.Unavailable)
        if not (isinstance(error, type) and issubclass(error, errors.RuntimedError)):
            error = errors.Unavailable
        raise error(reply["error"])

    def _reap(self) -> None:
        if self._proc is not None:
            try:
                self._proc.kill()
            except ProcessLookupError:
                pass
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.stdin.close()
                try:
                    self._proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
            self._reap()
