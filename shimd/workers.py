"""Create and exec workers forked by the shim itself, and the short-lived threads that
keep the shim single-threaded whenever it forks.

create and exec set up namespaces in forked children, so they must run in a process
with a single thread. The shim is one (its gRPC server on asyncio, no gRPC core threads), so it
forks a worker per request that runs `shimd.oci`'s command line in-process with the
request's stdio, as the spawned command would, and exits (~1 ms instead of a fresh
`python3 -S -m shimd.oci`, 60-120 ms). The worker is the shim's child and reaped by the
shim's reaper; the container init it creates is reparented to the shim (subreaper).

The light commands that block (delete waits for the init to die, pause for the freezer)
run in a thread started for the call and joined when it ends; a fork waits until none
is running, so no fork ever happens while a second thread exists.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading

from runtimed.errors import ResourceExhausted
from shimd.reaper import Reaper


class Threads:
    """One thread per blocking call, none left when the call is over."""

    def __init__(self) -> None:
        self.running = 0
        self._idle: asyncio.Event | None = None

    async def run(self, function, *args):
        loop = asyncio.get_running_loop()
        if self._idle is None:
            self._idle = asyncio.Event()
        future = loop.create_future()

        def settle(thread: threading.Thread, result, error) -> None:
            thread.join()  # it has only its exit left: returns at once
            self.running -= 1
            if not self.running:
                self._idle.set()
            if not future.done():
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)

        def target() -> None:
            result, error = None, None
            try:
                result = function(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                error = exc
            loop.call_soon_threadsafe(settle, thread, result, error)

        thread = threading.Thread(target=target, name="shimd-call", daemon=True)
        thread.start()  # RuntimeError "can't start new thread" under a pids limit: mapped
        self.running += 1
        self._idle.clear()
        return await future

    async def none_running(self) -> None:
        while self.running:
            await self._idle.wait()


async def fork_worker(argv: list[str], stdio: tuple[int, int, int], reaper: Reaper,
                      threads: Threads) -> int:
    """Exit status of `shimd.oci argv` run in a forked worker with `stdio` as 0, 1, 2."""
    await threads.none_running()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError as exc:  # EAGAIN under a pids limit
        raise ResourceExhausted(
            f"shimd.oci {argv_verb(argv)}: cannot fork: {exc.strerror} (pids limit?)"
        ) from None
    if pid == 0:
        _worker(argv, stdio)
    code, _ = await reaper.wait(pid)
    return code


def argv_verb(argv: list[str]) -> str:
    """The command in a runtime argv (after the global flags and their values)."""
    takes_value = {"--root", "--log", "--log-format", "--criu", "--rootless"}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in takes_value else 1
    return argv[i] if i < len(argv) else ""


def _worker(argv: list[str], stdio: tuple[int, int, int]) -> None:
    """In the forked child: the shim's loop, signal handlers and fds are none of its
    business; only the request's stdio stays open. Never returns."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        from shimd.server import set_name

        set_name("oci")  # what its container processes show until they execve
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        from shimd.oci.__main__ import main

        code = main(argv)
    except BaseException:  # noqa: BLE001 - a forked child must never return into the loop
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
