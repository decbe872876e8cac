"""run, create, start, stop, restart, kill, rm, ps, logs, exec, inspect, top, stats, pause,
unpause, wait, cp, export.

With containerd's model the client owns a task's stdio. A detached container writes to a
log file that the shim appends to (`file://` stdio); a container in the foreground is
copied to the terminal through FIFOs and, unless `--rm`, also into that log file, so
`ctl logs` works for both. The file's path is kept in the container's labels.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from datetime import UTC, datetime

from ctl.client.protobuf_imports import lazy_module
from ctl.commands import (
    EXIT_DAEMON,
    client,
    describe_error,
    err,
    out,
    out_documents,
    parse_labels,
)
from ctl.format import ago, binary_size, emit, human_duration
from runtimed import logfile
from runtimed.errors import FailedPrecondition, InvalidArgument, NotFound, RuntimedError

rp = lazy_module("runtimed.restart.policy")  # exec needs none of it (~2 ms, with its dataclasses)

LABEL_PREFIX = "io.runtimed.ctl."
LABEL_LOG = LABEL_PREFIX + "log-path"
LABEL_EXIT = LABEL_PREFIX + "exit-code"
LABEL_EXITED = LABEL_PREFIX + "exited-at"
LABEL_STARTED = LABEL_PREFIX + "started-at"
LABEL_NAME = LABEL_PREFIX + "name"
LABEL_RESTART = LABEL_PREFIX + "restart"
LABEL_STOP_SIGNAL = "io.containerd.image.config.stop-signal"

EXIT_CANNOT_INVOKE = 126
EXIT_NOT_FOUND = 127


class ExitCode(Exception):
    """A container (or exec) result that becomes ctl's own exit status."""

    def __init__(self, code: int, message: str = ""):
        super().__init__(message)
        self.code = code

    @property
    def exit_code(self) -> int:
        return self.code


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_ts(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def log_dir(args) -> str:
    """`<state>/logs`: beside the daemon's socket, which lives in its state dir."""
    base = os.environ.get("RUNTIMED_LOG_DIR")
    if base:
        return base
    return os.path.join(os.path.dirname(os.path.abspath(args.address)), "logs")


def _start_error(exc: RuntimedError) -> ExitCode:
    """docker's 126/127 for a command that cannot be run or is not there."""
    text = str(exc)
    lowered = text.lower()
    if "exec" in lowered:  # runc and shimd: `exec: "x": executable file not found in $PATH`
        if "permission denied" in lowered or "is a directory" in lowered or "exec format" in lowered:
            return ExitCode(EXIT_CANNOT_INVOKE, text)
        if "not found" in lowered or "no such file" in lowered:
            return ExitCode(EXIT_NOT_FOUND, text)
    return ExitCode(EXIT_DAEMON, text)


# building a container from flags --------------------------------------------------------

def spec_options(args):
    from runtimed.oci.spec import (
        SpecOptions,
        apply_security_opts,
        parse_env_file,
        parse_memory,
        parse_mount,
        parse_tmpfs,
        parse_volume,
    )

    env = []
    for path in args.env_file:
        with open(path) as f:
            env += parse_env_file(f.read())
    for item in args.env:
        if "=" in item:
            env.append(item)
        elif item in os.environ:
            env.append(f"{item}={os.environ[item]}")
    mounts = [parse_volume(v) for v in args.volume]
    mounts += [parse_mount(m) for m in args.mount]
    mounts += [parse_tmpfs(t) for t in args.tmpfs]
    for m in mounts:
        if m.type == "bind" and not os.path.exists(m.source):
            raise InvalidArgument(f"bind source path does not exist: {m.source}")
    entrypoint = None
    if args.entrypoint is not None:
        entrypoint = [args.entrypoint] if args.entrypoint else []
    opts = SpecOptions(
        args=list(args.command) or None,
        entrypoint=entrypoint,
        env=env,
        cwd=args.workdir,
        user=args.user,
        hostname=args.hostname,
        terminal=args.tty,
        mounts=mounts,
        read_only=args.read_only,
        memory=parse_memory(args.memory) if args.memory else None,
        cpus=args.cpus,
        pids_limit=args.pids_limit,
        cap_add=args.cap_add,
        cap_drop=args.cap_drop,
        privileged=args.privileged,
        network="host" if args.network == "host" else "",
        init=args.init,
    )
    apply_security_opts(opts, args.security_opt)
    return opts


def _ensure_image(c, args):
    """The image record, pulled first when `--pull` says so."""
    from ctl.client.images import normalize

    name = args.image
    if args.pull == "always":
        return c.images.pull(name, platform=args.platform)
    try:
        return c.images.get(name)
    except NotFound:
        if args.pull == "never":
            raise NotFound(f"no such image: {name} (and --pull never)") from None
    err(f"Unable to find image '{name}' locally")
    from ctl.progress import LayerBoard

    board = LayerBoard()
    try:
        image = c.images.pull(normalize(name), platform=args.platform, progress=board.update)
    finally:
        board.close()
    return image


class _InBackground:
    """`fn()` in a thread; `result()` joins it and returns its value or raises its error."""

    def __init__(self, fn):
        import threading

        self._value = self._error = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn) -> None:
        try:
            self._value = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to result()
            self._error = exc

    def result(self, timeout: float | None = None):
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError
        if self._error is not None:
            raise self._error
        return self._value


def _create(args):
    """Create the container from run/create flags: (id, log path, container record)."""
    from ctl.commands.network import start_attach_for_run

    policy = rp.Policy.parse(args.restart)
    log_options = _log_options(args.log_opt)
    autoremove = getattr(args, "rm", False)
    if autoremove and policy.name != "no":
        raise InvalidArgument("conflicting options: --restart and --rm")
    opts = spec_options(args)
    c = client(args)
    container_id = args.name or os.urandom(32).hex()
    # the network is set up while the image is looked up and resolved (the daemon's part
    # of an attach takes longer than all that); an image error still comes first
    attaching = start_attach_for_run(c, args, container_id, opts)
    try:
        resolved = c.images.resolve(_ensure_image(c, args), args.platform)
    except BaseException:
        _detach_quietly(c, container_id, attaching)
        raise
    import ctl.client.cio  # noqa: F401 - what `run` needs next, imported while the daemon attaches

    attached = attaching.result()
    try:
        return (container_id, *_create_container(c, args, container_id, resolved, opts, policy,
                                                  autoremove, log_options))
    except BaseException:
        if attached is not None:
            from ctl.client import networks

            networks.detach(c, container_id)
        raise


def _detach_quietly(c, container_id: str, attaching) -> None:
    try:
        attached = attaching.result()
    except Exception:  # noqa: BLE001 - the first error is the one to report
        return
    if attached is not None:
        from ctl.client import networks

        try:
            networks.detach(c, container_id)
        except RuntimedError:
            pass


def _log_options(values: list[str]) -> dict:
    """`--log-opt`: path=FILE, format=cri|raw, and docker's json-file rotation options
    max-size (k/m/g, binary; unlimited by default) and max-file (default 1, only with
    max-size). Checked before anything is created."""
    options = {"path": None, "format": "", "max_size": 0, "max_file": 1}
    for opt in values:
        key, _, value = opt.partition("=")
        if key == "path":
            if not value:
                raise InvalidArgument("invalid --log-opt path=: path needs a FILE")
            options["path"] = os.path.abspath(value)
        elif key == "format" and value in ("cri", "raw"):
            options["format"] = value
        elif key == "max-size":
            from runtimed.oci.spec import parse_memory

            try:
                options["max_size"] = parse_memory(value) if value else 0
            except InvalidArgument:
                options["max_size"] = 0
            if options["max_size"] <= 0:
                raise InvalidArgument(
                    f"invalid --log-opt max-size={value!r}: a positive size like 10m (k, m or g)")
        elif key == "max-file":
            try:
                options["max_file"] = int(value)
            except ValueError:
                options["max_file"] = 0
            if options["max_file"] < 1:
                raise InvalidArgument(f"invalid --log-opt max-file={value!r}: a positive integer")
        else:
            raise InvalidArgument(f"unknown log option {opt!r}: use path=FILE, format=cri|raw, "
                                  "max-size=SIZE or max-file=N")
    return options


def _create_container(c, args, container_id: str, resolved, opts, policy, autoremove: bool,
                      log_options: dict):
    from ctl.client.containers import CreateOptions

    labels = parse_labels(args.label)
    log_path = log_options["path"]
    # ctl's own log files are stamped (logs -t, --since); a file the user names gets the
    # plain output unless format=cri asks otherwise
    log_format = log_options["format"] or ("raw" if log_path else "cri")
    if log_path is None:
        log_path = os.path.join(log_dir(args), args.namespace, f"{container_id}.log")
    labels[LABEL_LOG] = log_path
    # the URI carries the rotation options: the shim and a restart rotate too
    labels[rp.LABEL_LOG_URI] = logfile.uri(log_path, cri=log_format == "cri",
                                           max_size=log_options["max_size"],
                                           max_file=log_options["max_file"])
    if policy.name != "no":
        labels[rp.LABEL_POLICY] = str(policy)
    if autoremove and getattr(args, "detach", False):
        labels[rp.LABEL_AUTOREMOVE] = "true"  # the daemon removes it when it exits
    if args.name:
        labels[LABEL_NAME] = args.name
    stop_signal = args.stop_signal or resolved.runtime_config.stop_signal
    if stop_signal:
        labels[LABEL_STOP_SIGNAL] = stop_signal
    record = c.containers.create(
        container_id, resolved, opts,
        CreateOptions(labels=labels, snapshotter=args.snapshotter, platform=args.platform,
                      **_runtime(args.runtime)),
    )
    return log_path, record


def _runtime(value: str) -> dict:
    """docker's `--runtime runc|crun` names a binary; containerd's names have dots."""
    if "." in value:
        return {"runtime": value}
    return {"runtime_binary": value}


def create(args) -> int:
    container_id, _, _ = _create(args)
    out(container_id)
    return 0


def _open_log(path: str, container):
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    if container is not None:
        rotate = logfile.rotation(container.labels.get(rp.LABEL_LOG_URI, ""))
        if rotate is not None:
            return logfile.RotatingFile(path, *rotate)
    return open(path, "ab")


def _start_detached(c, container_id: str, container=None) -> None:
    from ctl.client.cio import Stdio

    if container is None:
        container = c.containers.get(container_id)
    log_path = container.labels.get(LABEL_LOG)
    stdio = Stdio.null()
    if log_path:
        os.makedirs(os.path.dirname(log_path), mode=0o700, exist_ok=True)
        stdio = Stdio.file(log_path)
        uri = container.labels.get(rp.LABEL_LOG_URI, "")
        if _log_query(container):  # stamped or rotated: the shim's to do
            stdio.stdout = stdio.stderr = uri
    if (container.spec.get("process") or {}).get("terminal"):  # run -dt: a pty, logged
        stdio.terminal, stdio.stderr = True, ""
    try:
        c.tasks.create(container_id, stdio, container=container)
        _mark_started(c, container_id)
        c.tasks.start(container_id)
    except RuntimedError as exc:
        _delete_task_quietly(c, container_id)
        raise _start_error(exc) from None


def _mark_started(c, container_id: str) -> None:
    """A user's start: the restart count starts over and a user's stop is forgotten.
    Before the task starts: a process that exits at once is restarted by runtimed's
    restart manager, and a later reset would undo that restart's count (one restart
    too many; tests/cli/test_restart.py under load)."""
    _start_marking(c, container_id).result()


def _start_marking(c, container_id: str):
    """`_mark_started`, sent now: `run --rm` has no restart policy to race with, so its
    labels are updated while the task starts (`result()` once Tasks.Start answered)."""
    return c.containers.start_update_labels(container_id, {
        LABEL_STARTED: _now(), LABEL_EXIT: "", LABEL_EXITED: "",
        rp.LABEL_COUNT: "0", rp.LABEL_STOPPED: "", rp.LABEL_RESTARTING: "", rp.LABEL_EXIT_CODE: "",
    })


def _mark_stopped(c, container_id: str) -> None:
    """Before a user's stop or kill: the daemon's restart manager must not undo it."""
    c.containers.update_labels(container_id, {rp.LABEL_STOPPED: "true"})


def _record_exit(c, container_id: str, code: int) -> None:
    try:
        c.containers.update_labels(container_id, {LABEL_EXIT: str(code), LABEL_EXITED: _now()})
    except NotFound:
        pass


def _delete_task_quietly(c, container_id: str) -> int | None:
    try:
        return c.tasks.delete(container_id).code
    except NotFound:
        return None
    except RuntimedError:
        return None


class Terminal:
    """The local terminal in raw mode while attached; restored on exit."""

    def __init__(self, fd: int):
        import termios

        self.fd = fd
        self.saved = termios.tcgetattr(fd)

    def raw(self) -> None:
        import tty

        tty.setraw(self.fd)

    def restore(self) -> None:
        import termios

        termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    def size(self) -> tuple[int, int]:
        size = os.get_terminal_size(self.fd)
        return size.columns, size.lines


def attach_and_wait(c, container_id: str, *, exec_args: list[str] | None = None,
                    exec_kwargs: dict | None = None, stdin: bool, tty: bool,
                    log_path: str | None, detach_keys: str, sig_proxy: bool = True,
                    cri_log: bool = False, container=None, mark_with_start: bool = False) -> int | None:
    """Create the process with FIFOs, copy its stdio, wait for it; its exit code, or None
    when the user detached. `mark_with_start`: the start labels go with Tasks.Start, not
    before it (`run --rm`: no restart policy)."""
    import threading

    from ctl.client.cio import Attachment, DetachKeys, FifoSet

    exec_id = ""
    if exec_args is not None:
        exec_id = "exec-" + os.urandom(6).hex()
    fifos = FifoSet.create(exec_id or container_id, stdin=stdin, terminal=tty)
    terminal = None
    if tty and stdin and sys.stdin.isatty():
        terminal = Terminal(sys.stdin.fileno())
    detached = threading.Event()
    tee = _open_log(log_path, container) if log_path else None
    attachment = Attachment(
        fifos,
        stdin=sys.stdin.buffer if stdin else None,
        stdout=sys.stdout.buffer,
        stderr=sys.stderr.buffer,
        tee=tee,
        tee_encode=logfile.encode if cri_log and tee is not None else None,
        on_stdin_eof=lambda: c.tasks.close_stdin(container_id, exec_id),
        stdin_filter=DetachKeys(detach_keys) if (tty and stdin) else None,
        on_detach=detached.set,
    )
    sys.stdout.flush()
    attachment.start()
    previous_handlers = {}
    try:
        try:
            if exec_args is None:
                c.tasks.create(container_id, fifos.stdio, container=container)
            else:
                c.tasks.exec(container_id, exec_id, exec_args, stdio=fifos.stdio, **(exec_kwargs or {}))
        except RuntimedError as exc:
            attachment.cancel()
            raise _start_error(exc) from None
        # TasksAPI.wait_async's Future would import concurrent.futures, and logging with it
        waiter = _InBackground(lambda: c.tasks.wait(container_id, exec_id))
        if terminal is not None:
            def resize(*_):
                try:
                    cols, rows = terminal.size()
                    c.tasks.resize(container_id, cols, rows, exec_id)
                except (OSError, RuntimedError):
                    pass

            previous_handlers[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, resize)
            resize()
            terminal.raw()
        elif sig_proxy and not tty:
            def forward(signum, _frame):
                try:
                    c.tasks.kill(container_id, signum, exec_id=exec_id)
                except RuntimedError:
                    pass

            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                        signal.SIGUSR1, signal.SIGUSR2):
                previous_handlers[sig] = signal.signal(sig, forward)
        marking = None
        try:
            if exec_args is None and mark_with_start:
                marking = _start_marking(c, container_id)
            elif exec_args is None:
                _mark_started(c, container_id)
            c.tasks.start(container_id, exec_id)
            if marking is not None:
                marking.result()
        except RuntimedError as exc:
            if marking is not None:
                marking.cancel()
            attachment.cancel()
            if exec_id:
                try:
                    c.tasks.delete_process(container_id, exec_id)
                except RuntimedError:
                    pass
            raise _start_error(exc) from None
        while True:
            if detached.is_set():
                return None
            try:
                status = waiter.result(timeout=0.2)
                break
            except TimeoutError:
                continue
        attachment.wait()
        if exec_id:
            try:
                c.tasks.delete_process(container_id, exec_id)
            except RuntimedError:
                pass
        return status.code
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        if terminal is not None:
            terminal.restore()
        attachment.close()
        if tee is not None:
            tee.close()


def _log_query(container) -> dict[str, str]:
    """The options of the container's log URI."""
    return logfile.options(container.labels.get(rp.LABEL_LOG_URI, ""))


def _has_cri_log(container) -> bool:
    return _log_query(container).get("format") == "cri"


def run(args) -> int:
    container_id, log_path, record = _create(args)
    c = client(args)
    if args.detach:
        _start_detached(c, container_id, record)
        out(container_id)
        return 0
    try:
        code = attach_and_wait(
            c, container_id, stdin=args.interactive, tty=args.tty,
            log_path=None if args.rm else log_path, detach_keys=args.detach_keys,
            sig_proxy=args.sig_proxy == "true", cri_log=_has_cri_log(record), container=record,
            mark_with_start=args.rm,
        )
    except ExitCode as exc:
        if args.rm:
            _remove_quietly(c, container_id, record)
        err(f"ctl: {exc}")
        return exc.code
    except BaseException:
        if args.rm:
            _remove_quietly(c, container_id, record)
        raise
    if code is None:
        sys.stderr.write("\r\nread escape sequence\r\n")
        return 0
    if args.rm:
        _remove_quietly(c, container_id, record)
    else:
        _delete_task_quietly(c, container_id)
        _record_exit(c, container_id, code)
    return code


def _remove_quietly(c, container_id: str, container=None) -> None:
    try:
        if container is None:
            container = c.containers.get(container_id)
        c.containers.remove(container_id, force=True, volumes=True, container=container)
        _remove_log(container)
    except NotFound:
        pass


def _remove_log(container) -> None:
    path = container.labels.get(LABEL_LOG)
    if path:  # the URI says which rotated files are ours
        logfile.remove_set(container.labels.get(rp.LABEL_LOG_URI) or logfile.uri(path, cri=False))


def _each(args, names, action) -> int:
    """Apply `action` to each container, print its name; errors reported, others go on."""
    c = client(args)
    code = 0
    for name in names:
        try:
            container_id = c.containers.resolve_id(name)
            result = action(c, container_id)
            out(str(result) if result is not None else name)
        except Exception as exc:  # noqa: BLE001
            err(f"ctl: {describe_error(exc)[0]}")
            code = 1
    return code


def start(args) -> int:
    if args.attach:
        if len(args.containers) != 1:
            raise InvalidArgument("you cannot start and attach multiple containers at once")
        c = client(args)
        container_id = c.containers.resolve_id(args.containers[0])
        _clear_stopped_task(c, container_id)
        container = c.containers.get(container_id)
        tty = bool((container.spec.get("process") or {}).get("terminal"))
        try:
            code = attach_and_wait(c, container_id, stdin=args.interactive, tty=tty,
                                   log_path=container.labels.get(LABEL_LOG), detach_keys="ctrl-p,ctrl-q",
                                   cri_log=_has_cri_log(container), container=container)
        except ExitCode as exc:
            err(f"ctl: {exc}")
            return exc.code
        if code is None:
            return 0
        _delete_task_quietly(c, container_id)
        _record_exit(c, container_id, code)
        return code

    def action(c, container_id):
        try:
            task = c.tasks.get(container_id)
        except NotFound:
            task = None
        if task is not None and task.status in ("RUNNING", "PAUSED"):
            return None
        _clear_stopped_task(c, container_id)
        _start_detached(c, container_id)
        return None

    return _each(args, args.containers, action)


def _clear_stopped_task(c, container_id: str) -> None:
    try:
        task = c.tasks.get(container_id)
    except NotFound:
        return
    if task.status in ("RUNNING", "PAUSED", "PAUSING"):
        raise FailedPrecondition(f"container {container_id} is already running")
    code = _delete_task_quietly(c, container_id)
    if code is not None and task.status == "STOPPED":
        _record_exit(c, container_id, code)


def stop_container(c, container_id: str, timeout: int | None, sig: str | None) -> None:
    _mark_stopped(c, container_id)
    try:
        task = c.tasks.get(container_id)
    except NotFound:
        return
    if task.status in ("RUNNING", "PAUSED", "PAUSING", "CREATED"):
        container = c.containers.get(container_id)
        first = sig or container.labels.get(LABEL_STOP_SIGNAL) or "SIGTERM"
        waiter = c.tasks.wait_async(container_id)
        if task.status == "PAUSED":
            c.tasks.resume(container_id)
        grace = 10 if timeout is None else timeout
        try:
            if grace != 0:
                c.tasks.kill(container_id, first)
            waiter.result(timeout=grace if grace > 0 else None) if grace != 0 else None
        except TimeoutError:
            pass
        except NotFound:
            return
        if not waiter.done():
            try:
                c.tasks.kill(container_id, signal.SIGKILL, all=True)
            except NotFound:
                pass
            waiter.result(timeout=30)
    code = _delete_task_quietly(c, container_id)
    if code is not None:
        _record_exit(c, container_id, code)


def stop(args) -> int:
    return _each(args, args.containers, lambda c, i: stop_container(c, i, args.time, args.signal))


def restart(args) -> int:
    def action(c, container_id):
        stop_container(c, container_id, args.time, args.signal)
        _start_detached(c, container_id)

    return _each(args, args.containers, action)


def kill(args) -> int:
    def action(c, container_id):
        try:
            task = c.tasks.get(container_id)
        except NotFound:
            raise FailedPrecondition(f"container {container_id} is not running") from None
        if task.status not in ("RUNNING", "PAUSED", "CREATED"):
            raise FailedPrecondition(f"container {container_id} is not running")
        _mark_stopped(c, container_id)
        c.tasks.kill(container_id, args.signal)

    return _each(args, args.containers, action)


def rm(args) -> int:
    def action(c, container_id):
        container = c.containers.get(container_id)
        try:
            task = c.tasks.get(container_id)
        except NotFound:
            task = None
        if task is not None and task.status in ("RUNNING", "PAUSED", "PAUSING") and not args.force:
            raise FailedPrecondition(
                f"cannot remove container {container_id}: it is {task.status.lower()}; "
                "stop it first or use rm -f"
            )
        c.containers.remove(container_id, force=True, volumes=args.volumes)
        _remove_log(container)

    return _each(args, args.containers, action)


# ps / inspect -----------------------------------------------------------------------------

def _status(container, task) -> tuple[str, str]:
    """(docker state, STATUS column text)."""
    labels = container.labels
    started = max(filter(None, (_parse_ts(labels.get(LABEL_STARTED)),
                                _parse_ts(labels.get(rp.LABEL_STARTED_AT)))), default=None)
    if task is not None and task.status in ("RUNNING", "PAUSED", "PAUSING"):
        up = f"Up {human_duration((datetime.now(UTC) - started).total_seconds())}" if started else "Up"
        if task.status != "RUNNING":
            return "paused", up + " (Paused)"
        return "running", up
    if labels.get(rp.LABEL_RESTARTING) == "true" and (task is None or task.status == "STOPPED"):
        code = labels.get(rp.LABEL_EXIT_CODE, "")
        return "restarting", f"Restarting ({code}) {ago(_parse_ts(labels.get(rp.LABEL_EXITED_AT)))}".rstrip()
    if task is not None and task.status == "STOPPED":
        return "exited", f"Exited ({task.exit_status}) {ago(task.exited_at)}".rstrip()
    if task is not None and task.status == "CREATED":
        return "created", "Created"
    if labels.get(LABEL_EXIT):
        return "exited", f"Exited ({labels[LABEL_EXIT]}) {ago(_parse_ts(labels.get(LABEL_EXITED)))}".rstrip()
    if labels.get(rp.LABEL_EXIT_CODE):  # exited while the daemon's restart manager had it
        exited = ago(_parse_ts(labels.get(rp.LABEL_EXITED_AT)))
        return "exited", f"Exited ({labels[rp.LABEL_EXIT_CODE]}) {exited}".rstrip()
    return "created", "Created"


def _container_filters(items: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    server, local = [], {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise InvalidArgument(f"invalid filter {item!r}: use KEY=VALUE")
        if key == "label":
            k, _, v = value.partition("=")
            server.append(f'labels."{k}"=="{v}"' if v else f'labels."{k}"')
        elif key in ("status", "name", "id", "ancestor", "exited"):
            local.setdefault(key, []).append(value)
        else:
            raise InvalidArgument(f"invalid filter {key!r}: use status, name, id, label, ancestor or exited")
    return server, local


def container_rows(c, filters: list[str], include_all: bool, no_trunc: bool = False) -> list[dict]:
    from ctl.client.images import familiar
    from runtimed.oci.spec import command_line

    server, local = _container_filters(filters)
    containers = c.containers.list(server)
    tasks = {t.id: t for t in c.tasks.list()}
    rows = []
    for ct in containers:
        state, status = _status(ct, tasks.get(ct.id))
        if "status" in local:
            if state not in local["status"]:
                continue
        elif not include_all and state not in ("running", "paused", "restarting"):
            continue
        name = ct.labels.get(LABEL_NAME, ct.id)
        if "name" in local and not any(n in name for n in local["name"]):
            continue
        if "id" in local and not any(ct.id.startswith(i) for i in local["id"]):
            continue
        if "ancestor" in local and not any(
            familiar(ct.image) in (a, familiar(a)) or ct.image == a for a in local["ancestor"]
        ):
            continue
        command = command_line(ct.spec)
        if not no_trunc and len(command) > 20:
            command = command[:19] + "…"
        task = tasks.get(ct.id)
        exit_code = ct.labels.get(LABEL_EXIT, "")
        if task is not None and task.status == "STOPPED":
            exit_code = str(task.exit_status)
        if "exited" in local and exit_code not in local["exited"]:
            continue
        rows.append({
            "ID": ct.id if no_trunc else ct.id[:12],
            "Image": familiar(ct.image),
            "Command": f'"{command}"',
            "CreatedAt": ct.created_at.isoformat() if ct.created_at else "",
            "RunningFor": ago(ct.created_at),
            "Status": status,
            "State": state,
            "Ports": "",
            "Names": name,
            "Labels": ct.labels,
            "Pid": task.pid if task else 0,
            "_created": ct.created_at.timestamp() if ct.created_at else 0,
        })
    rows.sort(key=lambda r: r["_created"], reverse=True)
    for r in rows:
        del r["_created"]
    return rows


def ps(args) -> int:
    rows = container_rows(client(args), args.filter, args.all or args.latest, args.no_trunc)
    if args.latest:
        rows = rows[:1]
    out(emit(rows, [("CONTAINER ID", "ID"), ("IMAGE", "Image"), ("COMMAND", "Command"),
                    ("CREATED", "RunningFor"), ("STATUS", "Status"), ("PORTS", "Ports"),
                    ("NAMES", "Names")], args.format, "ID", args.quiet))
    return 0


def inspect_container(c, container_id: str) -> dict:
    container = c.containers.get(container_id)
    try:
        task = c.tasks.get(container_id)
    except NotFound:
        task = None
    from runtimed.oci.spec import INIT_PATH

    state, _ = _status(container, task)
    process = container.spec.get("process") or {}
    exit_code = int(container.labels.get(LABEL_EXIT) or container.labels.get(rp.LABEL_EXIT_CODE) or 0)
    if task is not None and task.status == "STOPPED":
        exit_code = task.exit_status
    return {
        "Id": container.id,
        "Name": "/" + container.labels.get(LABEL_NAME, container.id),
        "Created": container.created_at.isoformat() if container.created_at else "",
        "Path": (process.get("args") or [""])[0],
        "Args": (process.get("args") or [])[1:],
        "State": {
            "Status": state,
            "Running": state in ("running", "paused"),
            "Paused": state == "paused",
            "Restarting": state == "restarting",
            "Pid": task.pid if task and state in ("running", "paused") else 0,
            "ExitCode": exit_code,
            "StartedAt": container.labels.get(LABEL_STARTED, ""),
            "FinishedAt": container.labels.get(LABEL_EXITED, ""),
        },
        "Image": container.image,
        "LogPath": container.labels.get(LABEL_LOG, ""),
        "RestartCount": rp.restart_count(container.labels),
        "HostConfig": {
            "RestartPolicy": {"Name": rp.policy_of(container.labels).name,
                              "MaximumRetryCount": rp.policy_of(container.labels).max_retries},
            "AutoRemove": rp.autoremove(container.labels),
            "Init": ((process.get("args") or [""])[0] == INIT_PATH),
            # docker's shape; Config is the log URI's options (format, max-size in bytes, max-file)
            "LogConfig": {"Type": "file", "Config": _log_query(container)},
        },
        "Runtime": container.runtime,
        "Snapshotter": container.snapshotter,
        "SnapshotKey": container.snapshot_key,
        "Config": {
            "Hostname": container.spec.get("hostname", ""),
            "User": f"{(process.get('user') or {}).get('uid', 0)}:{(process.get('user') or {}).get('gid', 0)}",
            "Tty": bool(process.get("terminal")),
            "Env": process.get("env") or [],
            "Cmd": process.get("args") or [],
            "WorkingDir": process.get("cwd", "/"),
            "Image": container.image,
            "Labels": container.labels,
        },
        "Mounts": [
            {"Type": m.get("type"), "Source": m.get("source"), "Destination": m.get("destination"),
             "RW": "ro" not in (m.get("options") or [])}
            for m in container.spec.get("mounts") or [] if m.get("type") in ("bind", "tmpfs")
            and m.get("destination") not in ("/dev", "/dev/shm")
        ],
        "Spec": container.spec,
    }


def inspect(args) -> int:
    from ctl.commands.images import inspect_image

    c = client(args)
    docs, code = [], 0
    for name in args.names:
        try:
            if args.type == "image":
                docs.append(inspect_image(c, name))
                continue
            try:
                docs.append(inspect_container(c, c.containers.resolve_id(name)))
            except NotFound:
                if args.type == "container":
                    raise
                docs.append(inspect_image(c, name))
        except Exception as exc:  # noqa: BLE001
            message = describe_error(exc)[0]
            if isinstance(exc, NotFound):
                message = f"no such object: {name}"
            err(f"ctl: {message}")
            code = 1
    out_documents(docs, args.format)
    return code


# logs -------------------------------------------------------------------------------------

def logs(args) -> int:
    c = client(args)
    container_id = c.containers.resolve_id(args.container)
    container = c.containers.get(container_id)
    path = container.labels.get(LABEL_LOG)
    if not path:
        raise FailedPrecondition(f"container {container_id} has no log: it was not created by ctl")
    tail = None
    if args.tail != "all":
        try:
            tail = int(args.tail)
        except ValueError:
            raise InvalidArgument(f"invalid --tail {args.tail!r}: a number or 'all'") from None
    if _has_cri_log(container):
        return _cri_logs(c, container_id, path, args, tail)
    if args.timestamps or args.since or args.until:
        raise InvalidArgument(
            "--timestamps/--since/--until: this container's log holds raw output without "
            "timestamps (--log-opt path=FILE without format=cri, or created before ctl stamped logs)"
        )
    from ctl.client.logs import Follower, open_set

    files = open_set(path)
    follower = Follower(path, files) if args.follow else None
    data = b""
    for f in files:
        data += f.read()
        if follower is None or f is not follower.file:
            f.close()
    if tail is not None:
        lines = data.splitlines(keepends=True)
        data = b"".join(lines[-tail:]) if tail > 0 else b""
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    if follower is None:
        return 0
    try:
        while True:
            chunk = follower.read()
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
                continue
            if not _task_running(c, container_id):
                sys.stdout.buffer.write(follower.read())
                sys.stdout.buffer.flush()
                return 0
            time.sleep(0.2)
    finally:
        follower.close()


def _task_running(c, container_id: str) -> bool:
    try:
        return c.tasks.get(container_id).status in ("RUNNING", "PAUSED", "PAUSING", "CREATED")
    except NotFound:
        return False


def _cri_logs(c, container_id: str, path: str, args, tail: int | None) -> int:
    """Lines from a CRI-format log and its rotated files: stdout and stderr to ours, `-t`
    puts the time first. --since/--until select lines by their stamp (--until's inclusive,
    as docker's), before --tail counts them; with -f, following stops at --until."""
    from ctl.client.logs import Decoder, Follower, open_set, since, timestamp

    start = since(args.since) if args.since else b""
    until = since(args.until, flag="--until") if args.until else b""
    decoder = Decoder()
    outputs = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}

    def selected(lines) -> tuple[list, bool]:
        """The lines in [start, until]; True once no more can come: a line was past `until`
        and no line still open began before it. A line has its first record's stamp but
        comes when it ends, so a stdout line begun (P) before an stderr line may come after
        it: every line is looked at, none is taken for the end of the selection."""
        if not start and not until:
            return lines if isinstance(lines, list) else list(lines), False
        kept, past = [], False
        for line in lines:
            if until and line.timestamp > until:
                past = True
            elif line.timestamp >= start:
                kept.append(line)
        return kept, past and not decoder.open_since(until)

    def emit(lines) -> None:
        for line in lines:
            out = outputs.get(line.stream, sys.stdout.buffer)
            if args.timestamps:
                out.write(line.timestamp + b" ")
            out.write(line.data)
        for out in outputs.values():
            out.flush()

    files = open_set(path)
    follower = Follower(path, files) if args.follow else None
    lines = []
    for f in files:
        lines += decoder.feed(f.read())
        if follower is None or f is not follower.file:
            f.close()
    if follower is None:
        lines += decoder.flush()
    lines, past = selected(lines)
    if tail is not None:
        lines = lines[-tail:] if tail > 0 else []
    emit(lines)
    if follower is None or past:
        if follower is not None:
            follower.close()
        return 0
    try:
        while True:
            chunk = follower.read()
            if chunk:
                lines, past = selected(decoder.feed(chunk))
                emit(lines)
                if past:
                    return 0
                continue
            ended = not _task_running(c, container_id)
            if ended or (until and timestamp(time.time_ns()) > until):
                lines, _ = selected([*decoder.feed(follower.read()), *(decoder.flush() if ended else ())])
                emit(lines)
                return 0
            time.sleep(0.2)
    finally:
        follower.close()


# exec ---------------------------------------------------------------------------------------

def _task_or_none(c, container_id: str, asked=None):
    """The task of the container, or None; `asked`: a `tasks.start_get` already sent."""
    try:
        return (asked or c.tasks.start_get(container_id)).result()
    except NotFound:
        return None


def exec_(args) -> int:
    if not args.command:
        raise InvalidArgument("exec needs a command to run")
    c = client(args)
    # the task is asked for while the container is looked up: one round trip instead of
    # two when the name is the full id, as it usually is
    named_task = c.tasks.start_get(args.container)
    try:
        container = c.containers.resolve(args.container)
    except BaseException:
        named_task.cancel()
        raise
    container_id = container.id
    if container_id == args.container:
        task = _task_or_none(c, container_id, named_task)
    else:
        named_task.cancel()
        task = _task_or_none(c, container_id)
    if task is None or task.status != "RUNNING":
        state = "paused" if task is not None and task.status == "PAUSED" else "not running"
        raise FailedPrecondition(f"container {container_id} is {state}")
    env = []
    for item in args.env:
        if "=" in item:
            env.append(item)
        elif item in os.environ:
            env.append(f"{item}={os.environ[item]}")
    kwargs = {"env": env, "cwd": args.workdir, "user": args.user, "container": container}
    if args.detach:
        from ctl.client.cio import Stdio

        exec_id = "exec-" + os.urandom(6).hex()
        try:
            c.tasks.exec(container_id, exec_id, list(args.command), stdio=Stdio.null(), **kwargs)
            c.tasks.start(container_id, exec_id)
        except RuntimedError as exc:
            raise _start_error(exc) from None
        return 0
    try:
        code = attach_and_wait(
            c, container_id, exec_args=list(args.command), exec_kwargs=kwargs,
            stdin=args.interactive, tty=args.tty, log_path=None, detach_keys=args.detach_keys,
        )
    except ExitCode as exc:
        err(f"ctl: {exc}")
        return exc.code
    return 0 if code is None else code


# top / stats / pause / wait ---------------------------------------------------------------

def _proc_row(pid: int, boot: float, hz: int) -> list[str] | None:
    import pwd

    try:
        stat = open(f"/proc/{pid}/stat").read()
        status = open(f"/proc/{pid}/status").read()
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").strip().decode(errors="replace")
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    ppid = fields[1]
    cpu_seconds = (int(fields[11]) + int(fields[12])) // hz
    start = boot + int(fields[19]) / hz
    uid = next((line.split()[1] for line in status.splitlines() if line.startswith("Uid:")), "0")
    try:
        user = pwd.getpwuid(int(uid)).pw_name
    except KeyError:
        user = uid
    if not cmdline:
        cmdline = "[" + stat[stat.index("(") + 1:stat.rindex(")")] + "]"
    stime = time.strftime("%H:%M", time.localtime(start))
    cpu = f"{cpu_seconds // 3600:02d}:{cpu_seconds // 60 % 60:02d}:{cpu_seconds % 60:02d}"
    return [user, str(pid), ppid, "0", stime, "?", cpu, cmdline]


def top(args) -> int:
    from ctl.format import table

    c = client(args)
    container_id = c.containers.resolve_id(args.container)
    try:
        pids = c.tasks.pids(container_id)
    except NotFound:
        raise FailedPrecondition(f"container {container_id} is not running") from None
    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    rows = [r for r in (_proc_row(p, boot, hz) for p in sorted(pids)) if r]
    out(table(["UID", "PID", "PPID", "C", "STIME", "TTY", "TIME", "CMD"], rows))
    return 0


def _stats_rows(c, ids: list[str], names: dict[str, str], previous: dict, interval: float) -> list[dict]:
    stats = {s.container_id: s for s in c.tasks.metrics(ids)} if ids else {}
    rows = []
    for container_id in ids:
        s = stats.get(container_id)
        if s is None:
            continue
        prev = previous.get(container_id)
        cpu = 0.0
        if prev is not None and interval > 0:
            cpu = (s.cpu_usage_ns - prev.cpu_usage_ns) / (interval * 1e9) * 100
        previous[container_id] = s
        limit = s.memory_limit if 0 < s.memory_limit < (1 << 62) else _host_memory()
        rows.append({
            "ID": container_id[:12], "Container": container_id, "Name": names.get(container_id, container_id),
            "CPUPerc": f"{max(cpu, 0):.2f}%",
            "MemUsage": f"{binary_size(s.memory_usage)} / {binary_size(limit)}",
            "MemPerc": f"{(s.memory_usage / limit * 100) if limit else 0:.2f}%",
            "PIDs": str(s.pids),
        })
    return rows


def _host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0


def stats(args) -> int:
    c = client(args)
    tasks = {t.id: t for t in c.tasks.list()}
    if args.containers:
        ids = [c.containers.resolve_id(n) for n in args.containers]
    else:
        ids = [t for t, p in tasks.items() if p.status in ("RUNNING", "PAUSED") or args.all]
    names = {}
    for ct in c.containers.list():
        names[ct.id] = ct.labels.get(LABEL_NAME, ct.id[:12])
    columns = [("CONTAINER ID", "ID"), ("NAME", "Name"), ("CPU %", "CPUPerc"),
               ("MEM USAGE / LIMIT", "MemUsage"), ("MEM %", "MemPerc"), ("PIDS", "PIDs")]
    live = [i for i in ids if i in tasks]
    previous: dict = {}
    _stats_rows(c, live, names, previous, 0)
    interval = 0.5 if args.no_stream else 1.0
    while True:
        time.sleep(interval)
        rows = _stats_rows(c, live, names, previous, interval)
        text = emit(rows, columns, args.format)
        if args.no_stream:
            out(text)
            return 0
        if sys.stdout.isatty():
            sys.stdout.write("\x1b[2J\x1b[H")
        out(text)


def pause(args) -> int:
    return _each(args, args.containers, lambda c, i: c.tasks.pause(i))


def unpause(args) -> int:
    return _each(args, args.containers, lambda c, i: c.tasks.resume(i))


def wait(args) -> int:
    def action(c, container_id):
        try:
            return c.tasks.wait(container_id).code
        except NotFound:
            label = c.containers.get(container_id).labels.get(LABEL_EXIT)
            if label:
                return int(label)
            raise FailedPrecondition(f"container {container_id} has not been started") from None

    return _each(args, args.containers, action)


# cp / export ------------------------------------------------------------------------------

def _split_target(text: str) -> tuple[str | None, str]:
    if ":" in text and not text.startswith(("/", ".")):
        name, _, path = text.partition(":")
        return name, path
    return None, text


def _exec_capture(c, container_id: str, argv: list[str], stdin_data: bytes | None = None) -> tuple[int, bytes, bytes]:
    """Run a command in the container, feeding `stdin_data`, collecting its output."""
    import tempfile

    from ctl.client.cio import Attachment, FifoSet

    exec_id = "cp-" + os.urandom(6).hex()
    fifos = FifoSet.create(exec_id, stdin=stdin_data is not None)
    with tempfile.TemporaryFile() as i, tempfile.TemporaryFile() as o, tempfile.TemporaryFile() as e:
        i.write(stdin_data or b"")
        i.seek(0)
        attachment = Attachment(
            fifos, stdin=i if stdin_data is not None else None, stdout=o, stderr=e,
            on_stdin_eof=lambda: c.tasks.close_stdin(container_id, exec_id),
        )
        attachment.start()
        try:
            c.tasks.exec(container_id, exec_id, argv, stdio=fifos.stdio)
            waiter = c.tasks.wait_async(container_id, exec_id)
            c.tasks.start(container_id, exec_id)
            status = waiter.result(timeout=300)
            attachment.wait(None)  # all of it: a truncated tar is a corrupt copy
            try:
                c.tasks.delete_process(container_id, exec_id)
            except RuntimedError:
                pass
        except BaseException:
            attachment.cancel()
            raise
        finally:
            attachment.close()
        o.seek(0)
        e.seek(0)
        return status.code, o.read(), e.read()


def _running(c, container_id: str) -> None:
    try:
        task = c.tasks.get(container_id)
    except NotFound:
        task = None
    if task is None or task.status != "RUNNING":
        raise FailedPrecondition(f"container {container_id} is not running: cp and export need a running container")


def _first_line(data: bytes) -> str:
    lines = data.decode(errors="replace").strip().splitlines()
    return lines[0] if lines else "no error output"


def cp(args) -> int:
    import io
    import shutil
    import tempfile

    from runtimed.tarsafe import tarfile

    src_ctr, src = _split_target(args.source)
    dst_ctr, dst = _split_target(args.destination)
    if (src_ctr is None) == (dst_ctr is None):
        raise InvalidArgument("copying between containers or between host paths is not supported: "
                              "one side must be CONTAINER:PATH")
    c = client(args)
    if src_ctr is not None:
        container_id = c.containers.resolve_id(src_ctr)
        _running(c, container_id)
        parent, base = os.path.split(src.rstrip("/") or "/")
        code, data, errors = _exec_capture(c, container_id, ["tar", "cf", "-", "-C", parent or "/", base or "."])
        if code != 0:
            raise NotFound(f"could not copy {src} from {container_id}: {_first_line(errors)}")
        with tempfile.TemporaryDirectory() as tmp:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                tar.extractall(tmp, filter="tar")
            produced = os.path.join(tmp, base)
            target = dst
            if os.path.isdir(dst):
                target = os.path.join(dst, base)
            if os.path.isdir(produced) and not os.path.islink(produced):
                shutil.copytree(produced, target, symlinks=True, dirs_exist_ok=True)
            else:
                shutil.copy2(produced, target, follow_symlinks=False)
        return 0
    container_id = c.containers.resolve_id(dst_ctr)
    _running(c, container_id)
    if not os.path.lexists(src):
        raise NotFound(f"could not find the file {src} on the host")
    code, _, _ = _exec_capture(c, container_id, ["test", "-d", dst])
    if code == 0:
        directory, name = dst, os.path.basename(os.path.normpath(src))
    else:
        directory, name = os.path.split(dst.rstrip("/"))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(src, arcname=name)
    code, _, errors = _exec_capture(c, container_id, ["tar", "xf", "-", "-C", directory or "/"], buffer.getvalue())
    if code != 0:
        raise FailedPrecondition(f"could not copy to {container_id}:{dst}: {_first_line(errors)}")
    return 0


def export(args) -> int:
    if args.output is None and sys.stdout.isatty():
        raise InvalidArgument("cowardly refusing to write an archive to a terminal: use -o FILE or redirect")
    c = client(args)
    container_id = c.containers.resolve_id(args.container)
    _running(c, container_id)
    code, listing, errors = _exec_capture(c, container_id, ["ls", "-A", "/"])
    if code != 0:
        raise FailedPrecondition(f"export of {container_id} failed: {_first_line(errors)}")
    # the kernel's file systems are not part of the container's file system
    entries = [f"./{e}" for e in listing.decode().split() if e not in ("proc", "sys", "dev")]
    code, data, errors = _exec_capture(c, container_id, ["tar", "cf", "-", "-C", "/", *entries])
    if code != 0:
        raise FailedPrecondition(f"export of {container_id} failed: {_first_line(errors)}")
    if args.output:
        with open(args.output, "wb") as f:
            f.write(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    return 0
