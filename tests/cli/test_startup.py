"""What a ctl command costs at start and on the wire: the modules it imports and the RPCs
it makes (ctl's cold start is benchmarked against ctr's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ctl.client import Client
from runtimed.errors import InvalidArgument
from tests.cli.conftest import REPO

# runs ctl's main in this interpreter, then writes the modules it imported (the pure-Python
# protobuf modules only if they were executed) and the RPC paths it called to argv[1]
_PROBE = """
import sys, types
import ctl.client.wire as wire
calls, events = [], []
_call = wire.Channel.call
def call(self, path, *args, **kwargs):
    calls.append(path)
    events.append("sent " + path.rsplit(".", 1)[-1])
    started = _call(self, path, *args, **kwargs)
    started.probe_path = path
    return started
wire.Channel.call = call
_iter = wire._Call.__iter__
def iterate(self):
    try:
        yield from _iter(self)
    finally:
        events.append("answered " + self.probe_path.rsplit(".", 1)[-1])
wire._Call.__iter__ = iterate
from ctl.__main__ import main
try:
    code = main(sys.argv[2:])
finally:
    loaded = [name for name, m in list(sys.modules.items()) if type(m) is types.ModuleType]
    import json
    with open(sys.argv[1], "w") as f:
        json.dump({"modules": loaded, "calls": calls, "events": events}, f)
sys.exit(code)
"""


def _probe(tmp_path, address: str, *args: str) -> dict:
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, str(report), "--address", address, *args],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    data["stdout"] = result.stdout
    data["methods"] = [path.rsplit(".", 1)[-1] for path in data["calls"]]  # Tasks/Get
    return data


def _python(code: str) -> str:
    """What a fresh interpreter running `code` prints (it must succeed)."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_protobuf_python_implementation_is_not_loaded():
    """Under upb the generated modules still import python_message (and text_format, the
    Python decoders...); ctl registers them lazily, and they still work when used."""
    code = (
        "import sys, types\n"
        "import ctl.client.rpc\n"
        "from google.protobuf.internal import api_implementation\n"
        "from runtimed.api.containerd.services.tasks.v1 import tasks_pb2\n"
        "m = tasks_pb2.CreateTaskRequest(container_id='c1', stdout='/x')\n"
        "assert tasks_pb2.CreateTaskRequest.FromString(m.SerializeToString()) == m\n"
        "lazy = [n for n in ('google.protobuf.internal.python_message', 'google.protobuf.text_format')"
        " if type(sys.modules.get(n)) is not types.ModuleType]\n"
        "print(api_implementation.Type(), sorted(lazy))\n"
        "from google.protobuf import text_format\n"
        "print(text_format.MessageToString(m, as_one_line=True))\n"
    )
    output = _python(code)
    implementation, _, rest = output.splitlines()[0].partition(" ")
    if implementation == "upb":
        assert rest == "['google.protobuf.internal.python_message', 'google.protobuf.text_format']"
    assert output.splitlines()[1] == 'container_id: "c1" stdout: "/x"'


def test_version_imports_no_formatting(tmp_path, daemon):
    data = _probe(tmp_path, daemon.address, "version")
    assert "Server:" in data["stdout"]
    heavy = {"ctl.format", "json", "dataclasses", "google.protobuf.text_format", "hashlib"}
    assert heavy.isdisjoint(data["modules"])
    assert data["methods"] == ["Version/Version"]


def test_run_rm_rpcs(tmp_path, daemon, ctl, busybox):
    """run --rm: Tasks.Create reuses the mounts Snapshots.Prepare answered, and the exited
    task is deleted without asking for its state first."""
    data = _probe(tmp_path, daemon.address, "run", "--rm", "--network", "none", "--pull", "never",
                  "busybox", "echo", "hello")
    assert data["stdout"] == "hello\n"
    methods = data["methods"]
    assert "Snapshots/Mounts" not in methods and "Tasks/Get" not in methods
    assert "Snapshots/Stat" not in methods  # Prepare says when the image is not unpacked
    events = data["events"]  # no restart policy with --rm: the start labels go with the start
    assert events.index("sent Tasks/Start") < events.index("answered Containers/Update")
    assert methods.index("Snapshots/Prepare") < methods.index("Tasks/Create")
    assert methods[-3:] == ["Tasks/Delete", "Containers/Delete", "Snapshots/Remove"]
    assert "hashlib" not in data["modules"]  # a one-layer image has no chain ID to hash
    assert {"inspect", "calendar"}.isdisjoint(data["modules"])  # deferred (DEFERRED_IMPORTS)
    assert ctl("ps", "-a", "-q").stdout == ""


def test_deferred_imports_still_work_when_used():
    """ctl imports dataclasses and protobuf's well-known types with stand-ins for inspect
    and calendar; what needs them still gets the real modules: a class without a docstring
    is documented by dataclasses, Timestamp.FromDatetime converts."""
    code = (
        "import sys, datetime\n"
        "import ctl.__main__ as m\n"
        "sys.meta_path.insert(0, m._DeferringFinder())\n"
        "import dataclasses\n"
        "from google.protobuf import timestamp_pb2\n"
        "assert 'inspect' not in sys.modules and 'calendar' not in sys.modules\n"
        "@dataclasses.dataclass\n"
        "class Point:\n"
        "    x: int\n"
        "    y: int = 0\n"
        "stamp = timestamp_pb2.Timestamp()\n"
        "stamp.FromDatetime(datetime.datetime(2020, 1, 1))\n"
        "print(Point.__doc__, stamp.seconds, type(sys.modules['inspect']).__name__,\n"
        "      type(sys.modules['calendar']).__name__)\n"
    )
    assert _python(code).split() == ["Point(x:", "int,", "y:", "int", "=", "0)", "1577836800",
                                     "module", "module"]


def test_exec_rpcs(tmp_path, daemon, ctl, busybox):
    ctl("run", "-d", "--name", "ex1", "--network", "none", "busybox", "sleep", "1000")
    data = _probe(tmp_path, daemon.address, "exec", "ex1", "echo", "hi")
    assert data["stdout"] == "hi\n"
    methods = data["methods"]  # the task's state is asked for alongside the container's
    assert sorted(methods[:2]) == ["Containers/Get", "Tasks/Get"]
    assert methods[2] == "Tasks/Exec" and methods[-1] == "Tasks/DeleteProcess"
    assert sorted(methods[3:-1]) == ["Tasks/Start", "Tasks/Wait"]
    assert "runtimed.restart.policy" not in data["modules"]  # loaded on first use (lazy_module)
    assert "ctl.client.monitor" not in data["modules"]  # Event and Stats: ctl.client.types' lazily
    assert "runtimed.oci.spec" not in data["modules"]  # exec's process: runtimed.oci.process
    ctl("rm", "-f", "ex1")


def test_platform_matching_only_for_an_index(tmp_path, daemon, ctl, test_images):
    """A one-manifest image resolves without the platform module; an index still picks this
    host's manifest (or the one --platform names), and a bad --platform is still refused."""
    mp = test_images["multiplatform"]
    ctl("load", "-q", "-i", mp.archive)
    ctl("load", "-q", "-i", test_images["busybox"].archive)
    arch = "arm64" if os.uname().machine in ("aarch64", "arm64") else "amd64"
    with Client(daemon.address) as c:
        assert c.images.resolve(mp.name).config["architecture"] == arch
        assert c.images.resolve(mp.name, "linux/arm64").config["architecture"] == "arm64"
        with pytest.raises(InvalidArgument):
            c.images.resolve(test_images["busybox"].name, "linux//")
    data = _probe(tmp_path, daemon.address, "run", "--rm", "--network", "none", "--pull", "never",
                  "busybox", "true")
    assert "runtimed.images.platforms" not in data["modules"]
    data = _probe(tmp_path, daemon.address, "run", "--rm", "--network", "none", "--pull", "never",
                  mp.name, "echo", "hi")
    assert "runtimed.images.platforms" in data["modules"] and data["stdout"] == "hi\n"


def test_library_run_creates_the_task_from_the_record(daemon, busybox, monkeypatch):
    """`Client.run` hands the record `containers.create` returned to `tasks.create`: no
    Containers.Get, no Snapshots.Mounts before Tasks.Create."""
    import ctl.client.wire as wire
    from ctl.client import SpecOptions

    calls = []
    real = wire.Channel.call

    def call(self, path, *args, **kwargs):
        calls.append(path.rsplit(".", 1)[-1])
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(wire.Channel, "call", call)
    with Client(daemon.address) as c:
        with c.run("rec1", "busybox", SpecOptions(args=["sh", "-c", "echo ok"])) as box:
            assert box.wait(timeout=30).code == 0 and box.output() == b"ok\n"
        assert c.containers.list() == []
    created = calls.index("Tasks/Create")
    assert "Containers/Get" not in calls[:created] and "Snapshots/Mounts" not in calls


# a subprocess that runs ctl as the program (main() without argv) with something left for
# the interpreter's teardown to do: a module-level object whose finalizer prints
_AS_PROGRAM = """
import sys
class Finalized:
    def __del__(self):
        print("torn down", flush=True)
kept = Finalized()
SETUP
sys.argv = ["ctl", "--address", "/nonexistent/runtimed.sock", "version"]
from ctl.__main__ import main
sys.exit(main())
"""


def _as_program(setup: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _AS_PROGRAM.replace("SETUP", setup)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def test_the_program_ends_without_the_interpreter_teardown():
    """ctl as a program ends with os._exit once its output is flushed (the teardown costs
    ~10 ms): same status and messages, no finalizer run."""
    result = _as_program()
    assert result.returncode == 125
    assert result.stderr.startswith("ctl: cannot connect to runtimed at /nonexistent/runtimed.sock")
    assert "torn down" not in result.stdout


def test_the_program_exits_as_usual_when_something_is_left_to_run():
    """An atexit callback or a thread that is not a daemon still runs: ctl then leaves the
    exit to the interpreter."""
    result = _as_program("import atexit; atexit.register(lambda: print('at exit', flush=True))")
    assert result.returncode == 125 and "at exit" in result.stdout and "torn down" in result.stdout
    thread = ("import threading, time\n"
              "threading.Thread(target=lambda: (time.sleep(0.5), print('thread done', flush=True))).start()")
    result = _as_program(thread)
    assert result.returncode == 125 and "thread done" in result.stdout


def test_the_program_starts_without_garbage_collections():
    """Start-up makes many objects and little garbage: the collector's threshold is raised
    for the program (25 collections in a `ctl run` at the default)."""
    setup = ("import gc, ctl.__main__\n"  # collections from here on are main()'s
             "gc.callbacks.append(lambda phase, info: phase == 'start' and print('collected', flush=True))")
    result = _as_program(setup)
    assert result.returncode == 125 and "collected" not in result.stdout


def test_message_classes_built_on_first_use_are_protobufs_own():
    """With LAZY_MESSAGES (the ctl program) a generated module builds a message class when
    it is first asked for: the class protobuf's builder makes, the one GetMessageClass and
    nested fields use; enums are there at once; a missing name is an AttributeError."""
    code = (
        "from ctl.client import protobuf_imports\n"
        "protobuf_imports.LAZY_MESSAGES = True\n"
        "import ctl.client.rpc\n"
        "from google.protobuf import message_factory\n"
        "from runtimed.api.containerd.services.tasks.v1 import tasks_pb2\n"
        "from runtimed.api.containerd.types.task import task_pb2\n"
        "print(sorted(n for n in ('WaitRequest', 'UpdateTaskRequest') if n in vars(tasks_pb2)))\n"
        "print(task_pb2.RUNNING, task_pb2.Status.Name(3))\n"
        "from runtimed.api.containerd.services.tasks.v1.tasks_pb2 import UpdateTaskRequest\n"
        "m = UpdateTaskRequest(container_id='c1', annotations={'a': 'b'})\n"
        "assert tasks_pb2.UpdateTaskRequest.FromString(m.SerializeToString()) == m\n"
        "des = tasks_pb2.DESCRIPTOR.message_types_by_name\n"
        "assert message_factory.GetMessageClass(des['UpdateTaskRequest']) is UpdateTaskRequest\n"
        "wait = message_factory.GetMessageClass(des['WaitResponse'])\n"
        "assert tasks_pb2.WaitResponse is wait\n"
        "response = tasks_pb2.GetResponse.FromString(tasks_pb2.GetResponse(\n"
        "    process=task_pb2.Process(pid=7, status=task_pb2.RUNNING)).SerializeToString())\n"
        "assert type(response.process) is task_pb2.Process and response.process.pid == 7\n"
        "try:\n"
        "    tasks_pb2.NoSuchMessage\n"
        "except AttributeError as exc:\n"
        "    print(exc)\n"
    )
    assert _python(code).splitlines() == [
        "[]", "2 STOPPED",
        "module 'runtimed.api.containerd.services.tasks.v1.tasks_pb2' has no attribute 'NoSuchMessage'",
    ]


def test_run_unpacks_an_image_whose_snapshot_is_gone(tmp_path, daemon, ctl, busybox):
    """Snapshots.Prepare is tried first; a NotFound for the image's snapshot unpacks the
    image, and the container is prepared again."""
    with Client(daemon.address) as c:
        chain_id = c.images.resolve(busybox).chain_id
        snaps = c._stub("snapshots")
        snaps.Remove(snaps.pb.RemoveSnapshotRequest(snapshotter="overlayfs", key=chain_id))
        assert not c.images.is_unpacked(c.images.resolve(busybox), "overlayfs")
    data = _probe(tmp_path, daemon.address, "run", "--rm", "--network", "none", "--pull", "never",
                  "busybox", "echo", "again")
    assert data["stdout"] == "again\n"
    methods = data["methods"]
    first = methods.index("Snapshots/Prepare")
    assert methods[first + 1] == "Snapshots/Stat" and "Diff/Apply" in methods
    assert methods.count("Snapshots/Prepare") == 3  # the container's, the layer's, the container's
    with Client(daemon.address) as c:
        assert c.images.is_unpacked(c.images.resolve(busybox), "overlayfs")
    assert ctl("ps", "-a", "-q").stdout == ""


def test_exec_by_prefix_and_of_a_missing_container(tmp_path, daemon, ctl, busybox):
    """The task asked for ahead of the container lookup is given up when the name is a
    prefix (asked again by the full id) and when the container does not exist."""
    ctl("run", "-d", "--name", "prefix-target", "--network", "none", "busybox", "sleep", "1000")
    data = _probe(tmp_path, daemon.address, "exec", "prefix-tar", "echo", "by", "prefix")
    assert data["stdout"] == "by prefix\n"
    assert data["methods"].count("Tasks/Get") == 2 and "Containers/List" in data["methods"]
    result = ctl("exec", "no-such-container", "true", check=False)
    assert result.returncode == 125
    assert result.stderr == "ctl: no such container: no-such-container\n"
    ctl("rm", "-f", "prefix-target")


def test_a_missing_image_is_reported_before_a_bad_publish_flag(ctl, busybox):
    """The network is asked for before the image is looked up; a bad -p still comes after
    the image's error, and alone it is the error reported."""
    result = ctl("run", "--rm", "--pull", "never", "-p", "1:2:3:4", "no-such-image:1", "true", check=False)
    assert result.returncode == 125 and "no such image: no-such-image:1" in result.stderr
    result = ctl("run", "--rm", "--pull", "never", "-p", "1:2:3:4", "busybox", "true", check=False)
    assert result.returncode == 125 and "invalid host IP '1:2'" in result.stderr
    assert ctl("ps", "-a", "-q").stdout == ""


def test_a_run_with_a_restart_policy_labels_before_it_starts(tmp_path, daemon, ctl, busybox):
    """Without --rm the start labels are answered before Tasks.Start is sent: the daemon's
    restart manager must not see the task exit before its count was reset."""
    data = _probe(tmp_path, daemon.address, "run", "--name", "labelled", "--network", "none",
                  "--restart", "on-failure:1", "busybox", "true")
    events = data["events"]
    assert events.index("answered Containers/Update") < events.index("sent Tasks/Start")
    ctl("rm", "-f", "labelled")
