"""The OCI runtime, driven through runc's command line: the built-in `python3 -m shimd.oci`
by default, or `runc`/`crun` (containerd.runc.v1.Options.binary_name).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from runtimed.errors import FailedPrecondition, NotFound
from shimd.reaper import Reaper

BUILTIN = [sys.executable, "-m", "shimd.oci"]


def command_for(binary_name: str) -> list[str]:
    """The argv prefix for a runtime name: empty means the built-in one."""
    return [binary_name] if binary_name else list(BUILTIN)


class OciRuntimeError(FailedPrecondition):
    """The OCI runtime command failed; the message carries its own error text."""


class OciRuntime:
    def __init__(self, command: list[str], root: Path, log: Path, reaper: Reaper):
        self.command = command
        self.name = "shimd.oci" if command == BUILTIN else os.path.basename(command[0])
        self.root = root
        self.log = log
        self.reaper = reaper

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
            try:
                _, done = self.reaper.spawn(argv, fds)
            except FileNotFoundError:
                raise FailedPrecondition(
                    f"OCI runtime {self.command[0]!r} not found in PATH"
                ) from None
            code, _ = await done
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

    async def create(self, id: str, bundle: str, pid_file: str, console_socket: str | None,
                     stdio: tuple[int, int, int]) -> None:
        args = ["create", "--bundle", bundle, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        await self.run(*args, id, stdio=stdio)

    async def exec(self, id: str, process_file: str, pid_file: str,
                   console_socket: str | None, stdio: tuple[int, int, int]) -> None:
        args = ["exec", "--process", process_file, "--detach", "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        await self.run(*args, id, stdio=stdio)

    async def kill(self, id: str, signal: int, all: bool = False) -> None:
        await self.run("kill", *(["--all"] if all else []), id, str(signal))

    async def delete(self, id: str, force: bool = False) -> None:
        await self.run("delete", *(["--force"] if force else []), id)

    async def ps(self, id: str) -> list[int]:
        return json.loads(await self.run("ps", "--format", "json", id) or b"[]") or []

    async def update(self, id: str, resources_file: str) -> None:
        await self.run("update", "--resources", resources_file, id)

    async def stats(self, id: str) -> dict:
        out = await self.run("events", "--stats", id)
        return json.loads(out.splitlines()[0]) if out.strip() else {}


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
