"""Run one shim: detach from whoever started it, become child subreaper, serve the shim
API on a unix socket, and publish the socket's address atomically in the bundle. The
process that stays is the shim's keeper (shimd/keeper.py); the serving is done by the
workers it forks (`_work`), each until it has been idle for IDLE_RETIRE.

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

from shimd.oci import linux

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
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)


def set_name(id: str, worker: bool = False) -> None:
    """`shimd-<id>` as the process name (top, ps -o comm), `shimw-<id>` for its worker
    (shimd/keeper.py): forked shims keep the zygote's command line, so this is what tells
    them apart at a glance."""
    name = ctypes.create_string_buffer(f"{'shimw' if worker else 'shimd'}-{id}"[:15].encode())
    linux.prctl(linux.PR_SET_NAME, ctypes.addressof(name))


def launch(id: str, namespace: str, bundle: Path) -> int:
    """Fork the shim; print its address once it serves. Exit status 0 on success."""
    package_on_path()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        code = 1

        def ready(address: str) -> None:
            # in the launcher's process group until it serves: a caller that gives up on
            # it kills the group (runtimed's ShimManager._launch), this shim included
            os.setsid()
            _tell(write_end, address)

        try:
            _redirect_stdio(bundle)
            configure_logging()
            code = run(id, namespace, bundle, ready=ready)
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
    """The `shimd` command's child: its fds 0-2 are its caller's until here (a shim the
    zygote forks has the zygote's: /dev/null, and the zygote's log as 2)."""
    null = os.open(os.devnull, os.O_RDWR)
    logfd = os.open(bundle / "shim.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(null, 0)
    os.dup2(logfd, 1)
    os.dup2(logfd, 2)
    os.close(null)
    os.close(logfd)


class ShimLog:
    """`sys.stdout` and `sys.stderr` of the zygote and of every shim it forks: one object,
    made before the forks (a keeper making its own kept ~0.1 MB more private memory; the
    smaps of idle keepers). A shim's lines go to `shim.log` in its bundle, its cwd
    once `_become` made it the shim of one, opened at the first line: most shims never
    write one, and each file made is an inode made and freed per container (docs/shim.md).
    Elsewhere (the zygote, a fork before `_become`), and for writes at the fd level, to
    the process's fd 2: the zygote's log, or the `shimd` command's shim.log."""

    file = None  # the bundle's log, once this process (or the one it was forked from) wrote

    def _target(self):
        if not _in_bundle:
            return sys.__stderr__
        if self.file is None:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            try:  # relative: the cwd follows the bundle into the trash
                fd = os.open("shim.log", flags, 0o600)
            except OSError:
                return sys.__stderr__
            self.file = open(fd, "w", buffering=1, errors="backslashreplace")
        return self.file

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        (self.file or sys.__stderr__).flush()

    def fileno(self) -> int:
        return self._target().fileno()

    def isatty(self) -> bool:
        return False


_in_bundle = False  # this process is the shim of one bundle, its cwd (`_become`)


def logs_to_bundle() -> bool:
    """Whether this process's log lines go to its bundle's `shim.log` (`ShimLog`)."""
    return _in_bundle


def _become(id: str, bundle: Path, worker: bool = False) -> None:
    """What makes this process the shim of one container: its cwd, log and name (a bundle
    that is gone leaves its log where it was: the zygote's)."""
    global _in_bundle
    os.chdir(bundle)
    _in_bundle = True  # (`ShimLog`: one page written, no object made)
    set_name(id, worker)


def configure_logging() -> None:
    """The shims' log lines, set up once where they are forked from (the zygote, or the
    `shimd` command's child): a worker only names its container (`log_as`). Setting
    logging up in each worker took ~0.4 ms of its CPU, in copies of pages the zygote
    shares; a keeper, which logs only what goes wrong, writes nothing for it."""
    sys.stdout = sys.stderr = ShimLog()
    logging.basicConfig(
        level=os.environ.get("SHIMD_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s shimd[%(process)d] %(shim)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_name_record)


_log_name = "-"  # namespace/id of the container this process serves


def log_as(id: str, namespace: str) -> None:
    global _log_name
    _log_name = f"{namespace}/{id}"


def _name_record(record: logging.LogRecord) -> bool:
    record.shim = _log_name
    return True


def package_on_path() -> None:
    """The built-in runtime runs as `python -m shimd.oci` from the bundle dir: keep the
    package importable wherever it was found. The zygote does it for every shim."""
    package_root = str(Path(__file__).resolve().parent.parent)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if package_root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([package_root, *paths])


def _tell(fd: int, address: str) -> None:
    os.write(fd, address.encode())
    os.close(fd)


def run(id: str, namespace: str, bundle: Path, ready=None) -> int:
    """Be the shim of `bundle`: its keeper (shimd/keeper.py), forking workers to serve.
    `ready(address)` once it serves."""
    from shimd.keeper import Keeper
    from shimd.outbox import write_atomic

    bundle = bundle.resolve()
    _become(id, bundle)
    set_subreaper()
    sock = socket_path(bundle)
    listener = _listen(sock)
    address = f"unix://{sock}"
    try:
        write_atomic(bundle / "address", address.encode())
        write_atomic(bundle / "shim.pid", str(os.getpid()).encode())
    except OSError:
        _remove(bundle, sock)
        raise
    if ready is not None:
        ready(address)
    keeper = Keeper(listener, _work, placement=(id, namespace, bundle))
    try:
        return keeper.run()
    finally:
        _remove(bundle, sock)


def run_spare(sock: Path, ready, control_fd: int) -> int:
    """A spare shim (docs/shim.md): serves on `sock` at once, learns its container from
    one JSON line on `control_fd` (`{"id", "namespace", "bundle"}`), answers
    `{"address": ...}` there, and from then on is that container's shim, still on `sock`
    (runtimed's channel to it stays valid; `<bundle>/address` names it). EOF on
    `control_fd` before a claim (runtimed stopped or died) ends it. Its first worker
    serves and reads the claim; the keeper takes the container's name when told."""
    from shimd.keeper import Keeper

    set_subreaper()
    set_name("spare")
    listener = _listen(sock)
    ready(f"unix://{sock}")
    keeper = Keeper(listener, _work, on_claim=lambda id, bundle: _become(id, Path(bundle)),
                    lifeline=control_fd)
    try:
        return keeper.run()
    finally:
        _remove(Path(keeper.placement[2]) if keeper.placement else None, sock)


def _listen(sock: Path):
    import socket

    sock.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    if sock.exists():
        sock.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is 0600 from the start
    try:
        listener.bind(str(sock))
    finally:
        os.umask(old_umask)
    listener.listen(128)
    return listener


def _remove(bundle: Path | None, sock: Path) -> None:
    """What a shim leaves when it ends: nothing runtimed could take for a live shim (the
    bundle's `address` only while it names this shim's socket)."""
    with contextlib.suppress(OSError):
        if bundle and (bundle / "address").read_text() == f"unix://{sock}":
            (bundle / "address").unlink()
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()


SHUTDOWN_GRACE = 1.0
CLAIM_LINE_MAX = 65536
IDLE_RETIRE = 1.0  # seconds a worker waits, idle, before handing back to its keeper
RETIRE_RETRY_MAX = 600.0  # the longest wait before a worker that could not retire tries again
IDLE_CHECK = 0.25


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


async def _take_claim(keeper, link, sock: Path):
    """A spare's claim, read from its lifeline (`_claim`) and taken: the keeper takes the
    container's name, log and cwd first (a keeper that cannot, stopped or gone, leaves
    runtimed's claim to time out), then this worker, then `address` and `shim.pid`. The
    writer to answer the claim on; None when there is none or it cannot be served."""
    from shimd.outbox import write_atomic

    claimed = await _claim(keeper.lifeline)
    if claimed is None:
        return None
    _, writer, (id, namespace, bundle) = claimed
    answer = await link.request({"claim": {"id": id, "namespace": namespace,
                                           "bundle": str(bundle)}})
    try:
        if not answer.get("claimed"):
            raise OSError(answer.get("error", "the keeper refused the claim"))
        if _hung_up(keeper.lifeline):
            raise OSError("runtimed hung up after its claim")
        _become(id, bundle, worker=True)
        log_as(id, namespace)
        write_atomic(bundle / "address", f"unix://{sock}".encode())
        write_atomic(bundle / "shim.pid", str(os.getppid()).encode())
    except OSError as exc:  # the bundle is gone (a claim whose runtimed died, then cleaned up)
        logging.getLogger("shimd").error("cannot serve %s: %s", bundle, exc)
        writer.close()
        return None
    keeper.placement = (id, namespace, bundle)
    return writer


def _work(keeper, channel) -> int:
    """A worker's life (shimd/keeper.py): serve until idle, then hand back; or until the
    shim ends. A spare's first worker learns its container from the lifeline; later ones
    restore what the last one left."""
    import asyncio

    set_subreaper()
    set_name(keeper.placement[0] if keeper.placement else "spare", worker=True)
    if keeper.placement:
        log_as(*keeper.placement[:2])
    from shimd.reaper import WorkerLoop

    with asyncio.Runner(loop_factory=WorkerLoop) as runner:
        return runner.run(_serve(keeper, channel))


async def _serve(keeper, channel) -> int:
    import asyncio
    import json

    from shimd import service
    from shimd.reaper import Reaper
    from shimd.shim import Shim

    log = logging.getLogger("shimd")
    loop = asyncio.get_running_loop()
    reaper = Reaper()
    reaper.install()
    link = _KeeperLink(channel, reaper)
    api = service.ShimService(None)
    api.shim_pid = os.getppid()
    server = service.ShimServer(api)
    await server.start(sock=keeper.listener)
    sock = Path(keeper.listener.getsockname())
    writer = None
    if keeper.placement is None:  # a spare's first worker
        writer = await _take_claim(keeper, link, sock)
        if writer is None:
            await server.stop(0)
            link.send({"shutdown": True})
            return 0
    if keeper.state is not None:
        shim = Shim.restore(json.loads(keeper.state), keeper.fds, reaper)
    else:
        shim = Shim(keeper.placement[0], Path(keeper.placement[2]), reaper)
        log.debug("serving on unix://%s%s", sock, " (a spare, claimed)" if writer else "")
    shim.shim_pid = api.shim_pid
    api.shim = shim
    link.catch_up(keeper.exits)
    if writer is not None:
        writer.write(json.dumps({"address": f"unix://{sock}"}).encode() + b"\n")
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()
    loop.add_signal_handler(signal.SIGTERM, lambda: shim.shutdown(now=True))
    ending = asyncio.ensure_future(shim.shutdown_requested.wait())
    idle = asyncio.ensure_future(_retire_when_idle(server, api, shim, reaper, link,
                                                   {ending, asyncio.current_task()}))
    await asyncio.wait({ending, idle}, return_when=asyncio.FIRST_COMPLETED)
    if not ending.done():  # the state did not fit, or the idle watch failed: serve on
        if idle.exception() is not None:
            log.error("idle watch failed, this worker will not retire: %r", idle.exception())
        await ending
    idle.cancel()
    log.debug("shutting down")
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
    link.send({"shutdown": True})
    return 0


async def _retire_when_idle(server, api, shim, reaper, link, ours: set) -> None:
    """Hand back to the keeper and exit once the worker has had nothing to do for
    IDLE_RETIRE seconds: no connection, no call, no exit delivered since the last look
    (its report may not have started yet), no task of its own (an exit being reported,
    an OOM event), the shim quiescent (nothing buffered, no start in flight). The last
    look and the exit run with no await between them: nothing can be accepted after it."""
    import asyncio

    loop = asyncio.get_running_loop()
    since = None
    wait = IDLE_RETIRE
    deliveries = reaper.deliveries
    while True:
        await asyncio.sleep(IDLE_CHECK)
        busy = (server.connections or api.active or reaper.deliveries != deliveries
                or asyncio.all_tasks() - ours - {asyncio.current_task()}
                or not shim.quiescent())
        deliveries = reaper.deliveries
        if busy:
            since = None
        elif since is None:
            since = loop.time()
        elif loop.time() - since >= wait:
            if _retire(shim, link):
                os._exit(0)  # nothing to tear down: every fd it needed is the keeper's now
            # its state does not fit in a message (an exec not started with a huge spec,
            # more fds than a message carries): serve on, and try again much later
            since, wait = None, min(wait * 8, RETIRE_RETRY_MAX)


def _retire(shim, link) -> bool:
    """Hand the shim's state and fds to the keeper. False (and serve on) when they do not
    fit in one message."""
    import socket

    from shimd.keeper import FDS_MAX

    shim.outbox.trim()
    data, fds = retirement(shim.snapshot, link.seen)
    try:
        if len(fds) > FDS_MAX:
            raise OSError(f"{len(fds)} fds, one message carries {FDS_MAX}")
        socket.send_fds(link.channel, [data], fds)
    except OSError as exc:  # EMSGSIZE, too many fds
        logging.getLogger("shimd").warning("cannot hand over to the keeper (%s): this worker "
                                           "serves on", exc)
        return False
    return True


def retirement(snapshot, seen: int) -> tuple[bytes, list[int]]:
    """The retire message (shimd/keeper.py) for the state `snapshot(keep)` returns, and
    the fds to attach to it. The keeper reads the first line only and keeps the state as
    it is, for the next worker."""
    import json

    index: dict[int, int] = {}  # fd → its place in the message (one fd kept once)
    woken: set[int] = set()  # the places of those the keeper polls
    counters: dict[int, tuple] = {}  # place → (file, key, value): see keep

    def keep(fd: int, wake: bool = False, counter: tuple | None = None) -> int:
        """`counter`: (file, key, value) for an inotify watch on `file`, which wakes the
        keeper for a worker only once the `key value` line there no longer says `value`."""
        at = index.setdefault(fd, len(index))
        if wake:
            woken.add(at)
        if counter is not None:
            counters[at] = counter
        return at

    state = json.dumps(snapshot(keep))
    header = json.dumps({"retire": True, "wake": sorted(woken), "counters": counters,
                         "seen": seen})
    return (header + "\n" + state).encode(), list(index)


class _KeeperLink:
    """The worker's end of the keeper's channel: exits the keeper reaped go to the reaper,
    in their order, each acknowledged (the keeper forgets it then), none before
    `catch_up` (the shim must be restored first, so that its processes are waited for)."""

    def __init__(self, channel, reaper) -> None:
        import asyncio

        self.channel = channel
        self.reaper = reaper
        self.seen = 0
        self._held: list[list] | None = []  # exits received before catch_up
        self._answer = None
        channel.setblocking(False)
        asyncio.get_running_loop().add_reader(channel.fileno(), self._receive)

    def catch_up(self, exits: list[list]) -> None:
        """Exits reaped before this worker was forked, then those received since."""
        held, self._held = self._held, None
        for exit in [*exits, *held]:
            self._deliver(exit)

    def _deliver(self, exit: list) -> None:
        if self._held is not None:
            self._held.append(exit)
            return
        number, pid, code, at = exit
        if number > self.seen:
            self.seen = number
            self.reaper.deliver(pid, code, at)
            self.send({"seen": number})

    def _receive(self) -> None:
        import json

        while True:
            try:
                data = self.channel.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # the keeper is gone; PDEATHSIG ends this worker
                import asyncio

                asyncio.get_running_loop().remove_reader(self.channel.fileno())
                return
            with contextlib.suppress(ValueError, KeyError, TypeError):
                message = json.loads(data)
                if "exit" in message:
                    self._deliver(message["exit"])
                elif self._answer is not None and not self._answer.done():
                    self._answer.set_result(message)

    def send(self, message: dict) -> None:
        import json

        with contextlib.suppress(OSError):
            self.channel.send(json.dumps(message).encode())

    async def request(self, message: dict) -> dict:
        """Send `message`, wait for the keeper's answer."""
        import asyncio

        self._answer = asyncio.get_running_loop().create_future()
        self.send(message)
        return await self._answer
