"""One reaper owns waitpid for every child of the shim's worker: the OCI runtime commands it
runs, and, as child subreaper, the container processes reparented to it. Exits the
keeper reaped (shimd/keeper.py) arrive through `deliver`.

Exits are dispatched by pid. An exit can arrive before anyone asks for it (a container
init that dies before its pid file is read), so unclaimed exits are kept for a while.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import OrderedDict

MAX_UNCLAIMED = 4096
# An exit reaped before anyone asked is claimed within moments (the runtime's pid file is
# read right after it returns); older ones belong to earlier holders of the pid.
UNCLAIMED_TTL = 10.0


def exit_code(wait_status: int) -> int:
    """containerd's convention: the exit code, or 128 + signal for a signalled process."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def exited_children():
    """(pid, wait status) of every child that has exited, reaped, until none is left; for
    the worker's Reaper and the keeper (shimd/keeper.py) alike."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


class WorkerLoop(asyncio.SelectorEventLoop):
    """The worker's event loop. asyncio checks each signal it adds or removes a handler
    for against `signal.valid_signals()`, a set of ~65 enums it builds on every call: ~0.4
    ms of CPU for a worker's four (SIGCHLD and SIGTERM, added and removed)."""

    def _check_signal(self, sig: int) -> None:
        if not isinstance(sig, int):
            raise TypeError(f"sig must be an int, not {sig!r}")
        if not 1 <= sig < signal.NSIG:
            raise ValueError(f"sig {sig} out of range(1, {signal.NSIG})")


class Reaper:
    def __init__(self) -> None:
        self._waiters: dict[int, asyncio.Future] = {}
        self._unclaimed: OrderedDict[int, tuple[int, float]] = OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.deliveries = 0  # exits handed out so far (a worker retires only after a quiet look)

    def install(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()  # children that exited before the handler existed

    def reap(self) -> None:
        for pid, status in exited_children():
            self.deliver(pid, exit_code(status), time.time())

    def deliver(self, pid: int, code: int, at: float) -> None:
        """An exit: reaped here, or by the shim's keeper (a process orphaned by a retired
        worker is the keeper's child, shimd/keeper.py)."""
        self.deliveries += 1
        result = (code, at)
        future = self._waiters.pop(pid, None)
        if future is not None and not future.done():
            future.set_result(result)
        else:
            self._unclaimed[pid] = result
            while len(self._unclaimed) > MAX_UNCLAIMED:
                self._unclaimed.popitem(last=False)

    def wait(self, pid: int) -> asyncio.Future:
        """A future of (exit code, exit time) for `pid`, which must be our child."""
        loop = self._loop or asyncio.get_running_loop()
        future = loop.create_future()
        result = self._unclaimed.pop(pid, None)
        if result is not None and time.time() - result[1] < UNCLAIMED_TTL:
            future.set_result(result)
        else:  # none, or an old exit of a process that had this pid before (pid reuse)
            self._waiters[pid] = future
        return future

    def spawn(
        self, argv: list[str], stdio: tuple[int, int, int]
    ) -> tuple[int, asyncio.Future]:
        """Start `argv` with the given stdio fds; posix_spawn, so no Python runs in the child."""
        actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(stdio)]
        pid = os.posix_spawnp(
            argv[0], argv, dict(os.environ), file_actions=actions,
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ), setsigmask=(),
        )
        return pid, self.wait(pid)
