"""The OCI runtime, driven through runc's command line: the built-in `python3 -m shimd.oci`
by default, or `runc`/`crun` (containerd.runc.v1.Options.binary_name).

With the built-in runtime, every command but create and exec runs in the shim itself
through `shimd.oci.commands` (file, signal and cgroup operations, fine in a threaded
process): a fresh Python per `start`/`delete` cost ~55 ms each. create and exec set up
namespaces in forked children, so they run in a worker the single-threaded shim forks
(shimd/workers.py). With hooks in the spec every command goes that way too: hooks are
children of whoever runs them, and the shim's reaper (waitpid(-1)) would take their exit
statuses.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import sys
import time
from pathlib import Path

from runtimed.errors import FailedPrecondition, NotFound, ResourceExhausted
from shimd.outbox import write_atomic
from shimd.reaper import Reaper
from shimd.workers import Threads, fork_worker

# -S: no site (its .pth files cost ~50-200 ms per start); the package is found through
# PYTHONPATH, which the shim sets. runtimed's cleanup after a dead shim runs this.
BUILTIN = [sys.executable, "-S", "-m", "shimd.oci"]


def command_for(binary_name: str) -> list[str]:
    """The argv prefix for a runtime name: empty means the built-in one."""
    return [binary_name] if binary_name else list(BUILTIN)


class OciRuntimeError(FailedPrecondition):
    """The OCI runtime command failed; the message carries its own error text."""


class OciRuntime:
    def __init__(self, command: list[str], bundle: Path, reaper: Reaper,
                 threads: Threads | None = None):
        self.command = command
        self.threads = threads or Threads()
        self.name = "shimd.oci" if command == BUILTIN else os.path.basename(command[0])
        self.bundle = bundle
        self.root = bundle / "runtime"  # the command line's --root
        self.log = bundle / "runtime.log"
        self.reaper = reaper
        self.in_process = command == BUILTIN
        self.fork_create = False

    def use_library(self, spec: dict) -> None:
        """Run the built-in runtime's light commands in this process (no hooks to run), and
        fork the init from here unless a new user namespace needs the intermediate child."""
        self.in_process = self.command == BUILTIN and not spec.get("hooks")
        if self.in_process:
            from shimd.oci import commands

            self.fork_create = not commands.needs_intermediate(spec)
        else:
            self.fork_create = False

    def _store(self):
        """The built-in runtime's states: an init forked here keeps its state directly in
        the bundle, one the command line created (a new user namespace) in `<root>/<id>/`."""
        from shimd.oci.state import Store

        if self.fork_create:
            return Store(str(self.bundle), single=True)
        return Store(str(self.root), single=False)

    async def _library(self, verb: str, function, *args, thread: bool = True):
        """A `shimd.oci.commands` function with the command line's errors and log line."""
        from shimd.oci import commands

        call = getattr(commands, function)
        try:
            if thread:
                return await self.threads.run(call, self._store(), *args)
            return call(self._store(), *args)
        except Exception as exc:  # noqa: BLE001 - typed as the CLI's exit would be
            raise self._error(verb, exc) from None

    def _log_error(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        line = json.dumps({"level": "error", "msg": message, "time": stamp}) + "\n"
        try:
            with open(self.log, "a") as f:
                f.write(line)
        except OSError:
            pass

    async def run(
        self,
        *args: str,
        stdio: tuple[int, int, int] | None = None,
        input: bytes | None = None,
    ) -> bytes:
        """Run one runtime command; its stdout, or a typed error with its message."""
        argv = [
            *self.command, "--root", str(self.root), "--log", str(self.log),
            "--log-format", "json", *args,
        ]
        out = os.memfd_create("oci-out")
        err = os.memfd_create("oci-err")
        stdin = os.memfd_create("oci-in")
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            if input:
                os.write(stdin, input)
                os.lseek(stdin, 0, os.SEEK_SET)
            fds = stdio or (stdin if input else null, out, err)
            log_start = self.log.stat().st_size if self.log.exists() else 0
            code = await self._spawn(argv, fds)
            if code != 0:
                message = _error_text(err, self.log, log_start) or f"exit status {code}"
                verb = args[0] if args else ""
                if "does not exist" in message or "not exist" in message:
                    raise NotFound(f"{self.name} {verb}: {message}")
                raise OciRuntimeError(f"{self.name} {verb}: {message}")
            os.lseek(out, 0, os.SEEK_SET)
            return _read_all(out)
        finally:
            for fd in (out, err, stdin, null):
                os.close(fd)

    async def _spawn(self, argv: list[str], fds: tuple[int, int, int]) -> int:
        if self.command == BUILTIN:
            return await fork_worker(argv[len(self.command):], fds, self.reaper, self.threads)
        try:
            _, done = self.reaper.spawn(argv, fds)
        except FileNotFoundError:
            raise FailedPrecondition(f"OCI runtime {self.command[0]!r} not found in PATH") from None
        except BlockingIOError as exc:  # EAGAIN: a pids limit
            raise ResourceExhausted(f"{self.name}: cannot start: {exc.strerror} (pids limit?)") from None
        code, _ = await done
        return code

    async def create(self, id: str, bundle: str, pid_file: str, console_socket: str | None,
                     stdio: tuple[int, int, int]) -> int:
        """The init's pid. A runtime's command line tells it in `pid_file`; the init forked
        here needs none (one file fewer per container)."""
        if self.fork_create:  # its state in the bundle itself (`_store`)
            return await self._fork_create(id, bundle, console_socket, stdio)
        self.root.mkdir(mode=0o700, exist_ok=True)  # private: the state there holds the spec
        args = ["create", "--bundle", bundle, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        await self.run(*args, id, stdio=stdio)
        return int(Path(pid_file).read_text())

    async def exec(self, id: str, process: dict, files: Path, exec_id: str,
                   console_socket: str | None, stdio: tuple[int, int, int]) -> int:
        """Start an exec'd process; its pid. The built-in runtime forks it straight from
        the shim (one fork, where the command line took three); other runtimes get its
        spec as `<files>/<exec_id>.json` and write its pid next to it."""
        if self.in_process:
            return await self._fork_exec(id, process, console_socket, stdio)
        files.mkdir(mode=0o700, exist_ok=True)
        process_file, pid_file = files / f"{exec_id}.json", files / f"{exec_id}.pid"
        write_atomic(process_file, json.dumps(process).encode())
        args = ["exec", "--process", str(process_file), "--detach", "--pid-file", str(pid_file)]
        if console_socket:
            args += ["--console-socket", console_socket]
        await self.run(*args, id, stdio=stdio)
        return int(pid_file.read_text())

    async def _fork_create(self, id: str, bundle: str, console_socket: str | None,
                           stdio: tuple[int, int, int]) -> int:
        """`create` run here: the init is forked straight from the shim (one fork, where a
        worker and its command took two more), and its report is awaited on the loop."""
        from shimd.oci import commands

        await self._before_fork()
        try:
            creation = commands.begin_create(self._store(), id, bundle, console_socket,
                                             stdio=stdio)
        except Exception as exc:  # noqa: BLE001 - typed as the CLI's exit would be
            raise self._error("create", exc) from None
        try:
            sync, creation.sync = creation.sync, -1  # _read_report closes it
            report = await _read_report(sync, commands.SyncReport(creation.pid))
            creation.close()
            return commands.finish_create(creation, report.pid, report.result).pid
        except BaseException as exc:
            creation.abort()
            if isinstance(exc, Exception):
                raise self._error("create", exc) from None
            raise

    async def _fork_exec(self, id: str, process: dict, console_socket: str | None,
                         stdio: tuple[int, int, int]) -> int:
        from shimd.oci import commands

        await self._before_fork()
        try:
            pid, sync = commands.fork_exec(self._store(), id, process, stdio, console_socket)
        except Exception as exc:  # noqa: BLE001 - typed as the CLI's exit would be
            raise self._error("exec", exc) from None
        try:
            result = (await _read_report(sync, commands.SyncReport())).result
        except Exception as exc:  # noqa: BLE001 - a report that does not parse
            raise self._error("exec", exc) from None
        if result is not None:  # "error ...": the process did not exec
            raise self._error("exec", f"exec failed: {result[6:].strip()}")
        return pid

    async def _before_fork(self) -> None:
        await self.threads.none_running()  # setns and fork: this process must be single-threaded
        sys.stdout.flush()
        sys.stderr.flush()

    def _error(self, verb: str, error: Exception | str) -> Exception:
        """A failure of a command run here, typed and logged as the command line's would be;
        a fork that failed (a pids limit) is RESOURCE_EXHAUSTED."""
        if isinstance(error, OSError) and error.errno == errno.EAGAIN:
            return ResourceExhausted(
                f"{self.name} {verb}: cannot fork: {error.strerror} (pids limit?)")
        if isinstance(error, ResourceExhausted):
            return error
        message = str(error) or type(error).__name__
        self._log_error(message)
        if isinstance(error, NotFound) or "not exist" in message:
            return NotFound(f"{self.name} {verb}: {message}")
        return OciRuntimeError(f"{self.name} {verb}: {message}")

    async def start(self, id: str) -> None:
        if self.in_process:  # a write into the exec fifo: no need for a thread
            await self._library("start", "start", id, thread=False)
            return
        await self.run("start", id)

    async def kill(self, id: str, signal: int, all: bool = False) -> None:
        if self.in_process:
            await self._library("kill", "kill", id, signal, all)
            return
        await self.run("kill", *(["--all"] if all else []), id, str(signal))

    async def delete(self, id: str, force: bool = False) -> None:
        if self.in_process:
            # a thread only when there is something to wait for: starting one took ~0.5
            # ms of a worker's CPU, and a stopped init's delete seldom waits
            if not await self._library("delete", "delete_at_once", id, thread=False):
                await self._library("delete", "delete", id, force)
            return
        await self.run("delete", *(["--force"] if force else []), id)

    async def pause(self, id: str) -> None:
        if self.in_process:
            await self._library("pause", "pause", id)
            return
        await self.run("pause", id)

    async def resume(self, id: str) -> None:
        if self.in_process:
            await self._library("resume", "resume", id)
            return
        await self.run("resume", id)

    async def ps(self, id: str) -> list[int]:
        if self.in_process:
            return await self._library("ps", "ps", id)
        return json.loads(await self.run("ps", "--format", "json", id) or b"[]") or []

    async def update(self, id: str, resources_file: str) -> None:
        if self.in_process:
            with open(resources_file) as f:
                resources = json.load(f)
            await self._library("update", "update", id, resources)
            return
        await self.run("update", "--resources", resources_file, id)

    async def stats(self, id: str) -> dict:
        if self.in_process:
            # through JSON, so the shape is exactly the command line's
            return json.loads(json.dumps(await self._library("events", "stats", id)))
        out = await self.run("events", "--stats", id)
        return json.loads(out.splitlines()[0]) if out.strip() else {}


async def _read_report(fd: int, report):
    """The forked children's `commands.SyncReport` on `fd`, read on the loop until it is
    complete (a read error is reported as theirs would be); the fd is closed after. What
    the report raises (a malformed line, a failing callback) is raised here."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def readable() -> None:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            chunk = f"error {exc.strerror}\n".encode()
        if done.done():
            return
        try:
            complete = report.feed(chunk)
        except Exception as exc:  # noqa: BLE001 - the caller's; else the loop's handler's
            done.set_exception(exc)
            return
        if complete:
            done.set_result(None)

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return report


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _error_text(err_fd: int, log: Path, start: int) -> str:
    """The runtime's own error: the last error line this command logged, else its stderr."""
    try:
        with open(log, "rb") as f:
            f.seek(start)
            lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        lines = []
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("level") in ("error", "fatal") and entry.get("msg"):
            return entry["msg"]
    os.lseek(err_fd, 0, os.SEEK_SET)
    return _read_all(err_fd).decode(errors="replace").strip()[-2000:]
