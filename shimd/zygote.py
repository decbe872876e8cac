"""The shim zygote: one long-lived process that has imported everything a shim needs
(the gRPC server runtimed/services/h2server.py, protobuf, the shim API, shimd), served one call through it (so lazy imports and
caches are filled), froze those objects out of the garbage collector, and forks one shim
per container on request. The forked shims
share those pages copy-on-write, so an idle shim costs a few MB of its own instead of a
whole Python + grpcio (see docs/shim.md for the measurements).

    python -m shimd.zygote --socket PATH

Protocol on the unix socket: one JSON line in, `{"id", "namespace", "bundle"}`; out, the
forked shim's `{"pid": N}`, then one JSON line, `{"address": ...}` or `{"error": ...,
"code": <gRPC status name>}` (a refused request or a failed fork: that line alone);
`{"op": "spare", "socket": PATH}` forks a spare shim that keeps this connection (docs/shim.md);
`{"op": "exit"}` stops the zygote at once (its listener closed, its socket file gone).
Each shim is forked once, into a session of its own, and answers its caller itself
once it serves, while the zygote is back at its listener (shims start side by side, and
one still starting when the zygote stops still answers); the zygote reaps the shims it
forked. A fork that fails (a pids limit) is one log line and a RESOURCE_EXHAUSTED
answer; the zygote carries on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import os
import signal
import socket
import sys
from pathlib import Path

from shimd.server import logs_to_bundle, run, run_spare

REQUEST_TIMEOUT = 5.0
REQUEST_MAX = 1 << 16


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


def fork_shim(request: dict, conn: socket.socket, listener: socket.socket) -> int:
    """Fork the shim `request` asks for; its pid. The shim answers the caller on `conn`
    itself once it serves (or says why it cannot), so the zygote is back at its listener
    at once and serves the next request while this shim starts; it reaps the shim when
    it exits (`_reap`). Until the shim is forked the zygote does no more than it must:
    every page it writes becomes private to the shims it forked before (docs/shim.md).
    A spare (serving on the socket `request["socket"]`, see shimd.server.run_spare) keeps
    `conn` as its lifeline."""
    try:
        pid = os.fork()
    except OSError as exc:
        raise ForkFailed(f"cannot fork a shim: {exc.strerror}") from None
    if pid == 0:
        code = 1
        try:
            listener.close()
            os.setsid()  # its own session: a signal to the zygote's group is not its
            code = _be_the_shim(request, conn)
        except BaseException:  # noqa: BLE001 - a forked child must never return
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def _be_the_shim(request: dict, conn: socket.socket) -> int:
    """Run the shim; the caller hears its address once it serves, or why not."""
    for signum in (signal.SIGTERM, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    spare = request.get("op") == "spare"
    caller = conn.detach()  # a spare's lifeline from then on
    # first its pid, so that runtimed can end a shim that hangs before it serves (bytes
    # formatted here, not json: every page this child writes is one more of its own); a
    # caller gone already changes nothing here, as for the answer (`_answer`)
    with contextlib.suppress(OSError):
        os.write(caller, b'{"pid": %d}\n' % os.getpid())
    answered = False

    def ready(address: str) -> None:
        nonlocal answered
        answered = True
        _answer(caller, {"address": address})
        if not spare:
            os.close(caller)

    try:
        if spare:
            return run_spare(Path(request["socket"]), ready, caller)
        return run(request["id"], request.get("namespace", "default"),
                   Path(request["bundle"]), ready=ready)
    except BaseException as exc:
        if not answered:
            _answer(caller, {"error": _why_not(request, exc)})
        raise


def _why_not(request: dict, exc: BaseException) -> str:
    """A shim's error before it served, for its caller: the error itself, and the log its
    traceback goes to (the bundle's once the shim took it as its stderr, else the
    zygote's: a bundle that is gone has no log; `server.ShimLog`)."""
    where = "the shim zygote's log"
    if "bundle" in request and logs_to_bundle():
        where = str(Path(request["bundle"]) / "shim.log")
    return f"{type(exc).__name__}: {exc} (see {where})"


def serve(listener: socket.socket, path: Path | None = None) -> None:
    """Fork what is asked until an exit request. `path`: the listener's socket file."""
    bound = path.stat() if path is not None else None
    try:
        while True:
            conn, _ = listener.accept()
            with conn:
                try:
                    conn.settimeout(REQUEST_TIMEOUT)  # a caller that sends nothing holds no one up
                    request = json.loads(_request_line(conn) or b"{}")
                    conn.settimeout(None)  # blocking again, as a spare's lifeline must be
                    if not isinstance(request, dict):
                        raise ValueError(f"not a JSON object: {request!r:.60}")
                    _check(request)
                except (OSError, ValueError, RecursionError) as exc:  # (a line nested too deep)
                    _reply(conn, {"error": f"bad request: {exc}"})
                    continue
                if request.get("op") == "exit":
                    # before the answer: the caller may start the next zygote at once
                    _stop_listening(listener, path, bound)
                    _reply(conn, {"ok": True})
                    return
                try:
                    fork_shim(request, conn, listener)
                except Exception as exc:  # noqa: BLE001 - reported to the caller
                    _reply(conn, _error(request, exc))
    finally:
        _stop_listening(listener, path, bound)


def _request_line(conn: socket.socket) -> bytes:
    """The request: one line, read with as few objects as can be (no file object): each
    page the zygote writes while serving is one more private page of the shims it forked
    before (docs/shim.md). 0.06 MB less per idle shim than makefile().readline()."""
    data = conn.recv(REQUEST_MAX)
    while data and not data.endswith(b"\n"):
        more = conn.recv(REQUEST_MAX)
        if not more:
            break
        data += more
        if len(data) > REQUEST_MAX:
            raise ValueError(f"request longer than {REQUEST_MAX} bytes")
    return data


_NEEDS = {None: ("id", "bundle"), "spare": ("socket",), "exit": ()}  # by "op"


def _check(request: dict) -> None:
    """A request has what its fork needs (checked here: the shim reads it after the fork)."""
    op = request.get("op")
    wanted = _NEEDS.get(op)
    if wanted is None:
        raise ValueError(f"unknown op {op!r:.60}")
    for key in wanted:
        if not isinstance(request.get(key), str) or not request[key]:
            raise ValueError(f"{key!r} missing")


def _stop_listening(listener: socket.socket, path: Path | None, bound) -> None:
    """The listener closed and its socket file removed, so a caller from now on is refused
    (and starts another zygote). The file only if the path still names it (another
    zygote may listen there)."""
    listener.close()
    if path is not None:
        try:
            now = path.stat()
            if (now.st_dev, now.st_ino) == (bound.st_dev, bound.st_ino):
                path.unlink()
        except FileNotFoundError:
            pass


def _reap(signum=None, frame=None) -> None:
    """SIGCHLD: reap the shims this zygote forked, as each exits."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _error(request: dict, exc: Exception) -> dict:
    if isinstance(exc, ForkFailed):
        message = f"{exc} (pids limit?)"
        print(f"shimd.zygote: {request.get('namespace')}/{request.get('id')}: {message}",
              file=sys.stderr, flush=True)
        return {"error": message, "code": "RESOURCE_EXHAUSTED"}
    return {"error": f"{type(exc).__name__}: {exc}"}


def _reply(conn: socket.socket, answer: dict) -> None:
    _answer(conn.fileno(), answer)


def _answer(fd: int, answer: dict) -> None:
    line = memoryview(json.dumps(answer).encode() + b"\n")
    try:
        while line:
            line = line[os.write(fd, line):]
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
    from shimd.server import configure_logging, package_on_path

    package_on_path()  # inherited by every shim
    configure_logging()
    preload()
    if args.socket.exists():
        args.socket.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(args.socket))
    os.chmod(args.socket, 0o600)
    listener.listen(64)
    signal.signal(signal.SIGCHLD, _reap)  # the shims, as each exits
    os.write(write_end, b"1")
    os.close(write_end)
    serve(listener, args.socket)  # removes the socket file at its end
    return 0


if __name__ == "__main__":
    sys.exit(main())
