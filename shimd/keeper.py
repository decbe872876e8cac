"""The shim's keeper: the long-lived half of a shim, which runs no gRPC and touches little.

A CPython process copies every page of its zygote that its code touches (reference counts,
the specialising interpreter's counters), so a shim that serves gRPC and supervises a
container keeps ~6 MB of its own for as long as the container runs (docs/shim.md). Most
of that time it does nothing. So a shim is two processes while it works and one while it
is idle:

- the **keeper** (this module) is what runtimed knows as the shim: its pid is in
  `shim.pid`, its cwd is the bundle, it is the child subreaper, it holds the listening
  socket, and while nothing happens, every fd the container's stdio and OOM watch need.
  It polls; it never runs the server, so it stays at ~2.4 MB of its own (docs/shim.md).
- the **worker** is forked by the keeper when there is work: a connection on the socket,
  output or input on the container's stdio, an OOM event, an exit the keeper reaped. It is
  the shim as before (shimd/server.py's worker: the gRPC server and the `Shim` core),
  restored from the state the previous worker left. Idle for `IDLE_RETIRE` seconds (no
  connection, no call, no task, nothing buffered) it sends its state and fds back
  (SCM_RIGHTS) and exits, and the pages it touched are gone with it.

A worker dies with its keeper (PDEATHSIG), so killing the shim's pid ends the shim as it
did. A worker that exits without handing its state back (killed, crashed) ends the shim:
what it knew is lost, and runtimed's dead-shim path cleans up, as for any dead shim.

Exits: each process reaps its own children (the worker is a subreaper too); a process
orphaned by a retired worker is the keeper's child, and the keeper numbers its exit and
hands it to the running worker (queued while the channel is full), or forks one for it.
The worker acknowledges each; one sent while it was retiring goes to the next worker.

Messages on the keeper-worker socket pair (SOCK_SEQPACKET, one JSON object each):
keeper → worker `{"exit": [n, pid, code, at]}`; worker → keeper `{"seen": n}` (exits up
to n are its own now), `{"claim": {"id",
"namespace", "bundle"}}` (a spare was claimed; answered `{"claimed": true}` once the keeper
took the container's name, log and cwd), `{"retire": true, "wake": [i…], "counters": {i:
[file, key, value]…}, "seen": n}` and on the next line the worker's state, with the
state's fds attached (`wake`: which of them the keeper polls; `counters`: inotify watches
among them that need a worker only once `key` in `file` is no longer `value`, cgroup v2's
memory.events), `{"shutdown": true}` (the shim is ending).
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import select
import signal
import socket
import time

from shimd.oci import linux
from shimd.reaper import exit_code, exited_children

log = logging.getLogger("shimd")

MESSAGE_MAX = 1 << 20
FDS_MAX = 253  # SCM_MAX_FD: the most fds one message carries (a worker with more serves on)
FORK_RETRY = 0.5  # seconds between tries to fork a worker when a fork failed


class Keeper:
    """The keeper's loop. `work(keeper, channel)` runs in each forked worker and returns
    its exit status; `on_claim(id, bundle)` makes this process the claimed spare's shim."""

    def __init__(self, listener: socket.socket, work, placement: tuple | None = None,
                 on_claim=None, lifeline: int = -1):
        self.listener = listener
        self.work = work
        self.placement = placement  # (id, namespace, bundle); a spare's comes with its claim
        self.on_claim = on_claim  # on_claim(id, bundle)
        self.lifeline = lifeline  # a spare's, for its first worker (which reads the claim)
        # what the last worker left for the next one: its state as it sent it (bytes: parsed
        # here it would be objects on pages of the keeper's own), the fds, which to poll
        self.state: bytes | None = None
        self.fds: list[int] = []
        self.wake: list[int] = []
        self.counters: dict[str, list] = {}  # place in fds → [file, key, value]
        self.exits: list[list] = []  # [n, pid, code, at] reaped here, not yet seen by a worker
        self._numbered = 0
        self._sent = 0  # the last exit number sent to the running worker
        self.worker = 0
        self.channel: socket.socket | None = None
        self._retired: tuple[bytes, list[int], list[int], dict, int] | None = None
        self._ending = False  # the worker said the shim ends
        self._stopping = False  # SIGTERM with no worker to pass it to
        self._terminated = False  # SIGTERM passed to a worker, which may retire instead
        self._signal_pipe = (-1, -1)
        self._retry_at = 0.0  # a fork failed (a pids limit): work waits until then

    # --- the loop ----------------------------------------------------------------------

    def run(self) -> int:
        self._signal_pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._signal_pipe[1])
        for signum in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(signum, _noted)
        self._spawn()  # a shim starts with work to do: Create (or a spare's claim) follows
        poll = select.poll()
        while not self._stopping:
            watched = self._watched()
            for fd in watched:
                poll.register(fd, select.POLLIN)
            if self.channel is not None and self._sent < self._numbered:
                poll.modify(self.channel, select.POLLIN | select.POLLOUT)  # exits to send
            backoff = self._retry_at - time.monotonic()
            try:
                ready = poll.poll(max(backoff, 0) * 1000 if self._retry_at else None)
            finally:
                for fd in watched:
                    poll.unregister(fd)
            if self._retry_at and time.monotonic() >= self._retry_at:
                self._retry_at = 0.0
                if not self.worker and not self._ending:
                    self._spawn()  # whatever was waiting is still there, or it goes idle again
            for fd, events in ready:
                if fd == self._signal_pipe[0]:
                    self._signals()
                elif self.channel is not None and fd == self.channel.fileno():
                    if events & select.POLLOUT:
                        self._send_exits()
                    self._receive()
                elif not self.worker and not self._unmoved(fd):
                    self._spawn()  # a connection, stdio or an OOM event: a worker's job
            if self._ending and not self.worker:
                return 0
        return 0

    def _watched(self) -> list[int]:
        fds = [self._signal_pipe[0]]
        if self.worker:
            if self.channel is not None:
                fds.append(self.channel.fileno())
            return fds
        if self._retry_at:  # readable as they are: polled again once a fork may work
            return fds
        fds.append(self.listener.fileno())
        return fds + [self.fds[i] for i in self.wake]

    def _unmoved(self, fd: int) -> bool:
        """`fd` is a counter's watch (see the channel's messages) and the counter has not
        moved: drained, and no worker for it. Drained before the counter is read, so a
        change after the read wakes the loop again; the worker forked for a change reads
        its watch once at start whatever the fd says."""
        for place, (path, key, value) in self.counters.items():
            if self.fds[int(place)] == fd:
                with contextlib.suppress(BlockingIOError):
                    while os.read(fd, 4096):
                        pass
                return _counter(path, key) == value
        return False

    def _signals(self) -> None:
        with contextlib.suppress(BlockingIOError):
            received = os.read(self._signal_pipe[0], 64)
            if signal.SIGTERM in received:
                if self.worker:  # it shuts down; if it was retiring, that is done below
                    self._terminated = True
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.worker, signal.SIGTERM)
                else:
                    self._stopping = True
        self._reap()

    def _reap(self) -> None:
        for pid, status in exited_children():
            if pid == self.worker:
                self._worker_exited(status)
                continue
            self._numbered += 1
            self.exits.append([self._numbered, pid, exit_code(status), time.time()])
        if self.worker:
            self._send_exits()
        # after the loop: a worker spawned inside it would have its exit reaped as an orphan's
        elif self.exits and not self._ending and not self._retry_at:
            self._spawn()

    def _send_exits(self) -> None:
        """The exits the running worker has not been sent, in order; what the channel does
        not take now goes when it polls writable (a worker busy for long)."""
        for exit in self.exits:
            if exit[0] <= self._sent or self.channel is None:
                continue
            try:
                self.channel.send(json.dumps({"exit": exit}).encode())
            except BlockingIOError:
                return
            except OSError:  # the worker is gone: its exit is next
                return
            self._sent = exit[0]

    # --- workers -----------------------------------------------------------------------

    def _spawn(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        keeper = os.getpid()
        try:
            pid = os.fork()
        except OSError as exc:  # EAGAIN under a pids limit: the container keeps its shim
            ours.close()
            theirs.close()
            log.warning("cannot fork a shim worker (%s): trying again in %.1f s",
                        exc.strerror, FORK_RETRY)
            self._retry_at = time.monotonic() + FORK_RETRY
            return
        if pid == 0:
            code = 1
            try:
                ours.close()
                signal.set_wakeup_fd(-1)
                for fd in self._signal_pipe:
                    os.close(fd)
                for signum in (signal.SIGCHLD, signal.SIGTERM):
                    signal.signal(signum, signal.SIG_DFL)
                linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
                if os.getppid() == keeper:  # else the keeper died before the prctl
                    code = self.work(self, theirs)
            except BaseException:  # noqa: BLE001 - a forked child never returns into the loop
                log.exception("shim worker failed")
            finally:
                os._exit(code)
        theirs.close()
        ours.setblocking(False)
        for fd in self.fds:  # the worker has them now; a copy here would hold FIFOs open
            os.close(fd)
        if self.lifeline >= 0:  # the first worker reads the claim; runtimed sees its EOF
            os.close(self.lifeline)
            self.lifeline = -1
        self.fds, self.wake, self.counters, self.state = [], [], {}, None
        self.worker, self.channel, self._retired = pid, ours, None
        self._sent = self._numbered  # it has them from the fork (the rest are acknowledged)

    def _receive(self) -> None:
        """Every message waiting on the channel (non-blocking)."""
        while self.channel is not None:
            try:
                data, fds, flags = _receive_fds(self.channel)
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("shim worker channel: %s", exc)
                data, fds, flags = b"", [], 0
            if not data:  # the worker closed its end: its exit follows
                self.channel.close()
                self.channel = None
                for fd in fds:
                    os.close(fd)
                return
            header, _, state = data.partition(b"\n")
            try:
                message = json.loads(header)
                if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                    raise ValueError("truncated")
            except ValueError as exc:
                log.error("shim worker sent a message that cannot be read (%s)", exc)
                for fd in fds:
                    os.close(fd)
                continue
            if "retire" in message:
                self._retired = (state, fds, message["wake"], message.get("counters", {}),
                                 message["seen"])
            elif "seen" in message:  # exits up to there are the worker's now
                self.exits = [e for e in self.exits if e[0] > message["seen"]]
            elif "claim" in message and self.on_claim is not None:
                claim = message["claim"]
                try:
                    self.on_claim(claim["id"], claim["bundle"])
                    self.placement = (claim["id"], claim["namespace"], claim["bundle"])
                    answer = {"claimed": True}
                except OSError as exc:  # its bundle is gone
                    answer = {"claimed": False, "error": str(exc)}
                with contextlib.suppress(OSError):
                    self.channel.send(json.dumps(answer).encode())
            elif message.get("shutdown"):
                self._ending = True

    def _worker_exited(self, status: int) -> None:
        self._receive()  # what it sent before exiting may still be unread
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        self.worker = 0
        if self._ending:
            return
        if self._terminated and self._retired is not None:  # SIGTERM came as it retired
            self._stopping = True
        if self._retired is None:
            log.error("shim worker ended (status %d) without handing its state back: the shim "
                      "ends", exit_code(status))
            self._ending = True
            return
        self.state, self.fds, self.wake, self.counters, seen = self._retired
        self._retired = None
        self.exits = [e for e in self.exits if e[0] > seen]
        # left for the loop: new exits start a worker once reaping is done


def _receive_fds(channel: socket.socket) -> tuple[bytes, list[int], int]:
    """One message and the fds attached, close-on-exec (socket.recv_fds of 3.11 drops
    its flags argument)."""
    data, ancillary, flags, _ = channel.recvmsg(
        MESSAGE_MAX, socket.CMSG_SPACE(FDS_MAX * 4), socket.MSG_CMSG_CLOEXEC)
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds), flags


def _counter(path: str, key: str) -> int | None:
    """The value of the `key value` line of a cgroup file (None when unreadable: a worker
    finds out what that means)."""
    try:
        with open(path, "rb") as f:
            for line in f.read().splitlines():
                name, _, value = line.partition(b" ")
                if name == key.encode():
                    return int(value)
    except (OSError, ValueError):
        return None
    return 0


def _noted(signum, frame) -> None:
    """The wake-up fd carries the signal; the loop acts on it."""
