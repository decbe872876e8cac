"""A single-threaded fork server for the built-in runtime's create and exec.

create and exec set up namespaces in forked children, so they cannot run in the shim
(which has gRPC threads); a fresh `python3 -S -m shimd.oci` costs 60-120 ms of start-up
each. The shim forks this helper right after it is forked from the zygote, before any
thread exists. The helper stays single-threaded and forks one worker per request, which
runs `shimd.oci`'s command line in-process with the request's stdio, exactly as the
spawned command would. The worker's container init is reparented to the nearest child
subreaper, which is still the shim (the helper and the worker are its descendants).

Protocol on a SOCK_SEQPACKET pair: the shim sends the argv (JSON) with three fds
(stdin, stdout, stderr) as SCM_RIGHTS; the helper answers with the exit status. One
request at a time. The helper exits when the shim's end closes (the shim exits).
"""

from __future__ import annotations

import array
import asyncio
import json
import os
import socket
import sys

MAX_REQUEST = 1 << 20


def start_if_enabled() -> ForkServer | None:
    """The fork server, unless RUNTIMED_SHIM_FORKSERVER=0 (then a fresh process per command)."""
    if os.environ.get("RUNTIMED_SHIM_FORKSERVER", "1") == "0":
        return None
    return ForkServer.start()


class ForkServer:
    """The shim's end: `await run(argv, stdio)` → exit status of `shimd.oci argv`."""

    def __init__(self, sock: socket.socket, pid: int):
        self.sock = sock
        self.pid = pid
        self._lock: asyncio.Lock | None = None

    @classmethod
    def start(cls) -> ForkServer:
        """Fork the helper; call while the process is single-threaded, and as early as
        possible: every page the shim dirties before this fork and again after it ends up
        private to the helper (measured: 2.1 MB when forked after the shim's set-up)."""
        import shimd.oci.__main__  # noqa: F401 - imported once, shared with every worker
        import shimd.oci.commands  # noqa: F401

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                ours.close()
                code = _serve(theirs)
            finally:
                os._exit(code)
        theirs.close()
        ours.setblocking(False)
        return cls(ours, pid)

    async def run(self, argv: list[str], stdio: tuple[int, int, int]) -> int:
        if self._lock is None:
            self._lock = asyncio.Lock()
        loop = asyncio.get_running_loop()
        async with self._lock:
            payload = json.dumps({"argv": argv, "cwd": os.getcwd()}).encode()
            self.sock.sendmsg(
                [payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", stdio))]
            )
            reply = await loop.sock_recv(self.sock, 64)
        if not reply:
            raise ConnectionError("the shim's fork server is gone")
        return int(reply)

    def close(self) -> None:
        self.sock.close()


def _serve(sock: socket.socket) -> int:
    """The helper: one worker per request, its exit status back; exit at EOF. No garbage
    collection here: it would write to the headers of objects shared with the shim."""
    import gc

    from shimd.server import set_name

    gc.disable()

    set_name("fork")
    os.closerange(3, sock.fileno())
    os.closerange(sock.fileno() + 1, 1024)
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, MAX_REQUEST, 3)
        except OSError:
            return 1
        if not message:
            return 0
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in fds[2:]:
                os.write(fd, f"shimd.oci: fork: {exc.strerror}\n".encode())
            for fd in fds:
                os.close(fd)
            sock.send(b"1")
            continue
        if pid == 0:
            _worker(sock, json.loads(message), fds)
        for fd in fds:
            os.close(fd)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        sock.send(str(code if code >= 0 else 128 - code).encode())


def _worker(sock: socket.socket, request: dict, fds: list[int]) -> None:
    """`shimd.oci argv` with the request's stdio and cwd, as if it were a fresh process."""
    from shimd.server import set_name

    code = 1
    try:
        sock.close()
        set_name("oci")  # what its container processes show until they execve
        os.chdir(request["cwd"])
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        from shimd.oci.__main__ import main

        code = main(request["argv"])
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
