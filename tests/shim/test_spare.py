"""The spare shim (docs/shim.md): runtimed keeps one shim forked ahead of need; a create
claims it (it learns its container then) and the next one is forked in the background.
A spare never outlives the runtimed that asked for it, restart recovery never sees it,
and no socket of one is left behind. Driven through `ShimManager` (runtimed's side)
against the real zygote and shims.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket as sock_module
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from runtimed.api.shim.v1 import shim_pb2 as pb
from runtimed.runtime.shim import ShimManager
from tests.shim.conftest import REPO, make_spec


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def spares_of(state: Path) -> list[int]:
    """Spare shims forked for this state dir (they carry the zygote's command line)."""
    marker = str(state).encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and comm(int(entry)) == "shimd-spare":
            try:
                if marker in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


def wait_until(predicate, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


@pytest.fixture
def state(workdir):
    path = workdir / "state"
    path.mkdir()
    yield path
    zygote = path / "shim-zygote.sock"
    if zygote.exists():
        asyncio.run(ShimManager(path).stop_zygote())


def bundle_for(manager: ShimManager, rootfs_template: Path, id: str, args: list[str]) -> Path:
    bundle = manager.bundle_path("sp", id)
    bundle.mkdir(parents=True)
    shutil.copytree(rootfs_template, bundle / "rootfs", symlinks=True)
    (bundle / "config.json").write_text(json.dumps(make_spec(args)))
    return bundle


async def run_true(client, id: str, bundle: Path) -> int:
    await client.call("Create", pb.CreateRequest(id=id, bundle=str(bundle)), timeout=30)
    await client.call("Start", pb.StartRequest(id=id), timeout=10)
    status = (await client.call("Wait", pb.WaitRequest(id=id), timeout=30)).exit_status
    await client.call("Delete", pb.DeleteRequest(id=id), timeout=30)
    await client.call("Shutdown", pb.ShutdownRequest(id=id, now=True), timeout=10)
    await client.close()
    return status


def test_a_create_claims_the_spare_and_a_new_one_is_forked(state, rootfs_template,
                                                          cgroup_check, monkeypatch):
    monkeypatch.setenv("SHIMD_LOG_LEVEL", "DEBUG")  # the zygote's shims log their start

    async def scenario() -> None:
        manager = ShimManager(state)
        first = bundle_for(manager, rootfs_template, "first", ["true"])
        client = await manager.start("sp", "first", first)  # the zygote's first shim
        assert await run_true(client, "first", first) == 0
        await asyncio.wait_for(asyncio.shield(manager._spare), 30)
        [spare] = spares_of(state)

        second = bundle_for(manager, rootfs_template, "second", ["true"])
        client = await manager.start("sp", "second", second)
        reply = await client.call("Connect", pb.ConnectRequest(id="second"), timeout=5)
        assert reply.shim_pid == spare  # the spare became second's shim
        assert comm(spare) == "shimd-second"
        address = (second / "address").read_text()
        assert address == client.address  # runtimed's channel to the spare stays valid
        socket = Path(address.removeprefix("unix://"))
        assert socket.parent == state / "shim-sockets" and socket.is_socket()
        assert int((second / "shim.pid").read_text()) == spare
        assert "sp/second: serving on" in (second / "shim.log").read_text()
        assert await run_true(client, "second", second) == 0
        wait_until(lambda: not alive(spare))  # Shutdown: gone like any shim
        assert not socket.exists()
        await asyncio.wait_for(asyncio.shield(manager._spare), 30)
        [replacement] = spares_of(state)
        assert replacement != spare

        await manager.stop_zygote()
        assert not alive(replacement)  # runtimed stopping ends its spare first
        assert list((state / "shim-sockets").iterdir()) == []
        assert manager.scan() == [("sp", "first", first), ("sp", "second", second)]

    asyncio.run(scenario())


def test_a_killed_claimed_spare_leaves_no_socket(state, rootfs_template, cgroup_check):
    async def scenario() -> None:
        from runtimed.runtime.shim import BundleInfo

        manager = ShimManager(state)
        first = bundle_for(manager, rootfs_template, "first", ["true"])
        assert await run_true(await manager.start("sp", "first", first), "first", first) == 0
        await asyncio.wait_for(asyncio.shield(manager._spare), 30)
        held = bundle_for(manager, rootfs_template, "held", ["sleep", "1000"])
        client = await manager.start("sp", "held", held)
        await client.call("Create", pb.CreateRequest(id="held", bundle=str(held)), timeout=30)
        socket = Path(client.address.removeprefix("unix://"))
        assert socket.parent == state / "shim-sockets"
        shim = int((held / "shim.pid").read_text())
        await asyncio.wait_for(asyncio.shield(manager._spare), 30)
        spare_sockets = set((state / "shim-sockets").iterdir()) - {socket}
        os.kill(shim, signal.SIGKILL)
        wait_until(lambda: not alive(shim))
        await client.close()
        assert socket.exists()
        await manager.cleanup(BundleInfo("sp", "held", "", False), held)  # dead-shim cleanup
        assert not socket.exists()
        # one a crash left behind (bound, nobody listening): a restarted runtimed removes
        # it and keeps the live spare's
        stale = state / "shim-sockets" / "stale.sock"
        with sock_module.socket(sock_module.AF_UNIX, sock_module.SOCK_STREAM) as s:
            s.bind(str(stale))
        ShimManager(state)
        assert set((state / "shim-sockets").iterdir()) == spare_sockets
        await manager.stop_zygote()

    asyncio.run(scenario())


def test_a_spare_exits_when_its_runtimed_dies(state, rootfs_template, cgroup_check):
    """kill -9 of the process holding the ShimManager: its spare sees the connection close
    and exits, and removes its socket."""
    manager = ShimManager(state)
    bundle = bundle_for(manager, rootfs_template, "lone", ["true"])
    program = textwrap.dedent(f"""
        import asyncio, sys
        from pathlib import Path
        from runtimed.runtime.shim import ShimManager
        from tests.shim.test_spare import run_true

        async def main():
            manager = ShimManager(Path({str(state)!r}))
            bundle = Path({str(bundle)!r})
            assert await run_true(await manager.start("sp", "lone", bundle), "lone", bundle) == 0
            await asyncio.wait_for(asyncio.shield(manager._spare), 30)
            print("ready", flush=True)
            await asyncio.sleep(3600)

        asyncio.run(main())
    """)
    holder = subprocess.Popen([sys.executable, "-c", program], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        [spare] = spares_of(state)
        os.kill(holder.pid, signal.SIGKILL)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    wait_until(lambda: not alive(spare))
    assert list((state / "shim-sockets").iterdir()) == []


def shims_in(bundle: Path) -> list[int]:
    """Shims working in `bundle` (a shim's cwd is its bundle), by their keeper's pid: a
    process whose parent works there too is that shim's (a worker, shimd/keeper.py, or an
    init it forked, before its pivot_root), whatever it is named yet (a worker just forked
    still has its keeper's name)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/cwd") != str(bundle) or not alive(int(entry)):
                    continue
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry)] = int(stat[1])
    return sorted(pid for pid, parent in parents.items() if parent not in parents)


async def ready_spare(manager: ShimManager, rootfs_template: Path) -> int:
    """Start the zygote (one shim for a `true`), wait for the spare; its pid."""
    first = bundle_for(manager, rootfs_template, "first", ["true"])
    assert await run_true(await manager.start("sp", "first", first), "first", first) == 0
    spare = await asyncio.wait_for(asyncio.shield(manager._spare), 30)
    return spare.client.pid


def test_a_spare_that_does_not_answer_its_claim_is_killed(state, rootfs_template,
                                                          cgroup_check, monkeypatch):
    """The create falls back to a fork; the spare, which may have read the claim, must not
    serve the bundle next to the forked shim (it is killed and its socket removed)."""
    monkeypatch.setattr("runtimed.runtime.shim.LAUNCH_TIMEOUT", 1.0)

    async def scenario() -> None:
        manager = ShimManager(state)
        spare = await ready_spare(manager, rootfs_template)
        socket = Path(manager._spare.result().client.address.removeprefix("unix://"))
        bundle = bundle_for(manager, rootfs_template, "late", ["true"])
        os.kill(spare, signal.SIGSTOP)
        try:
            client = await manager.start("sp", "late", bundle)
        finally:
            with contextlib.suppress(ProcessLookupError):  # killed, and reaped by the zygote
                os.kill(spare, signal.SIGCONT)
        wait_until(lambda: not alive(spare))
        assert not socket.exists()
        assert client.pid != spare and shims_in(bundle) == [client.pid]
        assert (bundle / "address").read_text() == client.address
        assert await run_true(client, "late", bundle) == 0
        await manager.stop_zygote()

    asyncio.run(scenario())


@pytest.mark.parametrize("spare", [True, False], ids=["spare", "fork"])
def test_a_create_cancelled_mid_start_leaves_no_shim(state, rootfs_template, cgroup_check,
                                                     monkeypatch, spare):
    """Cancelled after the claim (or the zygote's fork request) went out: the shim that
    results is shut down and gone before the cancellation reaches the caller."""
    async def scenario() -> None:
        manager = ShimManager(state)
        spare_pid = await ready_spare(manager, rootfs_template)
        if spare:
            stalled = spare_pid
        else:  # no spare: the create asks the zygote, which we hold still
            await manager.close_spare()
            manager._closed = False
            manager.use_spare = False
            stalled = int(subprocess.check_output(
                ["pgrep", "-o", "-f", f"shimd.zygote --socket {state}/"]).split()[0])
        bundle = bundle_for(manager, rootfs_template, "cut", ["true"])
        os.kill(stalled, signal.SIGSTOP)
        try:
            starting = asyncio.ensure_future(manager.start("sp", "cut", bundle))
            await asyncio.sleep(0.3)  # the claim / fork request is written meanwhile
            starting.cancel()
        finally:
            os.kill(stalled, signal.SIGCONT)
        with pytest.raises(asyncio.CancelledError):
            await starting
        if spare:
            assert not alive(spare_pid)
        await manager.stop_zygote()  # served after the fork it was asked for
        assert shims_in(bundle) == []
        assert not (bundle / "address").exists()
        assert list((state / "shim-sockets").iterdir()) == []

    asyncio.run(scenario())


def test_a_claim_whose_runtimed_died_is_refused(state, rootfs_template, cgroup_check):
    """runtimed killed -9 right after writing a claim the spare had not read yet: the spare
    sees its lifeline closed behind the claim and exits instead of serving the bundle."""
    manager = ShimManager(state)
    first = bundle_for(manager, rootfs_template, "lone", ["true"])
    bundle = bundle_for(manager, rootfs_template, "orphan", ["true"])
    program = textwrap.dedent(f"""
        import asyncio, sys
        from pathlib import Path
        from runtimed.runtime.shim import ShimManager
        from tests.shim.test_spare import run_true

        async def main():
            manager = ShimManager(Path({str(state)!r}))
            first, bundle = Path({str(first)!r}), Path({str(bundle)!r})
            assert await run_true(await manager.start("sp", "lone", first), "lone", first) == 0
            spare = await asyncio.wait_for(asyncio.shield(manager._spare), 30)
            print(spare.client.pid, flush=True)
            sys.stdin.readline()  # the test has stopped the spare
            starting = asyncio.ensure_future(manager.start("sp", "orphan", bundle))
            await asyncio.sleep(0.3)
            print("claimed", flush=True)
            await starting

        asyncio.run(main())
    """)
    holder = subprocess.Popen([sys.executable, "-c", program], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    spare = 0
    try:
        spare = int(holder.stdout.readline())
        socket = next((state / "shim-sockets").iterdir())
        os.kill(spare, signal.SIGSTOP)
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "claimed"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    finally:
        if spare:
            os.kill(spare, signal.SIGCONT)
        holder.kill()
        holder.wait()
        holder.stdout.close()
        holder.stdin.close()
    wait_until(lambda: not alive(spare))
    assert not socket.exists()
    assert not (bundle / "address").exists() and shims_in(bundle) == []
