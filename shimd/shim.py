"""The shim's core: one container's init and exec processes, driven through the OCI
runtime, supervised by the reaper, with every event appended to the outbox.

gRPC stays out of here (shimd/service.py translates); this class takes plain values.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

from runtimed import identifiers
from runtimed.errors import FailedPrecondition, InvalidArgument, NotFound
from shimd import __version__
from shimd.lifecycle import INIT, Emitted, Lifecycle, ProcessState, Status
from shimd.outbox import Outbox
from shimd.reaper import Reaper
from shimd.runtime import OciRuntime, command_for
from shimd.stdio import ProcessIO, StdioConfig

log = logging.getLogger("shimd")

FORCE_DELETE_TIMEOUT = 10.0


@dataclass(frozen=True)
class ExitInfo:
    pid: int
    exit_status: int
    exited_at: float


class Shim:
    def __init__(self, id: str, bundle: Path, reaper: Reaper, outbox: Outbox | None = None):
        self.id = id
        self.bundle = bundle
        self.reaper = reaper
        self.outbox = outbox or Outbox(bundle / "events.jsonl")
        self.lifecycle = Lifecycle(id)
        self.io: dict[str, ProcessIO] = {}
        self.stdio: dict[str, StdioConfig] = {}
        self._exited: dict[str, asyncio.Event] = {}
        self._exec_specs: dict[str, dict] = {}  # added, not started yet
        self.runtime: OciRuntime | None = None
        self.has_pid_namespace = True
        self.shutdown_requested = asyncio.Event()
        self.shim_pid = os.getpid()  # the keeper's, when a worker runs this (shimd/keeper.py)
        self._cgroup_path = ""
        self._oom = None

    # --- lifecycle -------------------------------------------------------------------

    async def create(self, stdio: StdioConfig, runtime: str = "") -> int:
        if INIT in self.lifecycle.processes:
            self.lifecycle.created(0)  # raises AlreadyExists
        try:
            spec = json.loads((self.bundle / "config.json").read_bytes())
        except FileNotFoundError:
            raise InvalidArgument(f"bundle {self.bundle} has no config.json") from None
        namespaces = spec.get("linux", {}).get("namespaces", [])
        self.has_pid_namespace = any(
            ns.get("type") == "pid" and not ns.get("path") for ns in namespaces
        )
        self._cgroup_path = spec.get("linux", {}).get("cgroupsPath", "")
        self.runtime = OciRuntime(command_for(runtime), self.bundle, self.reaper)
        self.runtime.use_library(spec)
        io = ProcessIO(stdio)
        during_setup = asyncio.get_running_loop().call_soon(self._during_setup)
        try:
            pid = await self._run_with_io(
                io,
                lambda: self.runtime.create(
                    self.id, str(self.bundle), str(self.bundle / "init.pid"), io.console_socket,
                    io.child_fds
                ),
            )
        except BaseException:
            during_setup.cancel()
            self._stop_oom()
            raise
        self.io[INIT] = io
        self.stdio[INIT] = stdio
        self._exited[INIT] = asyncio.Event()
        events = self.lifecycle.created(pid)
        self._watch(INIT, pid)
        if self._oom is None:
            self._watch_oom()
        await self._emit(events)
        return pid

    def _during_setup(self) -> None:
        """What needs no init, done while it sets up (the runtime waits for its report by
        the time this runs), off Create's wait: the OOM watch (the cgroup exists then;
        armed again after create if it did not yet: a runtime command still starting), and
        the outbox file made empty (a new inode: ~0.4 ms on this disk; empty reads as no
        events, and the first append finds it)."""
        self._watch_oom(early=True)
        try:
            os.close(os.open(self.outbox.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError:
            pass  # the first append makes it

    def _watch_oom(self, early: bool = False) -> None:
        """Report OOM kills in the container's cgroup as /tasks/oom (containerd's topic).
        `early`: the cgroup may not exist yet; a failure is tried again after create."""
        if not self._cgroup_path or self._oom is not None:
            return
        try:
            from shimd import cgroups

            self._oom = cgroups.open(self._cgroup_path).oom_events()
        except Exception as exc:  # noqa: BLE001 - no OOM events is not worth failing Create
            if not early:
                log.warning("OOM events unavailable for %s: %s", self._cgroup_path, exc)
            return
        asyncio.get_running_loop().add_reader(self._oom.fileno(), self._on_oom)

    def _on_oom(self) -> None:
        try:
            kills = self._oom.read()
        except OSError:
            kills = 0
            self._stop_oom()
        # none before /tasks/create: runtimed takes any event it relayed for "created"
        if kills and INIT in self.lifecycle.processes:
            asyncio.ensure_future(self._emit([Emitted("/tasks/oom")]))

    def _stop_oom(self) -> None:
        if self._oom is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._oom.fileno())
            self._oom.close()
            self._oom = None

    async def _run_with_io(self, io: ProcessIO, command):
        """`command()`'s result, with the process's console received and stdio set up."""
        receive = asyncio.ensure_future(io.receive_console()) if io.console_socket else None
        try:
            result = await command()
            if receive is not None:
                await receive
        except BaseException:
            if receive is not None:
                receive.cancel()
                with contextlib.suppress(BaseException):
                    await receive
            io.close()
            raise
        io.spawned()
        return result

    async def exec(self, exec_id: str, stdio: StdioConfig, process: bytes) -> None:
        identifiers.validate(exec_id, "exec id")
        try:
            spec = json.loads(process)
        except ValueError as exc:
            raise InvalidArgument(f"exec process spec is not valid JSON: {exc}") from None
        if not spec.get("args"):
            raise InvalidArgument("exec process spec has no args")
        if bool(spec.get("terminal")) != stdio.terminal:
            spec["terminal"] = stdio.terminal
        events = self.lifecycle.exec_added(exec_id)
        self._exec_specs[exec_id] = spec
        self.stdio[exec_id] = stdio
        self._exited[exec_id] = asyncio.Event()
        await self._emit(events)

    async def start(self, exec_id: str = INIT) -> int:
        process = self.lifecycle.start_begun(exec_id)
        try:
            if exec_id == INIT:
                await self._runtime.start(self.id)
                pid = process.pid
            else:
                pid = await self._start_exec(exec_id)
        except BaseException:
            await self._emit(self.lifecycle.start_failed(exec_id))
            raise
        await self._emit(self.lifecycle.started(exec_id, pid))
        return pid

    async def _start_exec(self, exec_id: str) -> int:
        stdio = self.stdio[exec_id]
        io = ProcessIO(stdio)
        pid = 0

        async def run() -> None:
            nonlocal pid
            pid = await self._runtime.exec(
                self.id, self._exec_specs.pop(exec_id), self.bundle / "execs", exec_id,
                io.console_socket, io.child_fds,
            )

        await self._run_with_io(io, run)
        self.io[exec_id] = io
        self._watch(exec_id, pid)
        return pid

    def _watch(self, exec_id: str, pid: int) -> None:
        future = self.reaper.wait(pid)
        future.add_done_callback(
            lambda f: asyncio.ensure_future(self._on_exit(exec_id, pid, *f.result()))
        )

    async def _on_exit(self, exec_id: str, pid: int, code: int, at: float) -> None:
        """Report an exit: the outbox records it (appended before any Wait or the event
        stream hears of it; the one durable record of it); init's exit ends the container."""
        if exec_id not in self.lifecycle.processes:
            return
        events = self.lifecycle.exited(exec_id, code, at)
        if exec_id == INIT:
            await self._kill_rest()
        await self._emit(events)

    async def _kill_rest(self) -> None:
        """Init exited: every other process of the container goes too. A pid namespace
        does that in the kernel; without one, kill them through the runtime."""
        for exec_id, process in self.lifecycle.processes.items():
            if exec_id != INIT and process.status == Status.CREATED:
                self.lifecycle.exited(exec_id, 255)
                self._exited[exec_id].set()
        if self.has_pid_namespace:
            return
        with contextlib.suppress(Exception):
            await self._runtime.kill(self.id, signal.SIGKILL, all=True)

    async def _emit(self, events: list[Emitted]) -> None:
        for event in events:
            await self.outbox.append(
                event.topic,
                id=self.id,
                exec_id=event.exec_id,
                pid=event.pid,
                exit_status=event.exit_status,
                exited_at=event.exited_at,
            )
            if event.topic == "/tasks/exit":
                self._exited[event.exec_id].set()

    async def wait(self, exec_id: str = INIT) -> ExitInfo:
        self.lifecycle.get(exec_id)
        await self._exited[exec_id].wait()
        return self._exit_info(exec_id)

    def _exit_info(self, exec_id: str) -> ExitInfo:
        process = self.lifecycle.get(exec_id)
        return ExitInfo(process.pid, process.exit_status, process.exited_at)

    async def kill(self, exec_id: str, sig: int, all: bool = False) -> None:
        process = self.lifecycle.get(exec_id)
        if exec_id == INIT or all:
            if process.status == Status.STOPPED and not all:
                raise NotFound(f"task {self.id!r}: process already finished")
            await self._runtime.kill(self.id, sig, all=all)
            return
        if process.status == Status.STOPPED:
            raise NotFound(f"exec process {exec_id!r} of {self.id!r}: process already finished")
        if process.status == Status.CREATED:
            raise FailedPrecondition(f"exec process {exec_id!r} of {self.id!r} is not started")
        try:
            os.kill(process.pid, sig)
        except ProcessLookupError:
            raise NotFound(f"exec process {exec_id!r}: process already finished") from None

    async def delete(self, exec_id: str = INIT, force: bool = False) -> ExitInfo:
        process = self.lifecycle.get(exec_id)
        if force and process.status in (Status.RUNNING, Status.PAUSED, Status.PAUSING):
            if process.status == Status.PAUSED:
                await self.resume()
            await self.kill(exec_id, signal.SIGKILL, all=exec_id == INIT)
            await asyncio.wait_for(self._exited[exec_id].wait(), FORCE_DELETE_TIMEOUT)
        if exec_id == INIT:
            await self._delete_init(process)
            self._stop_oom()
        events = self.lifecycle.deleted(exec_id)
        info = ExitInfo(process.pid, process.exit_status, process.exited_at)
        io = self.io.pop(exec_id, None)
        if io is not None:
            await io.wait_output(timeout=1.0)
            io.close()
        self.stdio.pop(exec_id, None)
        self._exec_specs.pop(exec_id, None)
        await self._emit(events)
        return info

    async def _delete_init(self, process: ProcessState) -> None:
        running = [e for e, p in self.lifecycle.processes.items()
                   if e and p.status in (Status.RUNNING, Status.PAUSED)]
        if running:
            raise FailedPrecondition(
                f"task {self.id!r} still has running exec processes: {', '.join(running)}"
            )
        if process.status == Status.CREATED:
            await self._runtime.delete(self.id, force=True)
            await asyncio.wait_for(self._exited[INIT].wait(), FORCE_DELETE_TIMEOUT)
            return
        if process.status != Status.STOPPED:
            self.lifecycle.deleted(INIT)  # raises with the reason
        with contextlib.suppress(NotFound):
            await self._runtime.delete(self.id, force=True)

    async def pause(self) -> None:
        self.lifecycle.require_running("pause")
        await self._runtime.pause(self.id)
        await self._emit(self.lifecycle.paused())

    async def resume(self) -> None:
        if self.lifecycle.init.status != Status.PAUSED:
            self.lifecycle.resumed()  # raises with the reason
        await self._runtime.resume(self.id)
        await self._emit(self.lifecycle.resumed())

    async def pids(self) -> list[tuple[int, str]]:
        self.lifecycle.init  # noqa: B018 - NotFound before create
        pids = await self._runtime.ps(self.id)
        by_pid = {p.pid: e for e, p in self.lifecycle.processes.items() if e and p.pid}
        return [(pid, by_pid.get(pid, "")) for pid in pids]

    async def update(self, resources: bytes) -> None:
        self._require_live()
        try:
            json.loads(resources)
        except ValueError as exc:
            raise InvalidArgument(f"resources are not valid JSON: {exc}") from None
        with tempfile.NamedTemporaryFile(dir=self.bundle, prefix=".resources-") as f:
            f.write(resources)
            f.flush()
            await self._runtime.update(self.id, f.name)

    async def stats(self) -> dict:
        self._require_live()
        return await self._runtime.stats(self.id)

    def resize_pty(self, exec_id: str, width: int, height: int) -> None:
        self.lifecycle.get(exec_id)
        io = self.io.get(exec_id)
        if io is None:
            raise FailedPrecondition(f"process {exec_id or 'init'} of {self.id!r} is not started")
        io.resize(width, height)

    def close_io(self, exec_id: str, stdin: bool) -> None:
        self.lifecycle.get(exec_id)
        io = self.io.get(exec_id)
        if stdin and io is not None:
            io.close_stdin()

    def state(self, exec_id: str = INIT) -> tuple[ProcessState, StdioConfig]:
        process = self.lifecycle.get(exec_id)
        return process, self.stdio.get(exec_id, StdioConfig())

    def connect(self) -> tuple[int, int, str]:
        init = self.lifecycle.processes.get(INIT)
        return self.shim_pid, init.pid if init else 0, __version__

    def ack(self, seq: int) -> None:
        """runtimed has published events up to `seq`. Once shutting down the outbox is
        left as it is: runtimed removes the bundle right after Shutdown returns, and an
        Ack still in flight must not write a file into a directory being removed."""
        if not self.shutdown_requested.is_set():
            self.outbox.ack(seq)

    def shutdown(self, now: bool = False) -> bool:
        """Exit once no process is left to supervise (or at once with `now`)."""
        if self.lifecycle.processes and not now:
            return False
        self.shutdown_requested.set()
        return True

    # --- handing over to the next worker (shimd/keeper.py) ----------------------------

    def quiescent(self) -> bool:
        """Nothing in progress that lives only in this process: no start in flight, every
        stdio pump set up and idle, no thread running a runtime command."""
        return (not self.shutdown_requested.is_set()
                and all(not p.starting and p.held_exit is None
                        for p in self.lifecycle.processes.values())
                and all(io.quiescent() for io in self.io.values())
                and (self.runtime is None or not self.runtime.threads.running))

    def snapshot(self, keep) -> dict:
        """This shim's state for `restore` in the next worker; `keep(fd, wake)` hands an
        fd over (to be polled by the keeper when `wake`) and returns its index."""
        runtime = self.runtime
        return {
            "id": self.id,
            "bundle": str(self.bundle),
            "processes": [[p.exec_id, int(p.status), p.pid, p.exit_status, p.exited_at]
                          for p in self.lifecycle.processes.values()],
            "stdio": {e: [c.stdin, c.stdout, c.stderr, c.terminal] for e, c in self.stdio.items()},
            "exec_specs": self._exec_specs,
            "io": {e: io.snapshot(keep) for e, io in self.io.items()},
            "runtime": None if runtime is None else
            [runtime.command, runtime.in_process, runtime.fork_create],
            "has_pid_namespace": self.has_pid_namespace,
            "cgroup_path": self._cgroup_path,
            "oom": None if self._oom is None else self._oom.snapshot(keep),
        }

    @classmethod
    def restore(cls, state: dict, fds: list[int], reaper: Reaper) -> Shim:
        """The shim a retired worker left (`snapshot`), its fds at `fds`' numbers."""
        shim = cls(state["id"], Path(state["bundle"]), reaper)
        shim.has_pid_namespace = state["has_pid_namespace"]
        shim._cgroup_path = state["cgroup_path"]
        shim.stdio = {e: StdioConfig(*c) for e, c in state["stdio"].items()}
        shim._exec_specs = state["exec_specs"]
        if state["runtime"] is not None:
            command, in_process, fork_create = state["runtime"]
            shim.runtime = OciRuntime(command, shim.bundle, reaper)
            shim.runtime.in_process, shim.runtime.fork_create = in_process, fork_create
        shim.io = {e: ProcessIO.restore(record, fds) for e, record in state["io"].items()}
        for exec_id, status, pid, exit_status, exited_at in state["processes"]:
            shim.lifecycle.processes[exec_id] = ProcessState(
                exec_id, Status(status), pid, exit_status, exited_at)
            shim._exited[exec_id] = asyncio.Event()
            if status == Status.STOPPED:
                shim._exited[exec_id].set()
            elif pid:
                shim._watch(exec_id, pid)
        if state["oom"] is not None:
            from shimd import cgroups

            shim._oom = cgroups.restore_oom_watcher(state["oom"], fds)
            asyncio.get_running_loop().add_reader(shim._oom.fileno(), shim._on_oom)
            # read once anyway: a keeper that drained a v2 watch to look at its counter
            # forked this worker for the kill it saw there
            asyncio.get_running_loop().call_soon(shim._on_oom)
        return shim

    def close(self) -> None:
        self._stop_oom()
        for io in self.io.values():
            io.close()
        self.io.clear()

    @property
    def _runtime(self) -> OciRuntime:
        if self.runtime is None:
            raise NotFound(f"task {self.id!r} not created")
        return self.runtime

    def _require_live(self) -> None:
        status = self.lifecycle.init.status
        if status in (Status.STOPPED, Status.CREATED):
            raise FailedPrecondition(f"task {self.id!r} is {status.name.lower()}")
