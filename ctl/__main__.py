"""`ctl`: the docker-like command line for runtimed.

Start-up is kept short: this module imports only argparse; a command's module (and grpc with
it) is imported when that command runs, so `ctl --help` never pays for gRPC or pyroute2.
Exit codes follow docker: 125 for a daemon or usage error, 126 when the command cannot be
invoked, 127 when it is not found, otherwise the container's own status.
"""

from __future__ import annotations

import argparse
import os
import sys
import types

EXIT_DAEMON = 125
EXIT_CANNOT_INVOKE = 126
EXIT_NOT_FOUND = 127

DEFAULT_ADDRESS = "/run/runtimed/runtimed.sock"


class UsageError(Exception):
    pass


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's, measuring the terminal once: argparse makes a formatter for every
    add_argument, and each measured it (and imported shutil) again."""

    columns: int | None = None

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        if width is None:
            if _HelpFormatter.columns is None:
                _HelpFormatter.columns = _terminal_columns()
            width = _HelpFormatter.columns - 2
        super().__init__(prog, indent_increment, max_help_position, width)


def _terminal_columns() -> int:
    """shutil.get_terminal_size().columns, without importing shutil (and bz2, lzma)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error exits 125 with one line, as docker does."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}\nSee '{self.prog} --help'.")


class _Skipped:
    """Stands in for a command's parser that this invocation does not need: every call on
    it is a no-op, so `build_parser` reads the same whether it builds one command or all."""

    def __getattr__(self, name):
        return lambda *a, **k: self


_SKIPPED = _Skipped()


class _OnlySubparsers:
    """The top-level subparsers action, filtered to the one command being run."""

    def __init__(self, action, wanted: str):
        self._action = action
        self.wanted = wanted
        self.found = False

    def add_parser(self, name: str, aliases: list[str] = (), **kw):
        if self.wanted != name and self.wanted not in aliases:
            return _SKIPPED
        self.found = True
        return self._action.add_parser(name, aliases=aliases, **kw)


def _add(sub, name: str, handler: str, help: str, aliases: tuple[str, ...] = (),
         add_help: bool = True) -> Parser:
    p = sub.add_parser(name, help=help, description=help, aliases=list(aliases), add_help=add_help)
    p.set_defaults(handler=handler)
    if not add_help:  # -h is docker's --hostname here
        p.add_argument("--help", action="help", help="show this help message and exit")
    return p


def _format_flag(p: Parser) -> None:
    p.add_argument("--format", dest="format", default=None,
                   help="'json', 'table', or a Go-like template such as '{{.ID}}'")


def _run_flags(p: Parser) -> None:
    """The flags `run` and `create` share (docker's names)."""
    a = p.add_argument
    a("-i", "--interactive", action="store_true", help="keep stdin open")
    a("-t", "--tty", action="store_true", help="allocate a pseudo-terminal")
    a("--name", help="container name (its id)")
    a("-e", "--env", action="append", default=[], help="set an environment variable")
    a("--env-file", action="append", default=[], help="read environment variables from a file")
    a("-v", "--volume", action="append", default=[],
      help="/HOST:/DEST[:ro] bind, NAME:/DEST[:ro] named volume, /DEST anonymous volume")
    a("--mount", action="append", default=[], help="type=bind|volume|tmpfs,source=,target=[,readonly]")
    a("--tmpfs", action="append", default=[], help="mount a tmpfs: PATH[:OPTIONS]")
    a("-p", "--publish", action="append", default=[], help="publish a port [IP:]HOST:CONTAINER[/udp]")
    a("--network", "--net", default="default", help="default, host, none, container:ID or a network name")
    a("-h", "--hostname", help="container host name")
    a("-u", "--user", help="user name or uid[:gid]")
    a("-w", "--workdir", help="working directory inside the container")
    a("--entrypoint", help="override the image's entrypoint")
    a("--read-only", action="store_true", help="mount the root filesystem read-only")
    a("-m", "--memory", help="memory limit (e.g. 64m)")
    a("--cpus", type=float, help="number of CPUs")
    a("--pids-limit", type=int, help="maximum number of processes")
    a("--cap-add", action="append", default=[], help="add a capability")
    a("--cap-drop", action="append", default=[], help="drop a capability")
    a("--privileged", action="store_true", help="all capabilities, no seccomp, no masked paths")
    a("--security-opt", action="append", default=[],
      help="seccomp=unconfined|PROFILE.json, no-new-privileges[=false]")
    a("-l", "--label", action="append", default=[], help="set a label KEY=VALUE")
    a("--init", action="store_true", help="run tini as PID 1 (reaps zombies, forwards signals)")
    a("--restart", default="no", help="no, always, unless-stopped or on-failure[:N]")
    a("--log-opt", action="append", default=[], help="log option: path=FILE, format=cri|raw, max-size=10m, max-file=3")
    a("--pull", choices=["missing", "always", "never"], default="missing", help="pull the image")
    a("--platform", help="platform of the image (os/arch[/variant])")
    a("--runtime", default=os.environ.get("CTL_RUNTIME") or "io.containerd.runc.v2",
      help="containerd runtime name, or an OCI runtime binary (runc, crun); env CTL_RUNTIME")
    a("--snapshotter", default="overlayfs", help="snapshotter for the root filesystem")
    a("--stop-signal", help="signal to stop the container")
    a("--detach-keys", default="ctrl-p,ctrl-q", help="keys that detach from the container")
    a("image", help="image reference")
    a("command", nargs=argparse.REMAINDER, help="command and arguments")


def build_parser(only: str | None = None) -> Parser:
    """The whole command line, or with `only` the top-level command of that name alone (a
    command's parser costs ~1 ms to build and one run needs one). Returns None when `only`
    is no command."""
    parser = Parser(prog="ctl", description="A docker-like command line for runtimed.")
    parser.add_argument("--address", "-a", default=None,
                        help=f"runtimed socket (env RUNTIMED_ADDRESS, default {DEFAULT_ADDRESS})")
    parser.add_argument("--namespace", "-n", default=None,
                        help="containerd namespace (env RUNTIMED_NAMESPACE, default 'default')")
    parser.add_argument("--debug", "-D", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    if only is not None:
        sub = _OnlySubparsers(sub, only)

    # containers ------------------------------------------------------------------------
    p = _add(sub, "run", "containers:run", "create and run a container", add_help=False)
    p.add_argument("-d", "--detach", action="store_true", help="run in the background, print its id")
    p.add_argument("--rm", action="store_true", help="remove the container when it exits")
    p.add_argument("--sig-proxy", default="true", choices=["true", "false"], help="forward signals")
    _run_flags(p)
    p = _add(sub, "create", "containers:create", "create a container without starting it",
             add_help=False)
    _run_flags(p)
    p = _add(sub, "start", "containers:start", "start stopped containers")
    p.add_argument("-a", "--attach", action="store_true", help="attach stdout/stderr and wait")
    p.add_argument("-i", "--interactive", action="store_true", help="attach stdin")
    p.add_argument("containers", nargs="+")
    for name, help in (("stop", "stop containers (signal, then SIGKILL after a grace period)"),
                       ("restart", "restart containers")):
        p = _add(sub, name, f"containers:{name}", help)
        p.add_argument("-t", "--time", type=int, default=None, help="seconds before SIGKILL (default 10)")
        p.add_argument("-s", "--signal", help="signal to send first")
        p.add_argument("containers", nargs="+")
    p = _add(sub, "kill", "containers:kill", "send a signal to containers")
    p.add_argument("-s", "--signal", default="KILL")
    p.add_argument("containers", nargs="+")
    p = _add(sub, "rm", "containers:rm", "remove containers", aliases=("container-rm",))
    p.add_argument("-f", "--force", action="store_true", help="kill a running container first")
    p.add_argument("-v", "--volumes", action="store_true", help="remove anonymous volumes too")
    p.add_argument("containers", nargs="+")
    p = _add(sub, "ps", "containers:ps", "list containers")
    p.add_argument("-a", "--all", action="store_true", help="include stopped containers")
    p.add_argument("-q", "--quiet", action="store_true", help="only ids")
    p.add_argument("--filter", action="append", default=[], help="status=, name=, label=, ancestor=, id=")
    p.add_argument("--no-trunc", action="store_true")
    p.add_argument("-l", "--latest", action="store_true", help="only the latest created")
    _format_flag(p)
    p = _add(sub, "logs", "containers:logs", "show a container's output")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--tail", default="all", help="lines from the end")
    p.add_argument("-t", "--timestamps", action="store_true", help="show each line's time")
    p.add_argument("--since", help="only lines after a time (RFC 3339, Unix time, or 10m ago)")
    p.add_argument("--until", help="only lines before a time (RFC 3339, Unix time, or 10m ago)")
    p.add_argument("container")
    p = _add(sub, "exec", "containers:exec_", "run a command in a running container")
    for flag, kw in ((("-i", "--interactive"), {"action": "store_true"}),
                     (("-t", "--tty"), {"action": "store_true"}),
                     (("-d", "--detach"), {"action": "store_true"}),
                     (("-e", "--env"), {"action": "append", "default": []}),
                     (("-u", "--user"), {}), (("-w", "--workdir"), {}),
                     (("--detach-keys",), {"default": "ctrl-p,ctrl-q"})):
        p.add_argument(*flag, **kw)
    p.add_argument("container")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p = _add(sub, "inspect", "containers:inspect", "low-level information on containers or images")
    p.add_argument("--type", choices=["container", "image"])
    _format_flag(p)
    p.add_argument("names", nargs="+")
    p = _add(sub, "top", "containers:top", "processes of a container")
    p.add_argument("container")
    p = _add(sub, "stats", "containers:stats", "live resource usage of containers")
    p.add_argument("--no-stream", action="store_true")
    p.add_argument("-a", "--all", action="store_true")
    _format_flag(p)
    p.add_argument("containers", nargs="*")
    for name, help in (("pause", "freeze all processes of containers"),
                       ("unpause", "thaw paused containers"),
                       ("wait", "block until containers stop, print their exit codes")):
        p = _add(sub, name, f"containers:{name}", help)
        p.add_argument("containers", nargs="+")
    p = _add(sub, "cp", "containers:cp", "copy files between a container and the host")
    p.add_argument("source")
    p.add_argument("destination")

    # images ----------------------------------------------------------------------------
    p = _add(sub, "images", "images:ls", "list images")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("-a", "--all", action="store_true")
    p.add_argument("--digests", action="store_true")
    p.add_argument("--no-trunc", action="store_true")
    p.add_argument("--filter", action="append", default=[], help="reference=, label=")
    _format_flag(p)
    p.add_argument("reference", nargs="?")
    image = _add(sub, "image", "system:group", "manage images")
    isub = image.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", parser_class=Parser)
    p = _add(isub, "ls", "images:ls", "list images", aliases=("list",))
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("-a", "--all", action="store_true")
    p.add_argument("--digests", action="store_true")
    p.add_argument("--no-trunc", action="store_true")
    p.add_argument("--filter", action="append", default=[])
    _format_flag(p)
    p.add_argument("reference", nargs="?")
    p = _add(isub, "inspect", "images:inspect", "low-level information on images")
    _format_flag(p)
    p.add_argument("names", nargs="+")
    for parent in (sub, isub):
        p = _add(parent, "rmi" if parent is sub else "rm", "images:rm", "remove images")
        p.add_argument("-f", "--force", action="store_true")
        p.add_argument("images", nargs="+")
        p = _add(parent, "tag", "images:tag", "give an image another name")
        p.add_argument("source")
        p.add_argument("target")
        p = _add(parent, "history", "images:history", "the layers of an image")
        p.add_argument("-q", "--quiet", action="store_true")
        p.add_argument("--no-trunc", action="store_true")
        _format_flag(p)
        p.add_argument("image")
        p = _add(parent, "load", "images:load", "load images from a tar archive")
        p.add_argument("-i", "--input", help="read from this file instead of stdin")
        p.add_argument("-q", "--quiet", action="store_true")
        p.add_argument("--platform")
        p.add_argument("--all-platforms", action="store_true")
        p = _add(parent, "import", "images:import_", "import an image archive (OCI or docker-archive)")
        p.add_argument("file", help="archive path, or - for stdin")
        p.add_argument("reference", nargs="?", help="name for an archive without one")
        p.add_argument("-q", "--quiet", action="store_true")
        p.add_argument("--platform")
        p.add_argument("--all-platforms", action="store_true")
        p = _add(parent, "save", "images:save", "write images to a tar archive")
        p.add_argument("-o", "--output", help="write to this file instead of stdout")
        p.add_argument("--platform")
        p.add_argument("--all-platforms", action="store_true")
        p.add_argument("images", nargs="+")
        p = _add(parent, "pull", "images:pull", "pull an image from a registry")
        p.add_argument("--platform")
        p.add_argument("-a", "--all-platforms", action="store_true")
        p.add_argument("-q", "--quiet", action="store_true")
        p.add_argument("--insecure-registry", action="store_true", help="allow plain HTTP")
        p.add_argument("image")
        p = _add(parent, "push", "images:push", "push an image to a registry")
        p.add_argument("--platform")
        p.add_argument("-q", "--quiet", action="store_true")
        p.add_argument("--insecure-registry", action="store_true", help="allow plain HTTP")
        p.add_argument("image")
    p = _add(sub, "export", "containers:export", "write a container's filesystem as a tar")
    p.add_argument("-o", "--output")
    p.add_argument("container")
    p = _add(sub, "login", "images:login", "store credentials for a registry")
    p.add_argument("-u", "--username")
    p.add_argument("-p", "--password")
    p.add_argument("--password-stdin", action="store_true")
    p.add_argument("server", nargs="?", default="docker.io")
    p = _add(sub, "logout", "images:logout", "remove stored credentials for a registry")
    p.add_argument("server", nargs="?", default="docker.io")

    _network_commands(sub)
    p = _add(sub, "build", "build:build", "build an image from a Dockerfile")
    p.add_argument("-t", "--tag", action="append", default=[], help="name the image (repeatable)")
    p.add_argument("-f", "--file", help="the Dockerfile (default CONTEXT/Dockerfile; - for stdin)")
    p.add_argument("--build-arg", action="append", default=[], help="set a build ARG: KEY=VALUE")
    p.add_argument("--target", help="build up to this stage")
    p.add_argument("--no-cache", action="store_true", help="do not reuse cached steps")
    p.add_argument("--label", action="append", default=[], help="set an image label KEY=VALUE")
    p.add_argument("--platform", help="this host's platform only")
    p.add_argument("--network", help="network of RUN steps: none (default) or host")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the image id")
    p.add_argument("context", help="the context directory (- : Dockerfile on stdin, no context)")

    # volumes ---------------------------------------------------------------------------
    vol = _add(sub, "volume", "system:group", "manage volumes")
    vsub = vol.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", parser_class=Parser)
    p = _add(vsub, "create", "volumes:create", "create a volume")
    p.add_argument("-d", "--driver", default="local")
    p.add_argument("--label", action="append", default=[])
    p.add_argument("name", nargs="?")
    p = _add(vsub, "ls", "volumes:ls", "list volumes", aliases=("list",))
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("-f", "--filter", action="append", default=[], help="name=, driver=, label=")
    _format_flag(p)
    p = _add(vsub, "inspect", "volumes:inspect", "low-level information on volumes")
    _format_flag(p)
    p.add_argument("names", nargs="+")
    p = _add(vsub, "rm", "volumes:rm", "remove volumes", aliases=("remove",))
    p.add_argument("-f", "--force", action="store_true", help="even while a container uses it")
    p.add_argument("names", nargs="+")
    p = _add(vsub, "prune", "volumes:prune", "remove volumes no container uses")
    p.add_argument("-a", "--all", action="store_true", help="named volumes too, not only anonymous")
    p.add_argument("-f", "--force", action="store_true", help="do not prompt")
    p.add_argument("--filter", action="append", default=[])

    # system ----------------------------------------------------------------------------
    p = _add(sub, "version", "system:version", "client and server versions")
    _format_flag(p)
    p = _add(sub, "info", "system:info", "daemon-wide information")
    _format_flag(p)
    p = _add(sub, "events", "system:events", "stream events from the daemon")
    p.add_argument("--filter", action="append", default=[],
                   help="type=, event=, container=, image=, namespace=, or a containerd filter")
    p.add_argument("--since", help="only events after this time")
    p.add_argument("--until", help="stop at this time (or after this duration)")
    _format_flag(p)
    system = _add(sub, "system", "system:group", "manage the daemon")
    ssub = system.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", parser_class=Parser)
    p = _add(ssub, "info", "system:info", "daemon-wide information")
    _format_flag(p)
    p = _add(ssub, "df", "system:df", "disk usage")
    p.add_argument("-v", "--verbose", action="store_true")
    _format_flag(p)
    p = _add(ssub, "prune", "system:prune", "remove stopped containers (and unused images with -a)")
    p.add_argument("-a", "--all", action="store_true")
    p.add_argument("-f", "--force", action="store_true", help="do not prompt")
    p = _add(ssub, "events", "system:events", "stream events from the daemon")
    p.add_argument("--filter", action="append", default=[])
    p.add_argument("--since")
    p.add_argument("--until")
    _format_flag(p)
    ns = _add(sub, "namespace", "system:group", "manage containerd namespaces", aliases=("ns",))
    nsub = ns.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", parser_class=Parser)
    p = _add(nsub, "ls", "system:ns_ls", "list namespaces", aliases=("list",))
    p.add_argument("-q", "--quiet", action="store_true")
    _format_flag(p)
    p = _add(nsub, "create", "system:ns_create", "create a namespace")
    p.add_argument("name")
    p.add_argument("labels", nargs="*", help="KEY=VALUE")
    p = _add(nsub, "rm", "system:ns_rm", "remove empty namespaces", aliases=("remove",))
    p.add_argument("names", nargs="+")
    p = _add(nsub, "label", "system:ns_label", "set or clear (KEY=) labels of a namespace")
    p.add_argument("name")
    p.add_argument("labels", nargs="+", help="KEY=VALUE")
    p = _add(sub, "completion", "system:completion", "print a shell completion script")
    p.add_argument("shell", choices=["bash", "zsh"], nargs="?", default="bash")
    if only is not None and not sub.found:
        return None
    return parser


_GLOBAL_VALUE_FLAGS = ("--address", "-a", "--namespace", "-n")
# commands that need every command's parser: completion lists them all
_NEEDS_ALL = ("completion",)


def _command_word(argv: list[str]) -> str | None:
    """The command named in argv (the first word after the global options), or None."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in _GLOBAL_VALUE_FLAGS:
            i += 2
        elif word.startswith("-"):
            if word in ("-h", "--help", "--"):
                return None
            i += 1
        else:
            return word
    return None


def _parser_for(argv: list[str]) -> Parser:
    word = _command_word(argv)
    if word is not None and word not in _NEEDS_ALL:
        parser = build_parser(only=word)
        if parser is not None:
            return parser
    return build_parser()


def _network_commands(sub) -> None:
    net = _add(sub, "network", "system:group", "manage networks")
    nsub = net.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", parser_class=Parser)
    p = _add(nsub, "ls", "network:ls", "list networks", aliases=("list",))
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--no-trunc", action="store_true")
    p.add_argument("-f", "--filter", action="append", default=[], help="name==, driver==, labels.KEY==")
    _format_flag(p)
    p = _add(nsub, "create", "network:create", "create a bridge network")
    p.add_argument("-d", "--driver", default="bridge")
    p.add_argument("--subnet", help="e.g. 10.10.0.0/24 (default: one free on this host)")
    p.add_argument("--gateway", help="default: the subnet's first address")
    p.add_argument("--label", action="append", default=[], help="KEY=VALUE")
    p.add_argument("name")
    p = _add(nsub, "inspect", "network:inspect", "low-level information on networks")
    _format_flag(p)
    p.add_argument("names", nargs="+")
    p = _add(nsub, "rm", "network:rm", "remove networks", aliases=("remove",))
    p.add_argument("names", nargs="+")
    p = _add(nsub, "connect", "network:connect", "connect a container to a network")
    p.add_argument("--alias", action="append", default=[], help="another name on this network")
    p.add_argument("--ip", help="a fixed IPv4 address")
    p.add_argument("network")
    p.add_argument("container")
    p = _add(nsub, "disconnect", "network:disconnect", "disconnect a container from a network")
    p.add_argument("network")
    p.add_argument("container")
    p = _add(nsub, "attachment", "network:attachment", "a container's netns, interfaces and ports")
    _format_flag(p)
    p.add_argument("container")


# Modules ctl imports that import another only for functions a command seldom calls; that
# one is imported on its first use instead: dataclasses → inspect (a docstring for a class
# without one; inspect brings ast, dis and tokenize: ~6 ms, a sixth of a short command),
# protobuf's well-known types → calendar (Timestamp.FromDatetime; with locale, ~3 ms).
DEFERRED_IMPORTS = {
    "dataclasses": "inspect",
    "google.protobuf.internal.well_known_types": "calendar",
}


class _OnFirstUse(types.ModuleType):
    """Holds a deferred module's place; the first attribute asked imports the real one."""

    def __getattr__(self, attribute):
        import importlib

        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), attribute)


class _DeferringFinder:
    """A meta path finder for the modules of DEFERRED_IMPORTS: each is imported as usual,
    while an `_OnFirstUse` stands in for the module it defers."""

    def find_spec(self, name, path=None, target=None):
        deferred = DEFERRED_IMPORTS.get(name)
        if deferred is None or deferred in sys.modules:
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None:
            spec.loader = _WithStandIn(spec.loader, deferred)
        return spec


class _WithStandIn:
    def __init__(self, loader, deferred: str):
        self.loader = loader
        self.deferred = deferred

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        stand_in = sys.modules[self.deferred] = _OnFirstUse(self.deferred)
        try:
            self.loader.exec_module(module)
        finally:
            if sys.modules.get(self.deferred) is stand_in:
                del sys.modules[self.deferred]


def _start_lean() -> None:
    """What a command's process imports is trimmed: DEFERRED_IMPORTS, and argparse's
    messages skip gettext (ctl speaks English only; gettext imports locale and looks for
    catalogs on every message: 3 ms of a 40 ms start)."""
    argparse._ = str
    if not any(isinstance(finder, _DeferringFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _DeferringFinder())


def _load(handler: str):
    import importlib

    module, func = handler.split(":")
    return getattr(importlib.import_module(f"ctl.commands.{module}"), func)


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` and return its exit status. Without `argv` this is the
    program itself (the console script, `python -m ctl`): it runs sys.argv and ends the
    process at once (`_exit_now`)."""
    if argv is None:
        import gc

        # a `ctl run` makes ~18,000 objects the collector tracks (modules, classes,
        # functions, descriptors), nearly none of them garbage: the default threshold (700)
        # ran 25 collections, 4-8 ms of its CPU; a long-running command still collects
        gc.set_threshold(50_000)
        from ctl.client import protobuf_imports

        protobuf_imports.LAZY_MESSAGES = True
        return _exit_now(_main(sys.argv[1:]))
    return _main(argv)


def _exit_now(code: int) -> int:
    """End the process with `code` once stdout and stderr are flushed, skipping the
    interpreter's teardown: freeing ~300 modules and protobuf's descriptor pools takes
    10-14 ms, a tenth of a `ctl run --rm`, and a short-lived command has nothing to tear
    down. Every file ctl writes is closed by then (`with` blocks, `finally`). Returns
    `code` for the usual exit instead when something is still to run at exit: an atexit
    callback, a thread that is not a daemon, or a flush that failed (the interpreter then
    reports it as it always does)."""
    import atexit

    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return code
    threading = sys.modules.get("threading")  # no threads were started without it
    if atexit._ncallbacks() or threading is not None and any(
            not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return code
    os._exit(code)


def _main(argv: list[str]) -> int:
    _start_lean()
    parser = _parser_for(argv)
    debug = "--debug" in argv or "-D" in argv
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_DAEMON
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    args.address = args.address or os.environ.get("RUNTIMED_ADDRESS") or DEFAULT_ADDRESS
    args.namespace = (args.namespace or os.environ.get("RUNTIMED_NAMESPACE")
                      or os.environ.get("CONTAINERD_NAMESPACE") or "default")
    args.parser = parser
    try:
        return _load(args.handler)(args) or 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # noqa: BLE001 - one clear line, traceback only with --debug
        from ctl.commands import describe_error

        if debug:
            import traceback

            traceback.print_exc()
        message, code = describe_error(exc)
        print(f"ctl: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
