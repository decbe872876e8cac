"""The shim's task state machine, pure: no processes, no I/O.

It decides what each process's status is and which events to emit, in containerd's order.
The one subtle rule: a process may exit while its Start is still in flight (the runtime's
`start` returns after the process already ran), so an exit seen during Start is held back
and emitted right after the start event: start always comes before exit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import IntEnum

from runtimed.errors import AlreadyExists, FailedPrecondition, NotFound


class Status(IntEnum):
    """Same numbers as containerd.v1.types.Status and runtimed.shim.v1.Status."""

    UNKNOWN = 0
    CREATED = 1
    RUNNING = 2
    STOPPED = 3
    PAUSED = 4
    PAUSING = 5


INIT = ""  # exec id of the init process


@dataclass
class ProcessState:
    exec_id: str
    status: Status = Status.UNKNOWN
    pid: int = 0
    exit_status: int = 0
    exited_at: float = 0.0
    starting: bool = False
    held_exit: tuple[int, float] | None = None


@dataclass(frozen=True)
class Emitted:
    """An event to append to the outbox: containerd topic plus its fields."""

    topic: str
    exec_id: str = ""
    pid: int = 0
    exit_status: int = 0
    exited_at: float = 0.0


@dataclass
class Lifecycle:
    """Statuses of the init process and the exec processes of one container."""

    id: str
    processes: dict[str, ProcessState] = field(default_factory=dict)

    def get(self, exec_id: str) -> ProcessState:
        try:
            return self.processes[exec_id]
        except KeyError:
            what = "task" if exec_id == INIT else f"exec process {exec_id!r}"
            raise NotFound(f"{what} of container {self.id!r} not found") from None

    @property
    def init(self) -> ProcessState:
        return self.get(INIT)

    def created(self, pid: int) -> list[Emitted]:
        if INIT in self.processes:
            raise AlreadyExists(f"task {self.id!r} already created")
        self.processes[INIT] = ProcessState(INIT, Status.CREATED, pid)
        return [Emitted("/tasks/create", INIT, pid)]

    def exec_added(self, exec_id: str) -> list[Emitted]:
        init = self.init
        if init.status == Status.STOPPED:
            raise FailedPrecondition(f"task {self.id!r} has stopped: cannot exec into it")
        if exec_id in self.processes:
            raise AlreadyExists(f"exec process {exec_id!r} already exists in {self.id!r}")
        self.processes[exec_id] = ProcessState(exec_id, Status.CREATED)
        return [Emitted("/tasks/exec-added", exec_id)]

    def start_begun(self, exec_id: str) -> ProcessState:
        process = self.get(exec_id)
        if process.status != Status.CREATED or process.starting:
            raise FailedPrecondition(
                f"process {exec_id or 'init'} of {self.id!r} is {process.status.name.lower()}:"
                " only a created process can be started"
            )
        if exec_id != INIT and self.init.status == Status.STOPPED:
            raise FailedPrecondition(f"task {self.id!r} has stopped: cannot start an exec")
        process.starting = True
        return process

    def start_failed(self, exec_id: str) -> list[Emitted]:
        process = self.get(exec_id)
        process.starting = False
        if process.held_exit is not None:
            return self.exited(exec_id, *process.held_exit)
        return []

    def started(self, exec_id: str, pid: int) -> list[Emitted]:
        process = self.get(exec_id)
        process.starting = False
        process.pid = pid
        if process.status == Status.CREATED:
            process.status = Status.RUNNING
        topic = "/tasks/start" if exec_id == INIT else "/tasks/exec-started"
        events = [Emitted(topic, exec_id, pid)]
        if process.held_exit is not None:
            status, at = process.held_exit
            process.held_exit = None
            events += self.exited(exec_id, status, at)
        return events

    def exited(self, exec_id: str, exit_status: int, at: float | None = None) -> list[Emitted]:
        process = self.get(exec_id)
        at = time.time() if at is None else at
        if process.status == Status.STOPPED:
            return []
        if process.starting:
            process.held_exit = (exit_status, at)
            return []
        process.status = Status.STOPPED
        process.exit_status = exit_status
        process.exited_at = at
        return [Emitted("/tasks/exit", exec_id, process.pid, exit_status, at)]

    def paused(self) -> list[Emitted]:
        self.require_running("pause")
        self.init.status = Status.PAUSED
        return [Emitted("/tasks/paused")]

    def resumed(self) -> list[Emitted]:
        init = self.init
        if init.status != Status.PAUSED:
            raise FailedPrecondition(f"task {self.id!r} is not paused")
        init.status = Status.RUNNING
        return [Emitted("/tasks/resumed")]

    def deleted(self, exec_id: str) -> list[Emitted]:
        process = self.get(exec_id)
        if process.status not in (Status.STOPPED, Status.CREATED):
            raise FailedPrecondition(
                f"process {exec_id or 'init'} of {self.id!r} is {process.status.name.lower()}:"
                " kill it first or delete with force"
            )
        if exec_id == INIT and any(
            p.status in (Status.RUNNING, Status.PAUSED) for e, p in self.processes.items() if e
        ):
            raise FailedPrecondition(f"task {self.id!r} still has running exec processes")
        del self.processes[exec_id]
        if exec_id != INIT:
            return []
        return [Emitted("/tasks/delete", INIT, process.pid, process.exit_status, process.exited_at)]

    def require_running(self, action: str) -> None:
        init = self.init
        if init.status != Status.RUNNING:
            raise FailedPrecondition(
                f"task {self.id!r} is {init.status.name.lower()}: cannot {action} it"
            )
