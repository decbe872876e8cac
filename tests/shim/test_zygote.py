"""The zygote under a pids limit (issue 11): a fork of a shim that fails is
RESOURCE_EXHAUSTED for runtimed and one line in the zygote's log, never a traceback; the
zygote keeps serving and leaves nothing behind (no zombie: it reaps the shims it forked)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

import pytest

from runtimed.errors import ResourceExhausted, Unavailable
from runtimed.runtime.shim import ShimManager
from tests.conftest import release_cgroup
from tests.shim.test_spare import alive, bundle_for, comm, run_true, wait_until

PIDS_ROOT = Path("/sys/fs/cgroup/pids")


@pytest.fixture
def state(workdir):
    path = workdir / "state"
    path.mkdir()
    yield path
    if (path / "shim-zygote.sock").exists():
        asyncio.run(ShimManager(path).stop_zygote())


def zygote_pid(state: Path) -> int:
    marker = str(state / "shim-zygote.sock").encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and not comm(int(entry)).startswith(("shimd-", "shimw-")):
            try:
                if marker in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    assert len(found) == 1, found
    return found[0]


def _running_on(socket_path: Path) -> bool:
    """A process whose command line names `socket_path` (a zygote of it) is running."""
    marker = str(socket_path).encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker in Path(f"/proc/{entry}/cmdline").read_bytes():
                    return True
            except OSError:
                pass
    return False


def _oldest_zygote(state: Path) -> int:
    """The zygote, while a shim it forked is still starting (that one has the zygote's
    command line and name until it takes its own)."""
    marker = str(state / "shim-zygote.sock").encode()
    started = {}
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if entry.isdigit() and marker in Path(f"/proc/{entry}/cmdline").read_bytes():
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                started[int(entry)] = int(stat[19])  # starttime, field 22
    return min(started, key=started.get)


def _state(pid: int) -> str:
    """The process state letter of `pid` ("Z": a zombie); "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def _pipes_and_sockets(pid: int) -> set[str]:
    """What `pid` has open of pipes and sockets ("pipe:[inode]", "socket:[inode]")."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith(("pipe:", "socket:")):
                found.add(target)
    return found


@pytest.mark.skipif(not (PIDS_ROOT / "cgroup.procs").exists(),
                    reason="needs the cgroup v1 pids hierarchy (this machine's layout)")
def test_fork_failures_in_the_zygote_are_clean(state, rootfs_template, cgroup_check):
    async def scenario() -> None:
        manager = ShimManager(state)
        manager.use_spare = False  # one fork per create, nothing in the background
        first = bundle_for(manager, rootfs_template, "first", ["true"])
        shim = await manager.start("sp", "first", first)
        # its pid is the zygote's answer (runtimed asks a forked shim no Connect)
        assert shim.pid == int((first / "shim.pid").read_text())
        assert await run_true(shim, "first", first) == 0
        zygote = zygote_pid(state)
        cgroup = PIDS_ROOT / f"runtimed-test-zygote-{os.getpid()}"
        cgroup.mkdir()
        try:
            (cgroup / "cgroup.procs").write_text(str(zygote))
            current = int((cgroup / "pids.current").read_text())
            (cgroup / "pids.max").write_text(str(current))
            bundle = bundle_for(manager, rootfs_template, "starved", ["true"])
            with pytest.raises(ResourceExhausted) as info:
                await manager.start("sp", "starved", bundle)
            assert "cannot fork a shim" in str(info.value)
            assert "Resource temporarily unavailable" in str(info.value)
            assert not (bundle / "address").exists()
            (cgroup / "pids.max").write_text("max")
            fed = bundle_for(manager, rootfs_template, "fed", ["true"])
            assert await run_true(await manager.start("sp", "fed", fed), "fed", fed) == 0
        finally:
            release_cgroup(cgroup)
        assert zygote_pid(state) == zygote  # the same zygote served throughout
        deadline = time.monotonic() + 10  # the shims it forked exit: reaped then
        while zombies := [child for child in
                          Path(f"/proc/{zygote}/task/{zygote}/children").read_text().split()
                          if _state(int(child)) == "Z"]:
            assert time.monotonic() < deadline, f"shims left unreaped: {zombies}"
            await asyncio.sleep(0.02)
        log = (state / "shim-zygote.sock.log").read_text()
        assert "Traceback" not in log, log
        assert log.count("cannot fork a shim") == 1, log

    asyncio.run(scenario())


@contextlib.asynccontextmanager
async def blocked_on_its_address(manager: ShimManager, rootfs_template: Path, id: str):
    """The start of a shim that blocks writing its address (its temp file a FIFO nobody
    reads yet; until session 13 its log, which is now made at its first line); on the way
    out the FIFO is opened, and the shim must start and run its container to the end.
    The shim renames the FIFO to `address`, which is made a file again (the shim reads it
    when it exits)."""
    bundle = bundle_for(manager, rootfs_template, id, ["true"])
    os.mkfifo(bundle / ".address.tmp")
    start = asyncio.ensure_future(manager.start("sp", id, bundle))
    try:
        yield start
    finally:
        reader = os.open(bundle / ".address.tmp", os.O_RDONLY | os.O_NONBLOCK)
        try:
            client = await asyncio.wait_for(start, 20)
        finally:
            os.close(reader)
        (bundle / "address").unlink()
        (bundle / "address").write_text(client.address)
        assert await run_true(client, id, bundle) == 0


def test_a_shim_slow_to_start_does_not_hold_up_the_next(state, rootfs_template, cgroup_check):
    """The zygote forks the next shim while one it forked is still getting ready: here the
    first blocks writing its address (a FIFO nobody reads yet) until the second has started
    and run a container. The zygote used to wait for each shim's "ready" in turn (up to
    its 30 s timeout), one create behind another."""
    async def scenario() -> None:
        manager = ShimManager(state)
        manager.use_spare = False
        warm = bundle_for(manager, rootfs_template, "warm", ["true"])  # the zygote runs
        assert await run_true(await manager.start("sp", "warm", warm), "warm", warm) == 0
        # a shim that logged nothing has no log file: it is made at the first line
        assert not (warm / "shim.log").exists()
        async with blocked_on_its_address(manager, rootfs_template, "slow") as slow_start:
            quick = bundle_for(manager, rootfs_template, "quick", ["true"])
            client = await asyncio.wait_for(manager.start("sp", "quick", quick), 20)
            # forked while the slow one starts: none of the zygote's pipes and sockets
            # (its listener, the slow one's ready pipe and its caller's connection)
            quick_shim = int((quick / "shim.pid").read_text())
            shared = _pipes_and_sockets(_oldest_zygote(state)) & _pipes_and_sockets(quick_shim)
            assert await run_true(client, "quick", quick) == 0
            assert not slow_start.done()  # still waiting for a reader of its address
        assert not shared, shared  # once both shims are gone

    asyncio.run(scenario())


def test_a_request_that_is_not_a_json_object_is_answered_and_the_zygote_serves_on(workdir):
    """A line that is JSON but not an object (`[]`, `"x"`, `1`) is a bad request, answered
    as such; the zygote used to end on it (AttributeError on `request.get`), failing every
    create after. Served in this process: nothing is forked for a bad request."""
    import json
    import socket
    import threading

    from shimd.zygote import serve

    path = str(workdir / "zygote.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    serving = threading.Thread(target=serve, args=(listener,), daemon=True)
    serving.start()

    def call(line: bytes) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(10)
            conn.connect(path)
            conn.sendall(line + b"\n")
            return json.loads(conn.makefile("rb").readline() or b"null")

    try:
        for line in (b"[]", b'"spare"', b"1", b"not json", b'{"op": "nope"}',
                     b'{"id": "x"}', b'{"op": "spare"}', b'{"id": 1, "bundle": "/b"}',
                     b"[" * 50000):  # too deep for the parser: RecursionError
            answer = call(line)
            assert "bad request" in answer["error"], (line, answer)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:  # a line in two
            conn.settimeout(10)
            conn.connect(path)
            conn.sendall(b'{"op": ')
            time.sleep(0.05)
            conn.sendall(b'"exit"}\n')
            assert json.loads(conn.makefile("rb").readline()) == {"ok": True}
        serving.join(10)
        assert not serving.is_alive()
    finally:
        listener.close()


def test_a_zygote_ending_leaves_the_next_zygotes_socket(workdir):
    """A zygote that ends (an exit request, answered once its starting shims are) removes
    its socket only if the path still names it: the next zygote may listen there by then,
    and removing its socket left it running with no one able to reach it."""
    import json
    import socket
    import subprocess
    import sys

    path = workdir / "zygote.sock"
    subprocess.run([sys.executable, "-m", "shimd.zygote", "--socket", str(path)],
                   check=True, timeout=60)  # returns once the zygote listens
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(10)
    conn.connect(str(path))  # to the first zygote, before its path names another socket
    path.unlink()
    successor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    successor.bind(str(path))
    try:
        conn.sendall(b'{"op": "exit"}\n')
        assert json.loads(conn.makefile("rb").readline()) == {"ok": True}
        assert conn.recv(1) == b""  # answered and closed
        deadline = time.monotonic() + 10
        while _running_on(path):
            assert time.monotonic() < deadline, "the first zygote did not end"
            time.sleep(0.05)
        assert path.exists()  # the successor's socket
    finally:
        conn.close()
        successor.close()
        path.unlink(missing_ok=True)


def test_an_exiting_zygote_refuses_new_callers_and_its_shims_still_start(
        state, rootfs_template, cgroup_check):
    """After an exit request the zygote stops listening at once: a caller then (the next
    runtimed's first create) is refused and starts another zygote; it used to wait in the
    backlog and read an empty answer (KeyError 'address': UNKNOWN). A shim it forked
    before is still answered for (its intermediate waits for its "ready"): here one that
    blocks opening its log (a FIFO) until after the exit."""
    import socket

    async def scenario() -> None:
        manager = ShimManager(state)
        manager.use_spare = False
        warm = bundle_for(manager, rootfs_template, "warm", ["true"])  # the zygote runs
        assert await run_true(await manager.start("sp", "warm", warm), "warm", warm) == 0
        zygote = zygote_pid(state)
        async with blocked_on_its_address(manager, rootfs_template, "slow") as slow_start:
            while not Path(f"/proc/{zygote}/task/{zygote}/children").read_text().split():
                await asyncio.sleep(0.01)  # the slow one's intermediate is forked
            await manager.stop_zygote()
            with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as late:
                    late.connect(str(state / "shim-zygote.sock"))
            assert not slow_start.done()
        again = bundle_for(manager, rootfs_template, "again", ["true"])  # a new zygote
        assert await run_true(await manager.start("sp", "again", again), "again", again) == 0
        assert zygote_pid(state) != zygote

    asyncio.run(scenario())


def test_a_zygote_that_answers_nothing_means_a_direct_launch(state, rootfs_template,
                                                           cgroup_check):
    """A zygote that closes a request without an answer (it was stopping): the create
    launches its shim directly instead of failing with a KeyError (UNKNOWN)."""
    import socket
    import threading

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(state / "shim-zygote.sock"))
    listener.listen()

    def hang_up() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(4096)
            conn.close()

    threading.Thread(target=hang_up, daemon=True).start()

    async def scenario() -> None:
        manager = ShimManager(state)
        manager.use_spare = False
        bundle = bundle_for(manager, rootfs_template, "direct", ["true"])
        client = await manager.start("sp", "direct", bundle)
        assert await run_true(client, "direct", bundle) == 0

    try:
        asyncio.run(scenario())
    finally:
        listener.close()
        (state / "shim-zygote.sock").unlink()


def test_a_shim_that_cannot_start_tells_its_caller_why(state, cgroup_check):
    """A shim that fails before it serves answers its caller with the error itself, not
    only a pointer to a log: for a bundle that is gone, the log it named did not exist
    (the traceback went to the zygote's log). Nothing is left: no socket, no zombie
    under the zygote."""
    import errno

    from runtimed.errors import Unavailable

    async def scenario() -> None:
        manager = ShimManager(state)
        manager.use_spare = False
        gone = manager.bundle_path("sp", "gone")
        with pytest.raises(Unavailable) as info:
            await manager.start("sp", "gone", gone)
        message = str(info.value)
        assert "No such file or directory" in message and "zygote's log" in message, message
        taken = manager.bundle_path("sp", "taken")
        (taken / "address").mkdir(parents=True)  # the shim cannot publish its address
        with pytest.raises(Unavailable) as info:
            await manager.start("sp", "taken", taken)
        message = str(info.value)
        assert os.strerror(errno.EISDIR) in message and f"{taken}/shim.log" in message, message
        assert not (taken / "shim.sock").exists()
        assert (taken / "address").is_dir()
        zygote = zygote_pid(state)
        deadline = time.monotonic() + 10
        while zombies := [child for child in
                          Path(f"/proc/{zygote}/task/{zygote}/children").read_text().split()
                          if _state(int(child)) == "Z"]:
            assert time.monotonic() < deadline, f"shims left unreaped: {zombies}"
            await asyncio.sleep(0.02)

    asyncio.run(scenario())


def test_a_shim_that_hangs_before_it_serves_is_killed_not_left_beside_another(
        state, rootfs_template, cgroup_check, monkeypatch):
    """A shim that has not served within LAUNCH_TIMEOUT (its address a FIFO nobody reads) is
    killed: the zygote's (it says its pid first), then the one the direct launch tries
    next (killed with its launcher's process group, which it leaves only once it serves).
    The create fails, and no shim is left to wake up later and serve the bundle beside
    whatever serves it then; both used to stay, blocked on the FIFO."""
    monkeypatch.setattr("runtimed.runtime.shim.LAUNCH_TIMEOUT", 1.0)

    def hung_shims(zygote: int, bundle: Path) -> list[int]:
        forked = [int(c) for c in
                  Path(f"/proc/{zygote}/task/{zygote}/children").read_text().split()]
        launched = [int(e) for e in os.listdir("/proc")
                    if e.isdigit() and _cmdline_names(int(e), bundle)]
        return [pid for pid in forked + launched if alive(pid)]

    async def scenario() -> None:
        manager = ShimManager(state)
        manager.use_spare = False
        warm = bundle_for(manager, rootfs_template, "warm", ["true"])
        assert await run_true(await manager.start("sp", "warm", warm), "warm", warm) == 0
        zygote = zygote_pid(state)
        wait_until(lambda: not hung_shims(zygote, warm))  # the warm shim has ended
        bundle = bundle_for(manager, rootfs_template, "hung", ["true"])
        os.mkfifo(bundle / ".address.tmp")
        try:
            with pytest.raises(Unavailable) as info:
                await manager.start("sp", "hung", bundle)
            assert "did not start in 1.0s" in str(info.value)
            wait_until(lambda: not hung_shims(zygote, bundle), timeout=5)
        finally:  # on the old code: let the hung shims go on, to their end
            reader = os.open(bundle / ".address.tmp", os.O_RDONLY | os.O_NONBLOCK)
            wait_until(lambda: not hung_shims(zygote, bundle), timeout=15)
            os.close(reader)

    asyncio.run(scenario())


def _cmdline_names(pid: int, path: Path) -> bool:
    try:
        return str(path).encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False


def test_a_shim_whose_caller_left_at_once_still_starts_quietly(state, rootfs_template,
                                                               cgroup_check):
    """A caller that closes its connection right after its request (runtimed killed then)
    still gets the shim it asked for, as before the pid line: the shim's writes to the
    gone caller fail quietly, it serves the bundle (a restarted runtimed finds it there),
    and the zygote's log has no traceback."""
    import json
    import signal
    import socket

    async def scenario() -> None:
        manager = ShimManager(state)
        manager.use_spare = False
        warm = bundle_for(manager, rootfs_template, "warm", ["true"])
        assert await run_true(await manager.start("sp", "warm", warm), "warm", warm) == 0

    asyncio.run(scenario())
    bundle = bundle_for(ShimManager(state), rootfs_template, "orphan", ["true"])
    with socket.socket(socket.AF_UNIX) as caller:
        caller.connect(str(state / "shim-zygote.sock"))
        caller.sendall(json.dumps({"id": "orphan", "namespace": "sp",
                                   "bundle": str(bundle)}).encode() + b"\n")
    wait_until(lambda: (bundle / "shim.pid").exists())
    pid = int((bundle / "shim.pid").read_text())
    try:
        assert alive(pid) and (bundle / "address").exists()
    finally:
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not alive(pid))
    log = (state / "shim-zygote.sock.log").read_text()
    assert "Traceback" not in log, log
