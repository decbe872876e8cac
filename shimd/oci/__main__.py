"""Command line: runc's global flags and the commands a shim uses, parsed by hand (argparse
costs more import time than the rest of a `state` call)."""

from __future__ import annotations

import json
import os
import sys

USAGE = """usage: python3 -m shimd.oci [--root DIR] [--log FILE] [--log-format text|json] COMMAND
commands:
  create --bundle DIR [--pid-file F] [--console-socket SOCK] [--no-pivot] [--preserve-fds N] ID
  start ID | state ID | delete [--force] ID | pause ID | resume ID
  kill [--all] ID [SIGNAL]
  exec --process FILE [--pid-file F] [--detach] [--console-socket SOCK] [--tty] ID [ARGS...]
  ps [--format json|table] ID | update --resources FILE|- ID | events --stats ID
  run --bundle DIR [--pid-file F] [--console-socket SOCK] [--no-pivot] ID | list [--format json]
"""

# flag → (canonical name, takes a value)
_FLAGS = {
    "--bundle": ("bundle", True), "-b": ("bundle", True),
    "--pid-file": ("pid_file", True), "--console-socket": ("console_socket", True),
    "--no-pivot": ("no_pivot", False), "--no-new-keyring": ("no_new_keyring", False),
    "--preserve-fds": ("preserve_fds", True), "--detach": ("detach", False), "-d": ("detach", False),
    "--force": ("force", False), "-f": ("force", False), "--all": ("all", False), "-a": ("all", False),
    "--process": ("process", True), "-p": ("process", True), "--tty": ("tty", False), "-t": ("tty", False),
    "--format": ("format", True), "--resources": ("resources", True), "-r": ("resources", True),
    "--stats": ("stats", False), "--interval": ("interval", True), "--cwd": ("cwd", True),
    "--env": ("env", True), "-e": ("env", True), "--user": ("user", True), "-u": ("user", True),
}
_GLOBAL = {"--root": True, "--log": True, "--log-format": True, "--criu": True,
           "--systemd-cgroup": False, "--debug": False, "--rootless": True}


class UsageError(Exception):
    pass


def parse(argv: list[str]) -> tuple[dict, str, dict, list[str]]:
    glob: dict = {}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        name, eq, value = argv[i].partition("=")
        if name not in _GLOBAL:
            raise UsageError(f"unknown global flag {argv[i]}")
        if _GLOBAL[name] and not eq:
            i += 1
            if i >= len(argv):
                raise UsageError(f"{name} needs a value")
            value = argv[i]
        glob[name.lstrip("-")] = value if _GLOBAL[name] else True
        i += 1
    if i >= len(argv):
        raise UsageError("no command given")
    command = argv[i]
    opts: dict = {}
    positional: list[str] = []
    i += 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            positional.extend(argv[i + 1:])
            break
        if arg.startswith("-") and not positional and arg != "-":
            name, eq, value = arg.partition("=")
            if name not in _FLAGS:
                raise UsageError(f"{command}: unknown flag {arg}")
            key, takes = _FLAGS[name]
            if takes and not eq:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"{name} needs a value")
                value = argv[i]
            if key == "env":
                opts.setdefault("env", []).append(value)
            else:
                opts[key] = value if takes else value.lower() != "false" if eq else True
        else:
            positional.append(arg)
        i += 1
    return glob, command, opts, positional


def _need_id(positional: list[str], command: str) -> str:
    if not positional:
        raise UsageError(f"{command}: a container id is required")
    return positional[0]


def _read_json(path: str) -> dict:
    if path == "-":
        return json.load(sys.stdin)
    with open(path) as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--version"], ["-v"]):
        print("shimd.oci version 0.1.0\nspec: 1.0.2")
        return 0
    if argv[:1] in (["--help"], ["-h"], ["help"]):
        print(USAGE, end="")
        return 0
    glob: dict = {}
    try:
        glob, command, opts, positional = parse(argv)
        return _dispatch(glob, command, opts, positional)
    except UsageError as e:
        _report(glob, f"{e}\n{USAGE}".rstrip())
        return 2
    except Exception as e:  # noqa: BLE001 - one line for the caller, not a traceback
        if os.environ.get("SHIMD_OCI_DEBUG"):
            import traceback

            traceback.print_exc()
        _report(glob, str(e) or type(e).__name__)
        return 1


def _report(glob: dict, message: str) -> None:
    sys.stderr.write(f"shimd.oci: {message}\n")
    log = glob.get("log")
    if not log:
        return
    import time

    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if glob.get("log-format") == "json":
        line = json.dumps({"level": "error", "msg": message, "time": stamp})
    else:
        line = f'time="{stamp}" level=error msg="{message}"'
    with open(log, "a") as f:
        f.write(line + "\n")


def _dispatch(glob: dict, command: str, opts: dict, positional: list[str]) -> int:
    from shimd.oci import commands
    from shimd.oci.state import DEFAULT_ROOT, Store

    store = Store(glob.get("root") or DEFAULT_ROOT)
    if command == "list":
        states = commands.list_states(store)
        if opts.get("format") == "json":
            print(json.dumps(states))
        else:
            print("ID\tPID\tSTATUS\tBUNDLE\tCREATED\tOWNER")
            for s in states:
                print(f"{s['id']}\t{s['pid']}\t{s['status']}\t{s['bundle']}\t{s['created']}\t{s['owner']}")
        return 0
    cid = _need_id(positional, command)
    if command in ("create", "run"):
        kwargs = dict(pid_file=opts.get("pid_file"), console_socket=opts.get("console_socket"),
                      no_pivot=bool(opts.get("no_pivot")), preserve_fds=int(opts.get("preserve_fds") or 0))
        bundle = opts.get("bundle") or os.getcwd()
        if command == "run":
            return commands.run(store, cid, bundle, **kwargs)
        commands.create(store, cid, bundle, **kwargs)
    elif command == "start":
        commands.start(store, cid)
    elif command == "state":
        print(json.dumps(commands.state_json(store, cid), indent=2))
    elif command == "kill":
        sig = commands.parse_signal(positional[1] if len(positional) > 1 else "TERM")
        commands.kill(store, cid, sig, bool(opts.get("all")))
    elif command == "delete":
        commands.delete(store, cid, bool(opts.get("force")))
    elif command == "pause":
        commands.pause(store, cid)
    elif command == "resume":
        commands.resume(store, cid)
    elif command == "ps":
        pids = commands.ps(store, cid)
        if opts.get("format", "table") == "json":
            print(json.dumps(pids))
        else:
            print("PID")
            print("\n".join(str(p) for p in pids))
    elif command == "update":
        if "resources" not in opts:
            raise UsageError("update: --resources FILE (or - for stdin) is required")
        commands.update(store, cid, _read_json(opts["resources"]))
    elif command == "events":
        if not opts.get("stats"):
            raise UsageError("events: only --stats is supported")
        print(json.dumps(commands.stats(store, cid)))
    elif command == "exec":
        return commands.exec_process(store, cid, _exec_process_spec(store, cid, opts, positional),
                                     pid_file=opts.get("pid_file"), console_socket=opts.get("console_socket"),
                                     detach=bool(opts.get("detach")),
                                     preserve_fds=int(opts.get("preserve_fds") or 0))
    else:
        raise UsageError(f"unknown command {command!r}")
    return 0


def _exec_process_spec(store, cid: str, opts: dict, positional: list[str]) -> dict:
    if opts.get("process"):
        proc = _read_json(opts["process"])
    else:
        if len(positional) < 2:
            raise UsageError("exec: --process FILE or a command after the id is required")
        proc = dict(store.load(cid).config.get("process") or {})
        proc["args"] = positional[1:]
        proc["terminal"] = False
        if opts.get("cwd"):
            proc["cwd"] = opts["cwd"]
        if opts.get("env"):
            proc["env"] = list(proc.get("env") or []) + opts["env"]
        if opts.get("user"):
            uid, _, gid = opts["user"].partition(":")
            proc["user"] = {"uid": int(uid), "gid": int(gid or 0)}
    if opts.get("tty"):
        proc["terminal"] = True
    return proc


if __name__ == "__main__":
    sys.exit(main())
