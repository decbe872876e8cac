"""The runtimed daemon: open the root, wire the core components, serve gRPC on a unix socket.

`Daemon` holds the core components (plain classes, no gRPC); `create_server` binds the
service adapters to them; `main` is the `runtimed` command.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import fcntl
import logging
import os
import signal
import sys
import uuid
from pathlib import Path

from runtimed import __version__
from runtimed.build.builder import Builder
from runtimed.config import Config
from runtimed.content.store import ContentStore
from runtimed.diff.differ import Differ
from runtimed.errors import FailedPrecondition, RuntimedError
from runtimed.events.exchange import Exchange
from runtimed.images.registry.hosts import RegistryHosts
from runtimed.images.registry.transfer import RegistryTransfers
from runtimed.images.unpack import Unpacker
from runtimed.metadata.containers import ContainerStore
from runtimed.metadata.db import Database
from runtimed.metadata.gc import GarbageCollector
from runtimed.metadata.images import ImageStore
from runtimed.metadata.leases import LeaseStore
from runtimed.metadata.namespaces import NamespaceStore
from runtimed.network.manager import NetworkManager
from runtimed.restart.manager import RestartManager
from runtimed.runtime.tasks import TaskManager
from runtimed.snapshots import open_snapshotters
from runtimed.volumes.store import VolumeStore

log = logging.getLogger("runtimed")

MAX_MESSAGE_SIZE = 16 << 20  # containerd's clients send and accept up to 16 MiB


class Daemon:
    """The core of runtimed: every component a service adapter may call."""

    def __init__(self, config: Config):
        self.config = config
        self.root = config.root_path
        self.state = config.state_path
        self.root.mkdir(parents=True, exist_ok=True, mode=0o711)
        self.state.mkdir(parents=True, exist_ok=True, mode=0o711)
        self._lock_fd = _lock_root(self.root)
        self.uuid = _server_uuid(self.root)
        self.db = Database(self.root / "meta.db")
        self.exchange = Exchange()
        # coroutines run once the event loop is up (services that need it, shim reconnects)
        self.on_start: list = []
        self.namespaces = NamespaceStore(self.db, self.exchange)
        self.containers = ContainerStore(self.db, self.namespaces, self.exchange)
        self.tasks = TaskManager(self.state, self.containers, self.exchange)
        self.leases = LeaseStore(self.db, self.namespaces)
        self.content = ContentStore(self.root, self.db, self.leases, self.namespaces, self.exchange)
        self.images = ImageStore(self.db, self.namespaces, self.exchange)
        self.gc = GarbageCollector(self.db, self.content)
        self.leases.gc = self.content.gc = self.images.gc = self.gc
        self.snapshotters = open_snapshotters(self.root, self.db, self.exchange, self.leases,
                                              self.namespaces, self.gc)
        self.differ = Differ(self.content, self.root / "tmpmounts")
        self.unpacker = Unpacker(self.content, self.images, self.snapshotters, self.differ,
                                 self.leases)
        self.registry = RegistryTransfers(self.content, self.images, self.leases,
                                          RegistryHosts(config.registries), self.unpacker)
        self.volumes = VolumeStore(self.root, self.db, self.namespaces, self.containers,
                                   self.snapshotters)
        self.volumes.repair()
        self.networks = NetworkManager(self.state, self.db, self.namespaces, self.containers,
                                       self.exchange, root=self.root)
        self.builder = Builder(self.db, self.content, self.images, self.snapshotters, self.differ,
                               self.unpacker, self.leases, self.containers, self.tasks,
                               self.root / "build", self.registry, self.namespaces)
        self.restarts = RestartManager(self.namespaces, self.containers, self.tasks,
                                       self.snapshotters, self.exchange, self.volumes)
        # in this order: shims found again, then GC (every store has registered with it by now)
        self.on_start += [self.tasks.load, self.gc.start, self.networks.start,
                          self.builder.recover, self.restarts.start]

    async def start(self) -> None:
        """Work that needs the event loop (reconnecting shims, background GC)."""
        self.exchange.bind(asyncio.get_running_loop())
        for hook in self.on_start:
            await hook()

    async def stop(self) -> None:
        await self.tasks.close()
        await asyncio.to_thread(self.networks.close)
        self.gc.close()
        self.db.close()
        os.close(self._lock_fd)


def _limit_malloc_retention() -> None:
    """Keep glibc from holding on to memory the daemon has freed.

    Imports, pulls and pushes move data in 1 MiB buffers on worker threads. glibc gives
    each thread its own arena and, once a large mmap'd buffer is freed, raises its mmap
    threshold, so later large buffers come from the arenas and stay there: the daemon's
    RSS grew from ~55 to ~180 MB over two 200 MB imports, two pulls and two pushes. Two
    arenas (freed buffers get reused instead of new arenas growing) and a threshold fixed
    at 4 MiB keep it at ~80 MB over the whole bench sequence (docs/architecture.md). A
    lower threshold (256 KiB) saves 3 MB more but maps and faults in every 1 MiB buffer:
    import throughput fell by a quarter. The trim threshold goes with it (glibc leaves it
    at 128 KiB once the mmap threshold is set): a freed 1 MiB message at the top of the
    heap was handed back to the kernel and the next one faulted in again, ~32k page
    faults and ~0.1 s of CPU per 200 MB ingested. 4 MiB (at most that much kept free per
    arena) costs ~5 MB of RSS after 200 MB imports (59 -> 64 MB); 2 MiB kept ~25k faults."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:  # not glibc
        return
    mallopt(_M_ARENA_MAX, 2)
    mallopt(_M_MMAP_THRESHOLD, 4 << 20)
    mallopt(_M_TRIM_THRESHOLD, 4 << 20)


_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def _lock_root(root: Path) -> int:
    """Hold an exclusive lock on the root for the daemon's lifetime."""
    fd = os.open(root / "runtimed.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise FailedPrecondition(
            f"root {root} is in use by another runtimed (pid {holder}); "
            "stop it or choose another --root"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _server_uuid(root: Path) -> str:
    path = root / "uuid"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        value = str(uuid.uuid4())
        tmp = path.with_suffix(".tmp")
        tmp.write_text(value + "\n")
        os.replace(tmp, path)
        return value


def create_server(daemon: Daemon):
    """The daemon's gRPC server over every service: our own HTTP/2 server
    (runtimed/services/h2server.py; docs/architecture.md says why not grpc.aio)."""
    from runtimed.services import base, catalog
    from runtimed.services.h2server import Server

    table = base.MethodTable()
    catalog.register_all(table, daemon)
    return Server(table, MAX_MESSAGE_SIZE)


def _prepare_socket(address: str, group: str) -> None:
    path = Path(address)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    if path.exists() or path.is_symlink():
        path.unlink()  # stale: the root lock proved no live runtimed owns it


def _secure_socket(address: str, group: str) -> None:
    gid = 0
    if group:
        import grp

        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            gid = int(group) if group.isdigit() else 0
    os.chown(address, 0, gid)
    os.chmod(address, 0o660)


async def serve(config: Config) -> None:
    daemon = Daemon(config)
    _prepare_socket(config.address, config.socket_group)
    server = create_server(daemon)
    await daemon.start()
    await server.start(config.address)
    _secure_socket(config.address, config.socket_group)
    log.info("runtimed %s serving on %s (root %s)", __version__, config.address, config.root)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("stopping")
    await server.stop(grace=2)
    await daemon.stop()
    try:
        os.unlink(config.address)
    except FileNotFoundError:
        pass


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop: the gRPC server's socket reads, writes and callbacks cost ~25% less CPU per
    call than on asyncio's own loop (0.098 vs 0.133 ms per warm Version; with grpc.aio it
    was ~20%, docs/architecture.md)."""
    import uvloop

    return uvloop.new_event_loop()


def _setup_logging(level: str, fmt: str) -> None:
    if fmt == "json":
        import json

        class JsonFormatter(logging.Formatter):
            def format(self, record):
                return json.dumps(
                    {
                        "time": self.formatTime(record),
                        "level": record.levelname.lower(),
                        "logger": record.name,
                        "msg": record.getMessage(),
                    }
                )

        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=level.upper(), handlers=[handler])
    else:
        logging.basicConfig(
            level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )


def _raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: runtimed holds a pidfd per task, so ~1000
    tasks would hit systemd's default soft 1024 (containerd's unit sets
    LimitNOFILE=infinity). Children inherit it, as containerd's shims do."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    _limit_malloc_retention()
    _raise_fd_limit()
    parser = argparse.ArgumentParser(prog="runtimed", description="container runtime daemon")
    parser.add_argument("--config", help="TOML file with the same keys as these flags")
    parser.add_argument("--address", help="unix socket to serve on")
    parser.add_argument("--root", help="persistent state (metadata, content, snapshots)")
    parser.add_argument("--state", help="per-boot state (sockets, bundles)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", choices=["text", "json"])
    parser.add_argument("--version", action="version", version=f"runtimed {__version__}")
    args = parser.parse_args(argv)
    try:
        config = Config.load(
            args.config,
            address=args.address,
            root=args.root,
            state=args.state,
            log_level=args.log_level,
            log_format=args.log_format,
        )
        _setup_logging(config.log_level, config.log_format)
        with asyncio.Runner(loop_factory=_new_event_loop) as runner:
            runner.run(serve(config))
    except RuntimedError as exc:
        print(f"runtimed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
