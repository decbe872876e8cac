"""The shim zygote: one long-lived process that has imported everything a shim needs
(the gRPC server runtimed/services/h2server.py, protobuf, the shim API, shimd), served one call through it (so lazy imports and
caches are filled), froze those objects out of the garbage collector, and forks one shim
per container on request. The forked shims
share those pages copy-on-write, so an idle shim costs a few MB of its own instead of a
whole Python + grpcio (see docs/shim.md for the measurements).

    python -m shimd.zygote --socket PATH

Protocol on the unix socket: one JSON line in, `{"id", "namespace", "bundle"}`, one
JSON line out, `{"address": ...}` or `{"error": ..., "code": <gRPC status name>}`;
`{"op": "spare", "socket": PATH}` forks a spare shim that keeps this connection (docs/shim.md);
`{"op": "exit"}` stops the zygote: it stops listening at once (its socket file goes) and
ends once the shims starting have answered. Each shim is
double-forked (new session, the intermediate exits), so it is neither the zygote's nor
runtimed's child. Requests are forked as they come: the zygote answers each when its
shim says it is ready, and forks the next meanwhile. A fork that fails (a pids limit) is
one log line and a RESOURCE_EXHAUSTED answer; the zygote carries on.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

READY_TIMEOUT = 30.0
REQUEST_TIMEOUT = 5.0


def preload() -> None:
    """Import what every shim uses, in the zygote, while it is single-threaded; then one
    call through a shim server, so what the server and protobuf set up lazily on the first
    request is shared too (measured: 1 MB less private memory per shim)."""
    import runtimed.api.cgroups.stats.v1.metrics_pb2  # noqa: F401
    import runtimed.api.cgroups.v2.stats.metrics_pb2  # noqa: F401
    import runtimed.services.h2server  # noqa: F401
    import shimd.cgroups  # noqa: F401
    import shimd.cgroups.v1  # noqa: F401
    import shimd.cgroups.v2  # noqa: F401
    import shimd.keeper  # noqa: F401 - what runs all the time: imported after the fork it would be private
    import shimd.lifecycle  # noqa: F401
    import shimd.metrics  # noqa: F401
    import shimd.oci.__main__  # noqa: F401 - the create/exec workers run the command line
    import shimd.oci.commands  # noqa: F401 - the built-in runtime's in-process commands
    import shimd.oci.init  # noqa: F401 - create/exec in the workers
    import shimd.oci.state  # noqa: F401
    import shimd.outbox  # noqa: F401
    import shimd.reaper  # noqa: F401
    import shimd.runtime  # noqa: F401
    import shimd.server  # noqa: F401
    import shimd.service  # noqa: F401
    import shimd.shim  # noqa: F401
    import shimd.stdio  # noqa: F401
    import shimd.workers  # noqa: F401

    asyncio.run(_warm_up())
    gc.collect()
    gc.freeze()
    # hand freed heap back to the kernel before forking: fewer pages for the shims to share
    ctypes.CDLL(None).malloc_trim(0)


async def _warm_up() -> None:
    """Serve a Connect on a private socket and call it, then close everything."""
    import tempfile

    from runtimed.api.shim.v1 import shim_pb2
    from runtimed.runtime.h2client import Channel
    from shimd.reaper import Reaper
    from shimd.service import ShimServer, ShimService
    from shimd.shim import Shim

    with tempfile.TemporaryDirectory(prefix="shimd-zygote-") as tmp:
        path = os.path.join(tmp, "warm.sock")
        server = ShimServer(ShimService(Shim("warm-up", Path(tmp), Reaper())))
        await server.start(path)
        channel = Channel(path)
        try:
            answer = await channel.unary("/runtimed.shim.v1.Shim/Connect",
                                         shim_pb2.ConnectRequest(id="warm-up").SerializeToString())
            shim_pb2.ConnectResponse.FromString(answer)
        finally:
            await channel.close()
            await server.stop(0)


class ForkFailed(Exception):
    """A fork of the zygote failed (EAGAIN under a pids limit, ENOMEM)."""


FORK_FAILED = b"!"  # first byte on the ready pipe when the intermediate could not fork


def fork_shim(id: str, namespace: str, bundle: Path, conn: socket.socket,
              not_for_the_shim: list[int], spare: Path | None = None) -> tuple[int, int]:
    """Double-fork a shim: (the intermediate's pid, the read end of the shim's ready pipe).
    The shim writes its address there once it serves, then closes it. A spare (serving
    on the socket `spare`, see shimd.server.run_spare) keeps `conn` as its lifeline.
    `not_for_the_shim`: the zygote's other descriptors (its listener, the connections
    and pipes of other shims starting), closed in the child."""
    from shimd.server import run, run_spare

    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(read_end)
        os.close(write_end)
        raise ForkFailed(f"cannot fork a shim: {exc.strerror}") from None
    if pid == 0:
        code = 1
        try:
            for fd in not_for_the_shim:
                os.close(fd)
            control = conn.detach()
            if spare is None:
                os.close(control)
            os.close(read_end)
            os.setsid()
            try:
                if os.fork() != 0:
                    os._exit(0)
            except OSError as exc:
                os.write(write_end, FORK_FAILED + exc.strerror.encode())
                os._exit(1)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            if spare is not None:
                code = run_spare(spare, write_end, control)
            else:
                code = run(id, namespace, bundle, ready_fd=write_end)
        except BaseException:  # noqa: BLE001 - a forked child must never return
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write_end)
    return pid, read_end


@dataclass
class Starting:
    """A shim forked for a caller and not serving yet: the caller waits on `conn`."""

    conn: socket.socket
    request: dict
    intermediate: int  # the first fork's pid, reaped once the pipe closes
    deadline: float
    answer: bytearray = field(default_factory=bytearray)

    @property
    def name(self) -> str:
        return f"{self.request.get('namespace', 'default')}/{self.request.get('id', 'spare')}"

    def address(self) -> str:
        """What the shim wrote on its ready pipe, as its address (or raise)."""
        address = self.answer.decode(errors="replace").strip()
        if address.startswith(FORK_FAILED.decode()):
            raise ForkFailed(f"cannot fork a shim: {address[1:]}")
        if not address:
            where = (f"{self.request['bundle']}/shim.log" if "bundle" in self.request
                     else "the zygote's log")
            raise RuntimeError(f"shim for {self.name} failed to start, see {where}")
        return address


class Zygote:
    """Serves fork requests; a shim's start (its keeper's setup until it listens) runs
    while the next request is forked. Sequential, one start queued behind the other took
    ~25 ms each on a busy 2-core machine: the last of 20 containers created at once
    waited ~0.5 s for its shim."""

    def __init__(self, listener: socket.socket, path: Path | None = None):
        self.listener = listener
        self.path = path  # the listener's socket file, removed at an exit request
        self._bound = path.stat() if path is not None else None
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ)
        self.starting: dict[int, Starting] = {}  # by the read end of the ready pipe
        self.exiting = False

    def serve(self) -> None:
        """Until an exit request, then until the shims starting have answered."""
        try:
            while not (self.exiting and not self.starting):
                deadline = min((s.deadline for s in self.starting.values()), default=None)
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                for key, _ in self.selector.select(timeout):
                    if key.fileobj is self.listener:
                        self._accept()
                    else:
                        self._read(key.fd)
                now = time.monotonic()
                for fd, starting in list(self.starting.items()):
                    if starting.deadline <= now:
                        self._answer(fd, TimeoutError(
                            f"shim for {starting.name} not ready in {READY_TIMEOUT}s"))
        finally:
            for fd in list(self.starting):
                self._answer(fd, RuntimeError("the zygote stops"))
            self.stop_listening()
            self.selector.close()

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        try:
            conn.settimeout(REQUEST_TIMEOUT)  # a caller that sends nothing holds no one up
            request = json.loads(conn.makefile("rb").readline() or b"{}")
            conn.settimeout(None)  # blocking again, as a spare's lifeline must be
            if not isinstance(request, dict):  # `request.get` below would end the zygote
                raise ValueError(f"not a JSON object: {request!r:.60}")
        except (OSError, ValueError) as exc:
            _reply(conn, {"error": f"bad request: {exc}"})
            return
        if request.get("op") == "exit":
            self.stop_listening()  # before the answer: the caller may start the next
            self.exiting = True
            _reply(conn, {"ok": True})
            return
        others = [self.listener.fileno(), self.selector.fileno()]
        for fd, starting in self.starting.items():
            others += [fd, starting.conn.fileno()]
        try:
            if request.get("op") == "spare":
                pid, fd = fork_shim("spare", "", Path(), conn, others,
                                    spare=Path(request["socket"]))
            else:
                pid, fd = fork_shim(request["id"], request.get("namespace", "default"),
                                    Path(request["bundle"]), conn, others)
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            _reply(conn, _error(request, exc))
            return
        self.starting[fd] = Starting(conn, request, pid, time.monotonic() + READY_TIMEOUT)
        self.selector.register(fd, selectors.EVENT_READ)

    def stop_listening(self) -> None:
        """No more requests: the listener closed and its socket file removed at once, so
        a caller meanwhile (the next runtimed) is refused and starts another zygote,
        instead of waiting in the backlog of one that ends once its shims are started.
        The file only if the path still names it (another zygote may listen there)."""
        if self.listener.fileno() >= 0:
            self.selector.unregister(self.listener)
            self.listener.close()
        if self.path is not None:
            try:
                now = self.path.stat()
                if (now.st_dev, now.st_ino) == (self._bound.st_dev, self._bound.st_ino):
                    self.path.unlink()
            except FileNotFoundError:
                pass

    def _read(self, fd: int) -> None:
        starting = self.starting[fd]
        chunk = os.read(fd, 4096)
        if chunk:
            starting.answer += chunk
            return
        try:
            answer = {"address": starting.address()}
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            answer = _error(starting.request, exc)
        self._answer(fd, answer)

    def _answer(self, fd: int, answer: dict | Exception) -> None:
        """Tell the caller and forget the start. At the pipe's end the intermediate has
        exited already (or is exiting: it closed its end), so its reaping does not wait."""
        starting = self.starting.pop(fd)
        self.selector.unregister(fd)
        os.close(fd)
        _reply(starting.conn, answer if isinstance(answer, dict) else _error(starting.request, answer))
        try:
            os.waitpid(starting.intermediate, 0 if isinstance(answer, dict) else os.WNOHANG)
        except ChildProcessError:
            pass


def _error(request: dict, exc: Exception) -> dict:
    if isinstance(exc, ForkFailed):
        message = f"{exc} (pids limit?)"
        print(f"shimd.zygote: {request.get('namespace')}/{request.get('id')}: {message}",
              file=sys.stderr, flush=True)
        return {"error": message, "code": "RESOURCE_EXHAUSTED"}
    return {"error": f"{type(exc).__name__}: {exc}"}


def _reply(conn: socket.socket, answer: dict) -> None:
    with conn:
        try:
            conn.sendall(json.dumps(answer).encode() + b"\n")
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shimd.zygote")
    parser.add_argument("--socket", required=True, type=Path)
    args = parser.parse_args(argv)
    read_end, write_end = os.pipe()
    if os.fork() != 0:  # the caller waits only until the zygote listens
        os.close(write_end)
        ok = os.read(read_end, 1) == b"1"
        return 0 if ok else 1
    os.close(read_end)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    log = os.open(f"{args.socket}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)
    from shimd.server import package_on_path

    package_on_path()  # inherited by every shim
    preload()
    if args.socket.exists():
        args.socket.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(args.socket))
    os.chmod(args.socket, 0o600)
    listener.listen(64)
    zygote = Zygote(listener, args.socket)
    os.write(write_end, b"1")
    os.close(write_end)
    zygote.serve()  # removes the socket file at its end
    return 0


if __name__ == "__main__":
    sys.exit(main())
