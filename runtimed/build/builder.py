"""Build an image from a Dockerfile, step by step, in the daemon.

Each filesystem step (RUN, COPY, ADD, WORKDIR) prepares an active snapshot on the previous
step's chain, changes it (RUN: a real container through the TaskManager; COPY/ADD: files
copied in by the daemon), computes the diff as a gzip layer blob and commits the snapshot
under the new chain ID, exactly as unpack would name it. Metadata steps only change the
config. Everything is made under one build lease, so a failure (or a crash) leaves
nothing the garbage collector would not take; on success the image record holds it.

The cache maps (parent step, instruction as expanded, build args in scope, source content)
to the step's result, including its history timestamp, so a fully cached rebuild makes
the same config, manifest and digest.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from runtimed.build import dangling
from runtimed.build import dockerfile as df
from runtimed.build.context import Context, content_hash
from runtimed.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from runtimed.images import mediatypes, platforms
from runtimed.images import reference as references
from runtimed.images.manifest import Descriptor, dump_json, gc_labels, parse_config
from runtimed.images.unpack import apply_layer, chain_ids, is_committed
from runtimed.metadata.containers import AnyValue, Container
from runtimed.runtime.tasks import Stdio
from runtimed.snapshots.base import SNAPSHOT_REF_LABEL
from runtimed.snapshots.mount import temp_mount
from runtimed.tarsafe import tarfile

log = logging.getLogger("runtimed.build")

SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
BUILD_LABEL = "runtimed.io/build"
DEFAULT_SHELL = ["/bin/sh", "-c"]
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
FS_STEPS = {"run", "copy", "add", "workdir"}
# ARGs Docker predefines: usable without an ARG line, left out of the cache key
PREDEFINED_ARGS = {"HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "FTP_PROXY",
                   "ftp_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"}

SCHEMA = ["""
CREATE TABLE build_cache (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    result TEXT NOT NULL,
    PRIMARY KEY (namespace, key)
);
"""]


@dataclass
class BuildOptions:
    dockerfile: str  # its text
    tags: list[str] = field(default_factory=list)
    build_args: dict[str, str] = field(default_factory=dict)
    target: str = ""
    no_cache: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    platform: str = ""
    network: str = ""  # "" / "none": no network; "host"
    snapshotter: str = "overlayfs"


@dataclass
class Progress:
    """One line of progress. kind: step (a new step starts), running (its container),
    log (output of a RUN), cached, done (the step's result id), info."""

    kind: str
    text: str
    step: int = 0
    total: int = 0


@dataclass
class BuildResult:
    names: list[str]
    target: Descriptor
    image_id: str  # the config digest, as docker names an image


@dataclass
class _Stage:
    """A stage's image as the steps leave it."""

    config: dict
    layers: list[Descriptor]
    key: str  # cache identity of the state so far
    args: dict[str, str] = field(default_factory=dict)
    shell: list[str] = field(default_factory=lambda: list(DEFAULT_SHELL))
    cmd_set: bool = False  # CMD given in this stage: a later ENTRYPOINT keeps it

    @property
    def chain(self) -> str:
        ids = chain_ids(self.config["rootfs"]["diff_ids"])
        return ids[-1] if ids else ""

    @property
    def env(self) -> dict[str, str]:
        out = {}
        for item in self.config["config"].get("Env") or []:
            k, _, v = item.partition("=")
            out[k] = v
        return out


class StepFailed(FailedPrecondition):
    pass


class Builder:
    def __init__(self, db, content, images, snapshotters: dict, differ, unpacker, leases,
                 containers, tasks, work_dir: Path, registry=None, namespaces=None):
        self.db = db
        self.namespaces_list = namespaces.list if namespaces is not None else list
        self.registry = registry  # pulls a base image that is not here (None: refuse)
        self.content = content
        self.images = images
        self.snapshotters = snapshotters
        self.differ = differ
        self.unpacker = unpacker
        self.leases = leases
        self.containers = containers
        self.tasks = tasks
        self.work_dir = work_dir
        db.migrate("build", SCHEMA)
        self._repair()

    def _repair(self) -> None:
        """Build work dirs a crash left behind (their lease expires; the files do not)."""
        if self.work_dir.exists():
            from runtimed.snapshots.mount import unmount_all

            for entry in self.work_dir.iterdir():
                unmount_all(entry, detach=True)
                shutil.rmtree(entry, ignore_errors=True)
        self.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    async def recover(self) -> None:
        """After a crash: the RUN containers, scratch snapshots and leases of builds that
        were running are removed (the build itself is gone with the stream)."""
        for namespace in await asyncio.to_thread(self.namespaces_list):
            ns = namespace.name
            for c in await asyncio.to_thread(self.containers.list, ns):
                if c.labels.get(BUILD_LABEL) != "run":
                    continue
                with contextlib.suppress(Exception):
                    await self.tasks.kill(ns, c.id, "", 9, True)
                    await self.tasks.wait(ns, c.id)
                with contextlib.suppress(NotFound):
                    await self.tasks.delete(ns, c.id)
                with contextlib.suppress(NotFound):
                    await asyncio.to_thread(self.containers.delete, ns, c.id)
            for sn in self.snapshotters.values():
                for info in await asyncio.to_thread(lambda sn=sn, ns=ns: list(sn.walk(ns))):
                    if info.name.startswith("build-") and info.kind.name != "COMMITTED":
                        with contextlib.suppress(NotFound):
                            await asyncio.to_thread(sn.remove, ns, info.name)
            for lease in await asyncio.to_thread(self.leases.list, ns):
                if lease.labels.get(BUILD_LABEL) == "lease":
                    with contextlib.suppress(NotFound):
                        await asyncio.to_thread(self.leases.delete, ns, lease.id)

    def work(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="build-", dir=self.work_dir))

    async def build(self, ns: str, context_dir: Path, options: BuildOptions
                    ) -> AsyncIterator[Progress | BuildResult]:
        """Yields progress while it works, the BuildResult last."""
        dockerfile = df.parse(options.dockerfile)
        sn = self.snapshotters.get(options.snapshotter)
        if sn is None:
            raise NotFound(f"snapshotter {options.snapshotter!r} is not available")
        if options.platform:
            wanted = platforms.parse(options.platform)
            if not platforms.default().match(wanted):
                raise InvalidArgument(f"--platform {options.platform}: only this host's platform "
                                      f"({platforms.format(platforms.host_default())}) can be built")
        for tag in options.tags:
            references.parse(tag)
        run = _Run(self, ns, sn, Context(context_dir), dockerfile, options)
        run.lease = (await asyncio.to_thread(
            self.leases.create, ns, labels={"containerd.io/gc.expire": _expiry(),
                                            BUILD_LABEL: "lease"})).id
        try:
            async with contextlib.aclosing(run.all()) as items:
                async for item in items:
                    yield item
        finally:
            await _shielded(asyncio.to_thread(self.leases.delete, ns, run.lease))

    # -- cache --------------------------------------------------------------------------

    def cache_get(self, ns: str, key: str) -> dict | None:
        with self.db.read() as conn:
            row = conn.execute("SELECT result FROM build_cache WHERE namespace = ? AND key = ?",
                               (ns, key)).fetchone()
        return json.loads(row["result"]) if row else None

    def cache_put(self, ns: str, key: str, result: dict) -> None:
        with self.db.transaction() as tx:
            tx.execute("INSERT OR REPLACE INTO build_cache (namespace, key, result) VALUES (?, ?, ?)",
                       (ns, key, json.dumps(result)))


class _Run:
    """One build: the parsed file, the stages built so far, the lease."""

    def __init__(self, builder: Builder, ns: str, sn, context: Context,
                 dockerfile: df.Dockerfile, options: BuildOptions):
        self.b = builder
        self.ns = ns
        self.sn = sn
        self.context = context
        self.file = dockerfile
        self.options = options
        self.lease = ""
        self.built: dict[int, _Stage] = {}
        self.meta_args: dict[str, str] = {}
        self.used_args: set[str] = set()
        self.step = 0
        self.total = 0

    # -- plan ---------------------------------------------------------------------------

    def _target(self) -> df.Stage:
        if not self.options.target:
            return self.file.stages[-1]
        stage = self.file.stage(self.options.target)
        if stage is None or stage.name != self.options.target.lower():
            raise InvalidArgument(f"target stage {self.options.target!r} could not be found")
        return stage

    def _needed(self, target: df.Stage) -> list[df.Stage]:
        """The stages the target depends on (FROM <stage>, COPY --from=<stage>), in order."""
        needed: set[int] = set()

        def visit(stage: df.Stage) -> None:
            if stage.index in needed:
                return
            needed.add(stage.index)
            base = self.file.stage(df.expand(stage.base, self.meta_args, self.file.escape))
            if base is not None and base.index < stage.index and base.name:
                visit(base)
            for inst in stage.instructions:
                ref = inst.flag("from")
                if inst.cmd == "copy" and ref:
                    dep = self.file.stage(ref)
                    if dep is not None and dep.index < stage.index:
                        visit(dep)

        visit(target)
        return [s for s in self.file.stages if s.index in needed]

    async def all(self) -> AsyncIterator[Progress | BuildResult]:
        for inst in self.file.meta_args:
            for name, value in df.pairs(inst, self.meta_args, self.file.escape):
                self.meta_args[name] = self.options.build_args.get(name, value or "")
                self.used_args.add(name)
        stages = self._needed(self._target())
        self.total = sum(1 + len(s.instructions) for s in stages)
        final = None
        for stage in stages:
            final = None
            async with contextlib.aclosing(self._stage(stage)) as items:
                async for item in items:
                    if isinstance(item, _Stage):
                        final = item
                    else:
                        yield item
            self.built[stage.index] = final
        unused = sorted(set(self.options.build_args) - self.used_args - PREDEFINED_ARGS)
        if unused:
            yield Progress("info", f"[Warning] One or more build-args {unused} were not consumed")
        yield await asyncio.to_thread(self._finish, final)

    # -- stages -------------------------------------------------------------------------

    def _emit_step(self, text: str) -> Progress:
        self.step += 1
        return Progress("step", text, self.step, self.total)

    async def _stage(self, stage: df.Stage) -> AsyncIterator[Progress | _Stage]:
        base = df.expand(stage.base, self.meta_args, self.file.escape)
        platform = df.expand(stage.platform, self.meta_args, self.file.escape)
        if platform and not platforms.default().match(platforms.parse(platform)):
            raise InvalidArgument(f"Dockerfile line {stage.line}: FROM --platform={platform}: only "
                                  "this host's platform can be built (steps run natively)")
        yield self._emit_step(f"FROM {base}" + (f" AS {stage.name}" if stage.name else ""))
        state = await asyncio.to_thread(self._base, base, stage)
        triggers = self._triggers(state, stage)
        if triggers:
            yield Progress("info", f"# Executing {len(triggers)} build trigger"
                           + ("s" if len(triggers) > 1 else ""))
        yield Progress("done", _short(state.key))
        for inst in triggers + stage.instructions:
            if inst in triggers:
                yield Progress("info", f"Trigger: {inst.original}")
            else:
                yield self._emit_step(inst.original)
            try:
                async with contextlib.aclosing(self._instruction(state, inst)) as items:
                    async for item in items:
                        yield item
            except (InvalidArgument, NotFound) as exc:
                if str(exc).startswith("Dockerfile line"):
                    raise
                raise type(exc)(f"Dockerfile line {inst.line}: {exc}") from None
        yield state

    def _triggers(self, state: _Stage, stage: df.Stage) -> list[df.Instruction]:
        """The base image's ONBUILD instructions, run first, as docker does (the new
        image does not inherit them)."""
        texts = state.config["config"].pop("OnBuild", None) or []
        out = []
        for text in texts:
            try:
                parsed = df.parse(f"FROM scratch\n{text}\n").stages[0].instructions
            except InvalidArgument as exc:
                raise InvalidArgument(f"Dockerfile line {stage.line}: ONBUILD trigger {text!r} "
                                      f"of the base image: {exc}") from None
            for inst in parsed:
                inst.line = stage.line
                out.append(inst)
        return out

    def _base(self, name: str, stage: df.Stage) -> _Stage:
        earlier = self.file.stage(name)
        if earlier is not None and earlier.index < stage.index and earlier.name == name.lower():
            src = self.built[earlier.index]
            return _Stage(json.loads(json.dumps(src.config)), list(src.layers), src.key,
                          shell=list(src.shell))
        if name == "scratch":
            p = platforms.host_default()
            config = {"architecture": p.architecture, "os": p.os,
                      "config": {"Env": [DEFAULT_PATH]},
                      "rootfs": {"type": "layers", "diff_ids": []}, "history": []}
            if p.variant:
                config["variant"] = p.variant
            return _Stage(config, [], "scratch")
        ref = references.normalize(name)
        try:
            record = self.b.images.get(self.ns, ref)
        except NotFound:
            record = self._pull(name, ref)
        target = record.target
        manifest = self.b.unpacker._manifest(
            self.ns, Descriptor(target.media_type, target.digest, target.size), None)
        with self.b.content.open_blob(self.ns, manifest.config.digest) as f:
            config = parse_config(f.read(), f"config of {ref}")
        config.setdefault("config", {})
        config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
        config.setdefault("history", [])
        self.b.unpacker.unpack(self.ns, record, self.sn.name if hasattr(self.sn, "name") else None,
                               lease=self.lease)
        return _Stage(config, list(manifest.layers), manifest.config.digest)

    def _pull(self, name: str, ref: str):
        if self.b.registry is None:
            raise NotFound(f"base image {name!r} ({ref}) is not in namespace {self.ns!r}: "
                           "pull or load it first")
        from runtimed.errors import RuntimedError
        from runtimed.images.registry.transfer import PullRequest

        try:
            self.b.registry.pull(self.ns, PullRequest(ref, unpack=True, snapshotter=self.sn.name))
        except RuntimedError as exc:
            raise type(exc)(f"base image {name!r} is not in namespace {self.ns!r} and pulling "
                            f"it failed: {exc}") from None
        return self.b.images.get(self.ns, ref)

    # -- instructions -------------------------------------------------------------------

    def _vars(self, state: _Stage) -> dict[str, str]:
        return {**state.args, **state.env}

    async def _instruction(self, state: _Stage, inst: df.Instruction
                           ) -> AsyncIterator[Progress]:
        cmd = inst.cmd
        esc = self.file.escape
        if cmd == "arg":
            for name, value in df.pairs(inst, self._vars(state), esc):
                self.used_args.add(name)
                if name in self.options.build_args:
                    value = self.options.build_args[name]
                elif value is None:
                    value = self.meta_args.get(name)
                if value is not None:
                    state.args[name] = value
                state.key = _hash(state.key, "ARG", name, value)
            yield Progress("done", _short(state.key))
            return
        if cmd in FS_STEPS:
            async with contextlib.aclosing(self._fs_step(state, inst)) as items:
                async for item in items:
                    yield item
            return
        if await asyncio.to_thread(self._metadata, state, inst):
            yield Progress("cached", " ---> Using cache")
        yield Progress("done", _short(state.key))

    def _metadata(self, state: _Stage, inst: df.Instruction) -> bool:
        """Apply a config-only step; True when its history entry came from the cache."""
        cmd, esc, env = inst.cmd, self.file.escape, self._vars(state)
        c = state.config["config"]
        created_by = f"/bin/sh -c #(nop) {_history_text(inst, env, esc)}"
        if cmd == "env":
            current = state.env
            for name, value in df.pairs(inst, env, esc):
                current[name] = value or ""
            c["Env"] = [f"{k}={v}" for k, v in current.items()]
        elif cmd == "label":
            c.setdefault("Labels", {})
            for name, value in df.pairs(inst, env, esc):
                c["Labels"][name] = value or ""
        elif cmd in ("cmd", "entrypoint"):
            value = inst.json if inst.json is not None else (
                [*state.shell, inst.rest] if inst.rest else [])
            c["Cmd" if cmd == "cmd" else "Entrypoint"] = value
            if cmd == "entrypoint" and not inst.rest:
                c["Entrypoint"] = None
            if cmd == "cmd":
                state.cmd_set = True
            elif not state.cmd_set:
                c["Cmd"] = None  # as Docker: a new entrypoint drops the inherited Cmd
        elif cmd == "shell":
            state.shell = list(inst.json or [])
            c["Shell"] = list(state.shell)
        elif cmd == "user":
            c["User"] = df.expand(inst.rest, env, esc)
        elif cmd == "expose":
            ports = c.setdefault("ExposedPorts", {})
            for word in df.words(inst.rest, env, esc):
                port, _, proto = word.partition("/")
                proto = (proto or "tcp").lower()
                first, _, last = port.partition("-")
                if not first.isdigit() or (last and not last.isdigit()) or proto not in ("tcp", "udp", "sctp"):
                    raise inst.error(f"invalid port {word!r}")
                for n in range(int(first), int(last or first) + 1):
                    ports[f"{n}/{proto}"] = {}
        elif cmd == "volume":
            vols = c.setdefault("Volumes", {})
            for v in inst.json if inst.json is not None else df.words(inst.rest, env, esc):
                if not v:
                    raise inst.error("VOLUME specified can not be an empty string")
                vols[v] = {}
        elif cmd == "stopsignal":
            c["StopSignal"] = df.expand(inst.rest, env, esc)
        elif cmd == "maintainer":
            state.config["author"] = inst.rest
        elif cmd == "onbuild":
            trigger = inst.rest.split(None, 1)[0].lower()
            if trigger in ("onbuild", "from", "maintainer"):
                raise inst.error(f"{trigger.upper()} isn't allowed as an ONBUILD trigger")
            c.setdefault("OnBuild", []).append(inst.rest)
        elif cmd == "healthcheck":
            c["Healthcheck"] = _healthcheck(inst, state.shell)
        history = {"created_by": created_by, "empty_layer": True}
        state.key = _hash(state.key, created_by, json.dumps(c, sort_keys=True))
        cached = None if self.options.no_cache else self.b.cache_get(self.ns, state.key)
        history["created"] = cached["created"] if cached else _now()
        if not cached:
            self.b.cache_put(self.ns, state.key, {"created": history["created"]})
        state.config["history"].append(history)
        state.config["created"] = history["created"]
        return cached is not None

    # -- filesystem steps ---------------------------------------------------------------

    async def _fs_step(self, state: _Stage, inst: df.Instruction) -> AsyncIterator[Progress]:
        env = self._vars(state)
        esc = self.file.escape
        cmd = inst.cmd
        if cmd == "run":
            args = inst.json if inst.json is not None else [*state.shell, inst.rest]
            created_by = " ".join(args)
            run_args = sorted(f"{k}={v}" for k, v in state.args.items() if k not in PREDEFINED_ARGS)
            if run_args:
                created_by = f"|{len(run_args)} {' '.join(run_args)} {created_by}"
            network = inst.flag("network") or self.options.network or "none"
            if network not in ("none", "host", "default"):
                raise inst.error(f"network mode {network!r} is not supported (none or host)")
            extra = [network]
        elif cmd == "workdir":
            path = df.expand(inst.rest, env, esc)
            workdir = path if path.startswith("/") else os.path.join(
                state.config["config"].get("WorkingDir") or "/", path)
            workdir = os.path.normpath(workdir)
            state.config["config"]["WorkingDir"] = workdir
            created_by = f"/bin/sh -c #(nop) WORKDIR {workdir}"
            extra = [workdir]
        else:
            parts = inst.json if inst.json is not None else df.words(inst.rest, env, esc)
            if inst.json is not None:
                parts = [df.expand(p, env, esc) for p in parts]
            sources, dest = parts[:-1], parts[1:][-1]
            source_from = inst.flag("from")
            if cmd == "add":
                for s in sources:
                    if "://" in s:
                        raise inst.error(f"remote source {s!r} refused: this builder has no "
                                         "network; download it into the build context instead")
            if source_from:
                src_root_key = await asyncio.to_thread(self._from_key, source_from, inst)
                digest = _hash(src_root_key, *sources)
            else:
                paths = []
                for s in sources:
                    paths += self.context.sources(s, f"{cmd.upper()} failed")
                digest = await asyncio.to_thread(content_hash, paths, self.context.root,
                                                 self.context.included)
            chown = df.expand(inst.flag("chown"), env, esc)
            chmod = inst.flag("chmod")
            what = "dir" if len(sources) > 1 else "file"
            created_by = f"/bin/sh -c #(nop) {cmd.upper()} {what}:{digest.split(':')[1]} in {dest} "
            extra = [digest, chown, chmod, dest, json.dumps(sources), source_from]
        key = _hash(state.key, cmd, created_by, *extra)
        cached = None if self.options.no_cache else await asyncio.to_thread(
            self._cached, state, key)
        if cached is not None:
            yield Progress("cached", " ---> Using cache")
            layer, diff_id, created = cached
        else:
            result: list = []
            async with contextlib.aclosing(self._execute(state, inst, result)) as items:
                async for item in items:
                    yield item
            layer, diff_id = result
            created = _now()
            await asyncio.to_thread(self.b.cache_put, self.ns, key, {
                "created": created, "layer": layer.to_json(), "diff_id": diff_id})
        state.layers.append(layer)
        state.config["rootfs"]["diff_ids"].append(diff_id)
        state.config["history"].append({"created": created, "created_by": created_by})
        state.config["created"] = created
        state.key = key
        yield Progress("done", _short(key))

    def _cached(self, state: _Stage, key: str):
        """A cached step whose blob is still here, its snapshot re-made if it was collected."""
        found = self.b.cache_get(self.ns, key)
        if not found or "layer" not in found:
            return None
        layer = Descriptor.from_json(found["layer"], "cached layer")
        try:
            self.b.content.info(self.ns, layer.digest)
        except NotFound:
            return None
        diff_id = found["diff_id"]
        chain = chain_ids([*state.config["rootfs"]["diff_ids"], diff_id])[-1]
        self.b.leases.add_resource(self.ns, self.lease, _content_resource(layer.digest))
        if not is_committed(self.sn, self.ns, chain):
            apply_layer(self.b.content, self.b.differ, self.sn, self.ns, layer, diff_id,
                        chain, state.chain, self.lease)
        else:
            self.b.leases.add_resource(self.ns, self.lease, _snapshot_resource(self.sn, chain))
        return layer, diff_id, found["created"]

    def _from_key(self, ref: str, inst: df.Instruction) -> str:
        stage = self.file.stage(ref)
        if stage is not None:
            if stage.index not in self.built:
                raise inst.error(f"stage {ref!r} is not built before this one")
            return self.built[stage.index].key
        return self._base(ref, df.Stage(ref, "", len(self.file.stages), inst.line)).key

    async def _execute(self, state: _Stage, inst: df.Instruction, result: list
                       ) -> AsyncIterator[Progress]:
        """Run the step on a fresh active snapshot; result gets (layer, diff_id)."""
        parent = state.chain
        key = f"build-{os.urandom(8).hex()}"
        sn, ns = self.sn, self.ns
        mounts = await asyncio.to_thread(sn.prepare, ns, key, parent, lease=self.lease)
        try:
            if inst.cmd == "run":
                async with contextlib.aclosing(self._run(state, inst, key, mounts)) as items:
                    async for item in items:
                        yield item
            else:
                await asyncio.to_thread(self._change_files, state, inst, mounts)
            left = []
            if parent:
                view = f"{key}-parent"
                left = await asyncio.to_thread(sn.view, ns, view, parent, lease=self.lease)
            try:
                layer = await asyncio.to_thread(self.b.differ.diff, ns, left, mounts,
                                                mediatypes.OCI_LAYER_GZIP, "", None, self.lease)
            finally:
                if parent:
                    await asyncio.to_thread(sn.remove, ns, view)
            info = await asyncio.to_thread(self.b.content.info, ns, layer.digest)
            diff_id = info.labels["containerd.io/uncompressed"]
            chain = chain_ids([*state.config["rootfs"]["diff_ids"], diff_id])[-1]
            try:
                await asyncio.to_thread(sn.commit, ns, chain, key,
                                        {SNAPSHOT_REF_LABEL: chain}, self.lease)
                key = ""
            except AlreadyExists:
                await asyncio.to_thread(self.b.leases.add_resource, ns, self.lease,
                                        _snapshot_resource(sn, chain))
            result[:] = [layer, diff_id]
        finally:
            if key:
                await _shielded(asyncio.to_thread(_remove_quietly, sn, ns, key))

    async def _run(self, state: _Stage, inst: df.Instruction, key: str, mounts
                   ) -> AsyncIterator[Progress]:
        from runtimed.oci.spec import ImageConfig, SpecOptions, build_spec

        args = inst.json if inst.json is not None else [*state.shell, inst.rest]
        cid = key
        image = ImageConfig.from_blob(state.config)
        env = [f"{k}={v}" for k, v in state.args.items() if k not in state.env]
        network = inst.flag("network") or self.options.network or "none"
        opts = SpecOptions(args=args, entrypoint=[], env=env,
                           network="host" if network == "host" else "")
        spec = await asyncio.to_thread(build_spec, cid, self.ns, image, opts,
                                       _reader(mounts))
        spec["hostname"] = cid[:12]
        work = self.b.work()
        fifo = work / "output"
        os.mkfifo(fifo, 0o600)
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        container = Container(cid, "io.containerd.runc.v2",
                              AnyValue(SPEC_TYPE_URL, json.dumps(spec).encode()),
                              labels={BUILD_LABEL: "run"}, snapshotter=self.sn.name,
                              snapshot_key=key)
        created = started = False
        command = " ".join(args)
        stop = threading.Event()
        pump = None
        try:
            await asyncio.to_thread(self.b.containers.create, self.ns, container)
            created = True
            yield Progress("running", f" ---> Running in {cid[6:18]}")
            await self.b.tasks.create(self.ns, cid, mounts, Stdio(stdout=str(fifo), stderr=str(fifo)))
            started = True
            await self.b.tasks.start(self.ns, cid)
            queue: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            pump = loop.run_in_executor(None, _pump, reader, queue, loop, stop)
            while (line := await queue.get()) is not None:
                yield Progress("log", line)
            status = await self.b.tasks.wait(self.ns, cid)
            if status.exit_status != 0:
                raise StepFailed(
                    f"Dockerfile line {inst.line}: RUN {command!r} returned a non-zero code: "
                    f"{status.exit_status}")
        finally:
            await _shielded(self._remove_run(cid, created, started, reader, pump, stop, work))

    async def _remove_run(self, cid: str, created: bool, started: bool, reader: int, pump,
                          stop: threading.Event, work: Path) -> None:
        """Kill and delete the RUN container (a failed, finished or cancelled step)."""
        ns = self.ns
        if started:
            with contextlib.suppress(Exception):
                await self.b.tasks.kill(ns, cid, "", 9, True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.b.tasks.wait(ns, cid), 10)
            try:
                await self.b.tasks.delete(ns, cid)
            except NotFound:
                pass
            except Exception:  # noqa: BLE001 - recover() at the next start retries
                log.exception("build: deleting task %s", cid)
        if created:
            with contextlib.suppress(NotFound):
                await asyncio.to_thread(self.b.containers.delete, ns, cid)
        stop.set()
        if pump is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(pump), 5)
        if pump is None or pump.done():
            os.close(reader)
        shutil.rmtree(work, ignore_errors=True)

    # -- COPY, ADD, WORKDIR -------------------------------------------------------------

    def _change_files(self, state: _Stage, inst: df.Instruction, mounts) -> None:
        with temp_mount(mounts, parent=self.b.differ.tmp_dir) as root:
            if inst.cmd == "workdir":
                _mkdirs(root, state.config["config"]["WorkingDir"], 0, 0)
                return
            env = self._vars(state)
            esc = self.file.escape
            parts = inst.json if inst.json is not None else df.words(inst.rest, env, esc)
            if inst.json is not None:
                parts = [df.expand(p, env, esc) for p in parts]
            sources, dest = parts[:-1], parts[-1]
            workdir = state.config["config"].get("WorkingDir") or "/"
            dest_abs = dest if dest.startswith("/") else os.path.join(workdir, dest)
            if dest.endswith("/") or dest in (".", "./"):
                dest_abs = dest_abs.rstrip("/") + "/"
            uid = gid = 0
            chown = df.expand(inst.flag("chown"), env, esc)
            if chown:
                uid, gid = _owner(chown, root)
            mode = int(inst.flag("chmod"), 8) if inst.flag("chmod") else None
            ref = inst.flag("from")
            if ref:
                self._copy_from(ref, inst, sources, root, dest_abs, uid, gid, mode)
                return
            paths: list[Path] = []
            for s in sources:
                paths += self.context.sources(s, f"{inst.cmd.upper()} failed")
            _copy_paths(paths, root, dest_abs, uid, gid, mode, self.context.included,
                        extract=inst.cmd == "add")

    def _copy_from(self, ref, inst, sources, root, dest_abs, uid, gid, mode) -> None:
        stage = self.file.stage(ref)
        if stage is not None and stage.index in self.built:
            chain = self.built[stage.index].chain
        else:
            chain = self._base(ref, df.Stage(ref, "", len(self.file.stages), inst.line)).chain
        view = f"build-from-{os.urandom(6).hex()}"
        mounts = self.sn.view(self.ns, view, chain, lease=self.lease) if chain else []
        try:
            ctx = temp_mount(mounts, parent=self.b.differ.tmp_dir) if mounts else \
                tempfile.TemporaryDirectory(dir=self.b.differ.tmp_dir)
            with ctx as src_root:
                src_root = Path(src_root)
                paths: list[Path] = []
                for s in sources:
                    found = Context(src_root).sources(s, f"COPY --from={ref} failed")
                    paths += found
                _copy_paths(paths, root, dest_abs, uid, gid, mode, lambda p: True,
                            extract=False, keep_owner=not inst.flag("chown"))
        finally:
            if mounts:
                self.sn.remove(self.ns, view)

    # -- result -------------------------------------------------------------------------

    def _finish(self, state: _Stage) -> BuildResult:
        ns = self.ns
        config = state.config
        if self.options.labels:
            config["config"].setdefault("Labels", {}).update(self.options.labels)
        config.setdefault("created", _now())
        config_blob = dump_json(config)
        layers = [Descriptor(_oci_layer_type(m.media_type), m.digest, m.size) for m in state.layers]
        config_desc = Descriptor(mediatypes.OCI_CONFIG, "sha256:" + hashlib.sha256(config_blob).hexdigest(),
                                 len(config_blob))
        self.b.content.write_blob(ns, config_blob, expected_digest=config_desc.digest,
                                  expected_size=config_desc.size, lease=self.lease)
        manifest = {"schemaVersion": 2, "mediaType": mediatypes.OCI_MANIFEST,
                    "config": config_desc.to_json(), "layers": [m.to_json() for m in layers]}
        blob = dump_json(manifest)
        target = Descriptor(mediatypes.OCI_MANIFEST, "sha256:" + hashlib.sha256(blob).hexdigest(),
                            len(blob))
        self.b.content.write_blob(ns, blob, expected_digest=target.digest,
                                  expected_size=target.size,
                                  labels=gc_labels([config_desc, *layers]), lease=self.lease)
        from runtimed.metadata.images import Image

        names = [references.normalize(t) for t in self.options.tags]
        for name in names:
            record = Image(name, target, labels={})
            try:
                self.b.images.create(ns, record)
            except AlreadyExists:
                self.b.images.update(ns, record, ["target"])
            self.b.unpacker.unpack(ns, record, self.sn.name, lease=self.lease)
        if names:
            self._drop_dangling(target)
        else:
            self.b.unpacker.unpack(ns, self._keep_untagged(target), self.sn.name, lease=self.lease)
        return BuildResult(names, target, config_desc.digest)

    def _keep_untagged(self, target: Descriptor):
        """The record that keeps an untagged result: an image already naming this
        manifest (a rebuild of a tagged image), else a dangling one, as docker keeps it.

        The check and the creation are one metadata transaction: a tagged build of the
        same manifest creates its tag, then drops the dangling record (_drop_dangling),
        so it either comes after the record and drops it, or before and is found here;
        with the two apart, a dangling record could stay next to the tag."""
        from runtimed.metadata.images import Image

        images = self.b.images
        with images.db.transaction():  # (the store's calls below join it)
            named = images.list(self.ns, [f"target.digest=={target.digest}"])
            if named:
                return named[0]
            return images.create(self.ns, Image(dangling.name(target.digest), target, labels={}))

    def _drop_dangling(self, target: Descriptor) -> None:
        """A tagged result is no longer dangling (Docker's TagImage drops the record too)."""
        try:
            self.b.images.delete(self.ns, dangling.name(target.digest))
        except NotFound:
            pass


# -- helpers -----------------------------------------------------------------------------

def _pump(fd: int, queue: asyncio.Queue, loop, stop: threading.Event) -> None:
    """Read the RUN output FIFO until the shim closes it; lines to the queue."""
    import select

    buf = b""
    try:
        while not stop.is_set():
            select.select([fd], [], [], 0.5)
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                loop.call_soon_threadsafe(queue.put_nowait, line.decode(errors="replace"))
        if buf:
            loop.call_soon_threadsafe(queue.put_nowait, buf.decode(errors="replace"))
    finally:
        loop.call_soon_threadsafe(queue.put_nowait, None)


async def _shielded(coro) -> None:
    """Run cleanup to its end even when the build is cancelled meanwhile."""
    await asyncio.shield(asyncio.ensure_future(coro))


def _reader(mounts):
    """Read a file of the not-yet-mounted rootfs (passwd, group) from its overlay layers."""
    dirs: list[str] = []
    for m in mounts:
        if m.type == "overlay":
            upper = m.option("upperdir")
            dirs += ([upper] if upper else []) + (m.option("lowerdir") or "").split(":")
        elif m.type == "bind":
            dirs.append(m.source)

    def read(path: str) -> bytes | None:
        for d in dirs:
            p = os.path.join(d, path.lstrip("/"))
            if os.path.isfile(p):
                with open(p, "rb") as f:
                    return f.read()
        return None

    return read


def _resolve(root: Path, path: str, follow_last: bool = True) -> Path:
    """`path` inside the mounted rootfs, symlinks resolved as the container would see them."""
    parts = [p for p in path.split("/") if p and p != "."]
    current = root
    hops = 0
    i = 0
    while i < len(parts):
        part = parts[i]
        if part == "..":
            current = current.parent if current != root else root
            i += 1
            continue
        candidate = current / part
        last = i == len(parts) - 1
        if candidate.is_symlink() and (follow_last or not last):
            hops += 1
            if hops > 40:
                raise InvalidArgument(f"too many symlinks resolving {path}")
            target = os.readlink(candidate)
            rest = parts[i + 1:]
            if target.startswith("/"):
                current = root
            parts = [p for p in target.split("/") if p and p != "."] + rest
            i = 0
            continue
        current = candidate
        i += 1
    return current


def _mkdirs(root: Path, path: str, uid: int, gid: int) -> Path:
    target = _resolve(root, path)
    if not target.exists():
        missing = []
        p = target
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir(mode=0o755)
            os.lchown(d, uid, gid)
    elif not target.is_dir():
        raise InvalidArgument(f"{path} exists and is not a directory")
    return target


def _owner(spec: str, root: Path) -> tuple[int, int]:
    from runtimed.oci.process import resolve_user

    def read(p: str) -> bytes | None:
        f = _resolve(root, p)
        return f.read_bytes() if f.is_file() else None

    user, _, group = spec.partition(":")
    u = resolve_user(f"{user}:{group}" if group else user, read)
    return u.uid, (u.gid if group or not user.isdigit() else u.uid)


def _copy_paths(paths: list[Path], root: Path, dest: str, uid: int, gid: int, mode,
                included, extract: bool, keep_owner: bool = False) -> None:
    into_dir = dest.endswith("/") or len(paths) > 1
    for src in paths:
        if extract and src.is_file() and _is_archive(src):
            target = _mkdirs(root, dest, 0, 0)
            _extract(src, target)
            continue
        if src.is_dir() and not src.is_symlink():
            target = _mkdirs(root, dest, uid, gid)
            _copy_tree(src, target, uid, gid, mode, included, keep_owner)
            continue
        if into_dir:
            target_dir = _mkdirs(root, dest, uid, gid)
            target = target_dir / src.name
        else:
            resolved = _resolve(root, dest)
            if resolved.is_dir() and not resolved.is_symlink():
                target = resolved / src.name
            else:
                _mkdirs(root, os.path.dirname(dest.rstrip("/")) or "/", 0, 0)
                target = _resolve(root, dest, follow_last=False)
        _copy_one(src, target, uid, gid, mode, keep_owner)


def _copy_one(src: Path, target: Path, uid: int, gid: int, mode, keep_owner: bool) -> None:
    if target.is_dir() and not target.is_symlink() and not src.is_dir():
        shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
        if not target.is_dir():
            target.unlink()
    st = os.lstat(src)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), target)
    elif stat.S_ISDIR(st.st_mode):
        target.mkdir(exist_ok=True)
        os.chmod(target, mode if mode is not None else stat.S_IMODE(st.st_mode))
    else:
        shutil.copyfile(src, target, follow_symlinks=False)
        os.chmod(target, mode if mode is not None else stat.S_IMODE(st.st_mode))
    if keep_owner:
        os.lchown(target, st.st_uid, st.st_gid)
    else:
        os.lchown(target, uid, gid)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _copy_tree(src: Path, target: Path, uid: int, gid: int, mode, included,
               keep_owner: bool) -> None:
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        here = target if rel == "." else target / rel
        for name in list(dirnames):
            p = Path(dirpath) / name
            if not included(p):
                dirnames.remove(name)
                continue
            if p.is_symlink():
                dirnames.remove(name)
                _copy_one(p, here / name, uid, gid, mode, keep_owner)
                continue
            _copy_one(p, here / name, uid, gid, mode, keep_owner)
        for name in filenames:
            p = Path(dirpath) / name
            if included(p):
                _copy_one(p, here / name, uid, gid, mode, keep_owner)


def _is_archive(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def _extract(src: Path, target: Path) -> None:
    try:
        with tarfile.open(src) as tar:
            tar.extractall(target, filter="tar")
    except tarfile.TarError as exc:
        raise InvalidArgument(f"ADD {src.name}: cannot extract: {exc}") from None


def _healthcheck(inst: df.Instruction, shell: list[str]) -> dict:
    kind, _, rest = inst.rest.partition(" ")
    if kind.upper() == "NONE":
        return {"Test": ["NONE"]}
    rest = rest.strip()
    test = df._json_form(rest)
    out: dict = {"Test": ["CMD", *test] if test is not None else ["CMD-SHELL", rest]}
    for flag, key in (("interval", "Interval"), ("timeout", "Timeout"),
                      ("start-period", "StartPeriod"), ("start-interval", "StartInterval")):
        if inst.flag(flag):
            out[key] = _duration(inst.flag(flag), inst)
    if inst.flag("retries"):
        if not inst.flag("retries").isdigit():
            raise inst.error(f"--retries: invalid value {inst.flag('retries')!r}")
        out["Retries"] = int(inst.flag("retries"))
    return out


def _duration(text: str, inst: df.Instruction) -> int:
    import re

    total = 0.0
    units = {"ns": 1, "us": 1e3, "ms": 1e6, "s": 1e9, "m": 60e9, "h": 3600e9}
    matches = re.findall(r"(\d+(?:\.\d+)?)(ns|us|ms|s|m|h)", text)
    if not matches or "".join(a + b for a, b in matches) != text:
        raise inst.error(f"invalid duration {text!r} (e.g. 30s, 1m30s)")
    for number, unit in matches:
        total += float(number) * units[unit]
    return int(total)


def _history_text(inst: df.Instruction, env, esc) -> str:
    if inst.cmd in ("cmd", "entrypoint", "shell") and inst.json is not None:
        return f"{inst.cmd.upper()} {json.dumps(inst.json)}"
    if inst.cmd in ("cmd", "entrypoint"):
        return f"{inst.cmd.upper()} [\"/bin/sh\" \"-c\" {json.dumps(inst.rest)}]"
    return f"{inst.cmd.upper()} {inst.rest}"


def _oci_layer_type(media_type: str) -> str:
    return {mediatypes.DOCKER_LAYER_GZIP: mediatypes.OCI_LAYER_GZIP,
            mediatypes.DOCKER_LAYER: mediatypes.OCI_LAYER}.get(media_type, media_type)


def _content_resource(digest: str):
    from runtimed.metadata.leases import Resource

    return Resource(digest, "content")


def _snapshot_resource(sn, key: str):
    from runtimed.metadata.leases import Resource

    return Resource(key, f"snapshots/{sn.name}")


def _remove_quietly(sn, ns: str, key: str) -> None:
    with contextlib.suppress(NotFound):
        sn.remove(ns, key)


def _hash(*parts) -> str:
    return "sha256:" + hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()


def _short(key: str) -> str:
    return " ---> " + key.split(":")[-1][:12]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _expiry() -> str:
    from datetime import timedelta

    return (datetime.now(UTC) + timedelta(hours=24)).strftime("%Y-%m-%dT%H:%M:%SZ")

