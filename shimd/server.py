"""Run one shim: detach from whoever started it, become child subreaper, serve the shim
API on a unix socket, and publish the socket's address atomically in the bundle.

`launch` is what the `shimd` command does: it forks, the child starts a new session and
serves, and the parent prints the address once the child is ready and exits, leaving the
child to init (or the nearest subreaper): the shim is never a child of runtimed.

The server is runtimed/services/h2server.py (the daemon's own) on the shim's asyncio loop
(shimd/service.py): one thread, so the shim forks its create/exec workers itself (shimd/workers.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import signal
import sys
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36
SOCKET_PATH_MAX = 100  # sun_path is 108 bytes including the NUL
FALLBACK_SOCKET_DIR = Path("/run/runtimed-shim")


def socket_path(bundle: Path) -> Path:
    """`<bundle>/shim.sock`, or a short hashed path when that is too long for AF_UNIX."""
    path = bundle / "shim.sock"
    if len(str(path)) <= SOCKET_PATH_MAX:
        return path
    digest = hashlib.sha256(str(bundle).encode()).hexdigest()[:24]
    return FALLBACK_SOCKET_DIR / f"{digest}.sock"


def set_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def set_name(id: str) -> None:
    """`shimd-<id>` as the process name (top, ps -o comm): forked shims keep the zygote's
    command line, so this is what tells them apart at a glance."""
    PR_SET_NAME = 15
    name = f"shimd-{id}"[:15].encode()
    ctypes.CDLL(None).prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)


def launch(id: str, namespace: str, bundle: Path) -> int:
    """Fork the shim; print its address once it serves. Exit status 0 on success."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        code = 1
        try:
            os.setsid()
            code = run(id, namespace, bundle, ready_fd=write_end)
        except BaseException:  # noqa: BLE001 - the child must never return into the caller
            logging.getLogger("shimd").exception("shim failed")
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as ready:
        address = ready.read().decode().strip()
    if not address:
        print(f"shimd: shim for {id} failed to start, see {bundle / 'shim.log'}", file=sys.stderr)
        return 1
    print(address)
    return 0


def _redirect_stdio(bundle: Path) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    logfd = os.open(bundle / "shim.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(null, 0)
    os.dup2(logfd, 1)
    os.dup2(logfd, 2)
    os.close(null)
    os.close(logfd)


def _become(id: str, namespace: str, bundle: Path) -> None:
    """What makes this process the shim of one container: its log, name and cwd."""
    _redirect_stdio(bundle)
    logging.basicConfig(
        level=os.environ.get("SHIMD_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s %(levelname)s shimd[{os.getpid()}] {namespace}/{id}: %(message)s",
        force=True,
    )
    set_name(id)
    os.chdir(bundle)


def _prepare_process() -> None:
    set_subreaper()
    # the built-in runtime runs as `python -m shimd.oci` from the bundle dir: keep the
    # package importable wherever it was found
    package_root = str(Path(__file__).resolve().parent.parent)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if package_root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([package_root, *paths])
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)


def run(id: str, namespace: str, bundle: Path, ready_fd: int | None = None) -> int:
    import asyncio

    bundle = bundle.resolve()
    _become(id, namespace, bundle)
    _prepare_process()
    return asyncio.run(_serve(id, bundle, ready_fd))


def run_spare(sock: Path, ready_fd: int, control_fd: int) -> int:
    """A spare shim (docs/shim.md): serves on `sock` at once, learns its container from
    one JSON line on `control_fd` (`{"id", "namespace", "bundle"}`), answers
    `{"address": ...}` there, and from then on is that container's shim, still on `sock`
    (runtimed's channel to it stays valid; `<bundle>/address` names it). EOF on
    `control_fd` before a claim (runtimed stopped or died) ends it."""
    import asyncio

    _prepare_process()
    set_name("spare")
    return asyncio.run(_serve(None, None, ready_fd, spare=(sock, control_fd)))


SHUTDOWN_GRACE = 1.0
CLAIM_LINE_MAX = 65536


async def _claim(control_fd: int):
    """(reader, writer, (id, namespace, bundle)) once claimed; None at EOF or SIGTERM."""
    import asyncio
    import json
    import socket

    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_unix_connection(
        sock=socket.socket(fileno=control_fd), limit=CLAIM_LINE_MAX)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    line_task = asyncio.ensure_future(reader.readline())
    stop_task = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([line_task, stop_task], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop_task.cancel()
        loop.remove_signal_handler(signal.SIGTERM)
    line = line_task.result() if line_task.done() and not line_task.exception() else b""
    if not line_task.done():
        line_task.cancel()
    if line and _hung_up(control_fd):
        # runtimed wrote the claim, then died or gave up on it (it waits for the answer
        # otherwise): nobody will use this shim, and a restarted runtimed may be removing
        # the bundle already
        line = b""
    try:
        request = json.loads(line) if line else None
        claim = (str(request["id"]), str(request.get("namespace", "default")),
                 Path(request["bundle"]).resolve()) if request else None
    except (ValueError, KeyError, TypeError):
        claim = None
    if claim is None:
        writer.close()
        return None
    return reader, writer, claim


def _hung_up(fd: int) -> bool:
    """Whether the peer of the stream socket `fd` has closed it (nothing left to read)."""
    import socket

    probe = socket.socket(fileno=os.dup(fd))
    try:
        return probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        probe.close()


async def _serve(id: str | None, bundle: Path | None, ready_fd: int | None,
                 spare: tuple[Path, int] | None = None) -> int:
    import asyncio
    import json

    from shimd import service
    from shimd.outbox import write_atomic
    from shimd.reaper import Reaper
    from shimd.shim import Shim

    log = logging.getLogger("shimd")
    reaper = Reaper()
    reaper.install()
    api = service.ShimService(None)
    server = service.ShimServer(api)
    sock = spare[0] if spare else socket_path(bundle)
    sock.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    if sock.exists():
        sock.unlink()
    old_umask = os.umask(0o177)  # the socket is 0600 from the start
    try:
        await server.start(str(sock))
    finally:
        os.umask(old_umask)
    writer = None
    if spare:
        os.write(ready_fd, f"unix://{sock}".encode())
        os.close(ready_fd)
        claimed = await _claim(spare[1])
        if claimed is None:
            await server.stop(0)
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
            return 0
        _, writer, (id, namespace, bundle) = claimed
    address = f"unix://{sock}"
    try:
        if spare:
            _become(id, namespace, bundle)
        write_atomic(bundle / "address", address.encode())
        write_atomic(bundle / "shim.pid", str(os.getpid()).encode())
    except OSError as exc:  # the bundle is gone (a claim whose runtimed died, then cleaned up)
        log.error("cannot serve %s: %s", bundle, exc)
        await server.stop(0)
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        return 1
    shim = Shim(id, bundle, reaper)
    api.shim = shim
    log.info("serving on %s%s", address, " (a spare, claimed)" if spare else "")
    if writer is not None:
        writer.write(json.dumps({"address": address}).encode() + b"\n")
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()
    elif ready_fd is not None:
        os.write(ready_fd, address.encode())
        os.close(ready_fd)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: shim.shutdown(now=True))
    await shim.shutdown_requested.wait()
    log.info("shutting down")
    # let the calls in flight (Shutdown's own answer) finish before closing connections
    deadline = loop.time() + SHUTDOWN_GRACE
    while api.active and loop.time() < deadline:
        await asyncio.sleep(0.005)
    # and for the clients to hang up (runtimed closes its channel after Shutdown): a
    # connection closed under a client still writing (a window update) fails its call
    # with EPIPE even though the answer is in its socket
    while server.connections and loop.time() < deadline:
        await asyncio.sleep(0.005)
    await server.stop(0)
    shim.close()
    for path in (bundle / "address", sock):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    return 0
