"""Starting, finding and talking to shims.

A shim is launched with `python -m shimd` (which forks, detaches and prints the address);
its address is also in `<bundle>/address`, so after a runtimed restart `ShimManager.load`
finds every shim again by scanning `<state>/tasks/<namespace>/<id>/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message_factory import GetMessageClass

from runtimed.api.shim.v1 import shim_pb2
from runtimed.errors import RuntimedError, Unavailable, from_code
from runtimed.http2 import RpcError
from runtimed.runtime import h2client
from runtimed.runtime.h2client import Channel
from runtimed.snapshots import mount as mounts
from shimd.outbox import RECORD

log = logging.getLogger("runtimed.runtime")

LAUNCH_TIMEOUT = 30.0
CONNECT_TIMEOUT = 5.0


class ShimClient:
    """The shim's gRPC API with typed errors: every call raises RuntimedError subclasses.
    Over runtimed's own HTTP/2 client on the event loop (runtimed/runtime/h2client.py)."""

    def __init__(self, id: str, address: str, bundle: Path):
        self.address = address
        self.bundle = bundle
        self.pid = 0  # the shim's pid as the zygote, its Connect or its bundle reported it; 0: unknown
        self.channel = Channel(address)
        self.id = id

    @property
    def id(self) -> str:
        return self._id

    @id.setter
    def id(self, id: str) -> None:
        """A spare (no id yet) keeps its connection open: its claim is followed at once by
        Create on it. A shim's connection closes when idle (h2client.IDLE_CLOSE)."""
        self._id = id
        self.channel.idle_close = h2client.IDLE_CLOSE if id else None

    async def call(self, method: str, request, timeout: float | None = None):
        reply_type = _REPLIES[method]
        try:
            reply = await self.channel.unary(f"/{SERVICE}/{method}", request.SerializeToString(),
                                             timeout)
        except RpcError as exc:
            raise _typed(exc, self.id) from None
        try:
            return reply_type.FromString(reply)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError
            raise Unavailable(f"shim of task {self.id!r} answered {method} with a message that "
                              f"does not parse: {exc}") from None

    async def close(self) -> None:
        await self.channel.close()


SERVICE = shim_pb2.DESCRIPTOR.services_by_name["Shim"].full_name
_REPLIES = {
    m.name: GetMessageClass(m.output_type)
    for m in shim_pb2.DESCRIPTOR.services_by_name["Shim"].methods
}


def _typed(exc: RpcError, id: str) -> RuntimedError:
    if exc.code in ("UNAVAILABLE", "CANCELLED"):
        return Unavailable(f"shim of task {id!r} is not reachable: {exc.details}")
    return from_code(exc.code, exc.details or exc.code)


@dataclass(frozen=True)
class BundleInfo:
    """What runtimed itself keeps in a bundle (besides what the shim writes there)."""

    namespace: str
    id: str
    runtime: str  # OCI runtime binary name; empty for the built-in one
    rootfs_mounted: bool


@dataclass
class Spare:
    """A spare shim forked ahead of need: connected, waiting on `writer`'s connection to
    learn its container. Closing that connection (or runtimed dying) ends it; `pidfd`
    (of `client.pid`, opened while it answered) kills it when a claim went wrong."""

    client: ShimClient
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    pidfd: int

    def release(self) -> None:
        """Forget the spare (claimed, or let go through its lifeline)."""
        self.writer.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


class ShimManager:
    """Shims come from the zygote (`shimd.zygote`, started on first use, forks a shim per
    container from pre-imported, shared memory); `python -m shimd` is the fallback, and
    the only way with RUNTIMED_SHIM_ZYGOTE=0. Once the zygote runs, one spare shim is kept
    ready (RUNTIMED_SHIM_SPARE=0 turns that off): a create claims it instead of waiting for
    a fork, and the next spare is forked in the background."""

    def __init__(self, state: Path):
        self.tasks_dir = state / "tasks"
        self.zygote_socket = state / "shim-zygote.sock"
        self.spares_dir = state / "shim-sockets"
        self.use_zygote = os.environ.get("RUNTIMED_SHIM_ZYGOTE", "1") != "0"
        self.use_spare = self.use_zygote and os.environ.get("RUNTIMED_SHIM_SPARE", "1") != "0"
        self._zygote_lock = asyncio.Lock()
        self._spare: asyncio.Task | None = None
        self._closed = False
        remove_stale_sockets(self.spares_dir)

    def bundle_path(self, namespace: str, id: str) -> Path:
        return self.tasks_dir / namespace / id

    async def start(self, namespace: str, id: str, bundle: Path) -> ShimClient:
        """Start a detached shim for `bundle` and connect to it.

        Cancelling the caller does not cut a start short: a claim written to a spare or a
        fork asked of the zygote makes a shim for `bundle` whatever happens next, so the
        start runs to its end and that shim is shut down (and gone) before the
        cancellation goes on to the caller, who removes the bundle next."""
        starting = asyncio.ensure_future(self._start(namespace, id, bundle))
        try:
            return await asyncio.shield(starting)
        except asyncio.CancelledError:
            if starting.done() and starting.cancelled():
                raise
            await asyncio.wait({starting})
            if not starting.cancelled() and starting.exception() is None:
                await self.dispose(starting.result())
            raise

    async def _start(self, namespace: str, id: str, bundle: Path) -> ShimClient:
        if self.use_zygote:
            client = await self._claim_spare(namespace, id, bundle)
            if client is not None:
                return client
            try:
                address, pid = await self._fork_from_zygote(namespace, id, bundle)
            except (OSError, ValueError, TimeoutError) as exc:
                log.warning("shim zygote unusable (%s); launching the shim directly", exc)
            else:
                # no Connect: the shim answered once it served, and the zygote's answer
                # carries its pid (one round trip less to a worker it forks for it)
                client = ShimClient(id, address, bundle)
                client.pid = pid
                self._replenish()
                return client
        return await self._launch(namespace, id, bundle)

    async def dispose(self, client: ShimClient, exit_timeout: float = CONNECT_TIMEOUT,
                      bundle: Path | None = None, told: bool = False) -> None:
        """Shut down a shim that never got its task, or whose task was deleted (Shutdown,
        else SIGKILL after `exit_timeout`) and wait until its process is gone, so nothing it
        writes lands in a bundle being removed. `bundle`: where the shim works now, when
        its bundle was moved (to the trash) since; its pid is taken for it only while the
        process with that pid works there. `told`: it is exiting already (the init's
        Delete asked it to): it waits only for this connection to close."""
        where = bundle or client.bundle
        pidfd = shim_pidfd(shim_pid_file(where), where)  # the one working there, as it says
        if pidfd < 0 and client.pid:  # its pid file not written yet
            pidfd = shim_pidfd(client.pid, where)
        try:
            if not told:
                with contextlib.suppress(RuntimedError):
                    await client.call("Shutdown", shim_pb2.ShutdownRequest(id=client.id, now=True),
                                      CONNECT_TIMEOUT)
            await client.close()
            if pidfd >= 0:
                await await_exit(pidfd, exit_timeout, f"shim {client.pid} of {client.id}")
        finally:
            if pidfd >= 0:
                os.close(pidfd)

    async def _claim_spare(self, namespace: str, id: str, bundle: Path) -> ShimClient | None:
        """The ready spare, now the shim of `bundle`; None when there is none ready."""
        task = self._spare
        if task is None:
            return None
        self._spare = None
        try:
            # one still being forked is ready sooner than a fork queued behind it
            spare = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                spare = None
            else:  # our caller was cancelled: keep the spare for the next create
                if self._spare is None and not self._closed:
                    self._spare = task
                else:
                    task.add_done_callback(_drop_spare)
                raise
        except Exception:  # noqa: BLE001 - _make_spare logs; a fork is the way then
            spare = None
        self._replenish()
        if spare is None:
            return None
        claim = json.dumps({"id": id, "namespace": namespace, "bundle": str(bundle)})
        try:
            spare.writer.write(claim.encode() + b"\n")
            await spare.writer.drain()
            reply = json.loads(
                await asyncio.wait_for(spare.reader.readline(), LAUNCH_TIMEOUT) or b"{}")
        except (OSError, ValueError, TimeoutError) as exc:
            reply = {"error": str(exc) or type(exc).__name__}
        except BaseException:
            # the claim may have reached the spare: it must not become this bundle's shim
            await asyncio.shield(self._kill_spare(spare))
            raise
        if "address" not in reply:
            log.warning("spare shim not usable for %s/%s: %s", namespace, id,
                        reply.get("error", "no answer"))
            # killed, not just let go: one that read the claim would serve `bundle` next to
            # the shim forked for it now
            await self._kill_spare(spare)
            return None
        spare.release()
        client = spare.client  # connected already, to the socket the shim keeps
        client.id, client.bundle = id, bundle
        return client

    async def _kill_spare(self, spare: Spare) -> None:
        """SIGKILL a spare whose claim went wrong (it supervises nothing yet), wait until it
        is gone, then remove the socket and bundle files it may have left."""
        try:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(spare.pidfd, signal.SIGKILL)
            await _exited(spare.pidfd, CONNECT_TIMEOUT)
        finally:
            spare.release()
            await spare.client.close()
        Path(spare.client.address.removeprefix("unix://")).unlink(missing_ok=True)

    def _replenish(self) -> None:
        """Fork the next spare in the background (one at a time, never after close)."""
        if self.use_spare and not self._closed and self._spare is None:
            self._spare = asyncio.ensure_future(self._make_spare())

    async def _make_spare(self) -> Spare | None:
        sock = self.spares_dir / f"{os.urandom(6).hex()}.sock"
        if len(str(sock)) > 100:  # sun_path: no spares with a state dir this deep
            return None
        self.spares_dir.mkdir(mode=0o700, exist_ok=True)
        request = json.dumps({"op": "spare", "socket": str(sock)})
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.zygote_socket))
        except OSError:
            return None
        client = None
        try:
            writer.write(request.encode() + b"\n")
            await writer.drain()
            reply = await _forked_answer(reader)
            if "address" not in reply:
                log.warning("no spare shim: %s", reply.get("error", "no answer"))
                writer.close()
                return None
            client = ShimClient("", reply["address"], self.spares_dir)
            connected = await client.call("Connect", shim_pb2.ConnectRequest(),
                                          timeout=CONNECT_TIMEOUT)
            client.pid = connected.shim_pid
            pidfd = os.pidfd_open(client.pid)  # it has just answered: the pid is the spare's
        except BaseException as exc:
            writer.close()  # the spare sees EOF and exits
            if client is not None:
                await client.close()
            if isinstance(exc, (OSError, ValueError, TimeoutError, RuntimedError)):
                log.warning("no spare shim: %s", exc)
                return None
            raise
        return Spare(client, reader, writer, pidfd)

    async def close_spare(self) -> None:
        """Let the spare go (it exits when its connection closes); no new ones."""
        self._closed = True
        task, self._spare = self._spare, None
        if task is None:
            return
        if not task.done():
            task.cancel()
        try:
            spare = await task
        except BaseException:  # noqa: BLE001 - cancelled or failed: nothing to close
            return
        if spare is not None:
            pidfd, spare.pidfd = spare.pidfd, -1
            spare.release()  # EOF on its lifeline: it exits
            await spare.client.close()
            try:  # gone before runtimed is: nothing outlives it
                await _exited(pidfd, 2.0)
            finally:
                os.close(pidfd)

    async def _fork_from_zygote(self, namespace: str, id: str, bundle: Path) -> tuple[str, int]:
        """The address and pid of a shim the zygote forked for `bundle`, serving."""
        request = json.dumps({"id": id, "namespace": namespace, "bundle": str(bundle)})
        try:
            reply = await self._zygote_call(request)
        except (FileNotFoundError, ConnectionRefusedError):
            async with self._zygote_lock:
                try:
                    reply = await self._zygote_call(request)
                except (FileNotFoundError, ConnectionRefusedError):
                    await self._start_zygote()
                    reply = await self._zygote_call(request)
        if "error" in reply:
            message = f"shim for {namespace}/{id} failed to start: {reply['error']}"
            raise from_code(reply["code"], message) if "code" in reply else Unavailable(message)
        if "address" not in reply or not isinstance(reply.get("pid"), int):
            # it went away before answering: launch the shim directly
            raise OSError(f"the shim zygote gave no answer for {namespace}/{id}")
        return reply["address"], reply["pid"]

    async def _zygote_call(self, line: str) -> dict:
        reader, writer = await asyncio.open_unix_connection(str(self.zygote_socket))
        try:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            return await _forked_answer(reader)
        finally:
            writer.close()

    async def _start_zygote(self) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shimd.zygote", "--socket", str(self.zygote_socket),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            start_new_session=True, env=_shim_env(),
        )
        if await asyncio.wait_for(proc.wait(), LAUNCH_TIMEOUT) != 0:
            raise OSError(f"shim zygote did not start (see {self.zygote_socket}.log)")

    async def stop_zygote(self) -> None:
        """Stop the spare and the zygote (shims it forked are on their own and keep
        running)."""
        await self.close_spare()
        try:
            await asyncio.wait_for(self._zygote_call('{"op": "exit"}'), 5)
        except (OSError, ValueError, TimeoutError):
            pass

    async def _launch(self, namespace: str, id: str, bundle: Path) -> ShimClient:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shimd", "--id", id, "--namespace", namespace,
            "--bundle", str(bundle),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True, env=_shim_env(),
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), LAUNCH_TIMEOUT)
        except TimeoutError:
            # the launcher and the shim it forked: the shim leaves the launcher's process
            # group only once it serves (shimd.server.launch)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise Unavailable(
                f"shim for {namespace}/{id} did not start in {LAUNCH_TIMEOUT}s"
            ) from None
        if proc.returncode != 0:
            raise Unavailable(
                f"shim for {namespace}/{id} failed to start: {err.decode(errors='replace').strip()}"
            )
        return await self.connect(id, out.decode().strip(), bundle)

    async def connect(self, id: str, address: str, bundle: Path) -> ShimClient:
        client = ShimClient(id, address, bundle)
        try:
            reply = await client.call("Connect", shim_pb2.ConnectRequest(id=id),
                                      timeout=CONNECT_TIMEOUT)
            client.pid = reply.shim_pid
        except BaseException:
            await client.close()
            raise
        return client

    def scan(self) -> list[tuple[str, str, Path]]:
        """Every bundle on disk: (namespace, id, path)."""
        found = []
        if not self.tasks_dir.is_dir():
            return found
        for ns_dir in sorted(self.tasks_dir.iterdir()):
            if ns_dir.is_dir():
                found += [(ns_dir.name, b.name, b) for b in sorted(ns_dir.iterdir()) if b.is_dir()]
        return found

    async def cleanup(self, info: BundleInfo, bundle: Path) -> None:
        """After a dead (or never started) shim: make the runtime forget the container
        (killing what is left of it), unmount its rootfs, remove the bundle."""
        _remove_spare_socket(bundle, self.spares_dir)
        runtime_root = _runtime_root(bundle)
        if runtime_root is not None:
            from shimd.runtime import command_for

            argv = [*command_for(info.runtime), "--root", str(runtime_root), "delete",
                    "--force", info.id]
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                    env=_shim_env(),  # the built-in runtime runs with -S: no site, PYTHONPATH
                )
                _, err = await proc.communicate()
                if proc.returncode != 0 and b"not exist" not in err:
                    log.warning("%s/%s: runtime delete: %s", info.namespace, info.id,
                                err.decode(errors="replace").strip())
            except OSError as exc:
                log.warning("%s/%s: runtime delete: %s", info.namespace, info.id, exc)
        await asyncio.to_thread(remove_bundle, bundle)


def _runtime_root(bundle: Path) -> Path | None:
    """The OCI runtime's --root for a container of this bundle: `runtime/` (runc, or the
    built-in runtime's command line), or the bundle itself, where the built-in runtime
    keeps the state of an init the shim forked; None when the runtime has none."""
    if (bundle / "runtime").is_dir():
        return bundle / "runtime"
    if (bundle / "state.json").exists():
        return bundle
    return None


def remove_stale_sockets(directory: Path) -> None:
    """Sockets in `directory` nobody listens on: spares and claimed spares that were
    killed (a live one accepts the probe; a spare exits with its runtimed)."""
    import socket

    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return
    for path in entries:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)
        finally:
            probe.close()


def _remove_spare_socket(bundle: Path, directory: Path) -> None:
    """After a dead shim that was a spare: its socket lives outside the bundle."""
    try:
        address = (bundle / "address").read_text().strip()
    except OSError:
        return
    path = Path(address.removeprefix("unix://"))
    if path.parent == directory:
        path.unlink(missing_ok=True)


def pidfd_of(pid: int) -> int:
    """A pidfd for `pid`, or -1 when it is gone (or unknown)."""
    if pid <= 0:
        return -1
    try:
        return os.pidfd_open(pid)
    except OSError:
        return -1


def shim_pid_file(bundle: Path) -> int:
    """The pid the shim of `bundle` wrote there (0: none); not proof it still runs."""
    try:
        return int((bundle / "shim.pid").read_text())
    except (OSError, ValueError):
        return 0


def shim_running(bundle: Path, pid: int = 0) -> bool | None:
    """Whether the shim of `bundle` runs: process `pid` (default: the one its shim.pid
    names) alive and working in `bundle` (a shim's cwd is its bundle and follows a rename
    of it, so a pid some other process got since is never taken for the shim). True: it
    runs there; False: gone, a zombie (it has no cwd), working elsewhere, or no pid file;
    None: cannot tell (out of fds, say), which a caller must never take for dead."""
    if pid <= 0:
        try:
            pid = int((bundle / "shim.pid").read_text())
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return False
        except OSError:
            return None
        if pid <= 0:
            return False
    try:  # a readlink: no fd needed
        return os.readlink(f"/proc/{pid}/cwd") == os.path.realpath(bundle)
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return None


def shim_pidfd(pid: int, bundle: Path) -> int:
    """A pidfd for the shim `pid` working in `bundle`, or -1 (gone, or the pid is another
    process's by now, or that cannot be told). Checked after the open: the pidfd then
    names the shim, whatever happens to the number later."""
    pidfd = pidfd_of(pid)
    if pidfd >= 0 and not shim_running(bundle, pid):
        os.close(pidfd)
        return -1
    return pidfd


async def _forked_answer(reader: asyncio.StreamReader) -> dict:
    """The zygote's answer (`{}` when the connection closes without one), with the pid the
    shim said first (`pid`, when it did). A shim it forked first says its pid, then its
    address once it serves: one that has not served within LAUNCH_TIMEOUT is killed, so
    the caller's next try (a direct launch) does not leave it to wake up later beside the
    shim that took its place."""
    pidfd, pid = -1, None
    try:
        async with asyncio.timeout(LAUNCH_TIMEOUT):
            while True:
                answer = json.loads(await reader.readline() or b"{}")
                if not isinstance(answer, dict) or answer.keys() != {"pid"}:
                    if isinstance(answer, dict) and pid is not None:
                        answer.setdefault("pid", pid)
                    return answer
                if pidfd < 0 and isinstance(answer["pid"], int):
                    pid = answer["pid"]
                    pidfd = pidfd_of(pid)
    except TimeoutError:
        if pidfd >= 0:  # it hung before it served (its log a FIFO nobody reads, say)
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            await _exited(pidfd, CONNECT_TIMEOUT)
        raise
    finally:
        if pidfd >= 0:
            os.close(pidfd)


async def _exited(pidfd: int, timeout: float) -> bool:
    """Whether the process behind `pidfd` exited within `timeout` (readable once it has)."""
    if select.select([pidfd], [], [], 0)[0]:
        return True
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    loop.add_reader(pidfd, lambda: exited.done() or exited.set_result(None))
    try:
        await asyncio.wait_for(exited, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)


async def await_exit(pidfd: int, timeout: float, what: str) -> None:
    """Until the process behind `pidfd` has exited; SIGKILLed if it has not after `timeout`."""
    if await _exited(pidfd, timeout):
        return
    log.warning("%s did not exit; killing it", what)
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    await _exited(pidfd, CONNECT_TIMEOUT)


def _drop_spare(task: asyncio.Task) -> None:
    """Close a spare nobody will claim (its lifeline's EOF ends it)."""
    if task.cancelled() or task.exception() or task.result() is None:
        return
    spare = task.result()
    spare.release()
    asyncio.ensure_future(spare.client.close())


def remove_bundle(bundle: Path) -> None:
    """Unmount the rootfs, then remove the bundle; never deletes through a mount."""
    rootfs = bundle / "rootfs"
    if rootfs.exists():
        mounts.unmount_all(rootfs, detach=True)
        if mounts.is_mountpoint(rootfs):
            raise Unavailable(f"{rootfs} is still mounted: bundle kept")
        try:
            rootfs.rmdir()
        except OSError as exc:
            log.warning("%s not removed (%s): the bundle is kept", rootfs, exc)
            return
    shutil.rmtree(bundle, ignore_errors=True)
    try:
        bundle.parent.rmdir()  # the namespace dir, once empty
    except OSError:
        pass


def read_info(bundle: Path) -> BundleInfo | None:
    try:
        data = json.loads((bundle / RECORD).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return BundleInfo(data["namespace"], data["id"], data.get("runtime", ""),
                      data.get("rootfs_mounted", False))


def _shim_env() -> dict[str, str]:
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
