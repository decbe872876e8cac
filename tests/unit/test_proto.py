"""The proto contract: our .proto files are wire-compatible with containerd 1.6.

Three layers of proof, strongest last:
- the generated runtimed/api is not stale, and lives inside our package;
- spot checks of service/method shapes and field numbers against a table taken from
  containerd 1.6, so a wrong contract fails with a readable message;
- containerd's own reference .proto files (Debian's golang-github-containerd-containerd-dev
  and -cgroups-dev) compiled with protoc at test time, and every file, message, enum and
  service of ours compared with them field by field;
- the real `ctr` talking to servicers built on our generated modules.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, timestamp_pb2

REPO = Path(__file__).resolve().parents[2]
API_DIR = REPO / "runtimed" / "api"
PROTO_DIR = REPO / "proto"
GOCODE = Path("/usr/share/gocode/src")

# containerd's wire contract is every containerd-path .proto we ship; none may be missing.
OUR_CONTAINERD_PROTOS = sorted(
    p.relative_to(PROTO_DIR).as_posix() for p in (PROTO_DIR / "github.com").rglob("*.proto")
)
EXPECTED_FILES = {
    *(
        f"github.com/containerd/containerd/api/{name}.proto"
        for name in [
            "types/mount", "types/descriptor", "types/platform", "types/metrics",
            "types/task/task", "events/container", "events/content", "events/image",
            "events/namespace", "events/snapshot", "events/task",
            "services/version/v1/version", "services/introspection/v1/introspection",
            "services/namespaces/v1/namespace", "services/containers/v1/containers",
            "services/images/v1/images", "services/content/v1/content",
            "services/snapshots/v1/snapshots", "services/diff/v1/diff",
            "services/leases/v1/leases", "services/tasks/v1/tasks",
            "services/events/v1/events",
        ]
    ),
    "github.com/containerd/containerd/runtime/v2/runc/options/oci.proto",
    "github.com/containerd/cgroups/stats/v1/metrics.proto",
    "github.com/containerd/cgroups/v2/stats/metrics.proto",
}

U, S, B = "unary", "server-stream", "bidi"
# Service -> [(method, shape)], from containerd 1.6's api/services/*/v1/*.proto.
SERVICES = {
    "containerd.services.version.v1.Version": [("Version", U)],
    "containerd.services.introspection.v1.Introspection": [("Plugins", U), ("Server", U)],
    "containerd.services.namespaces.v1.Namespaces": [
        ("Get", U), ("List", U), ("Create", U), ("Update", U), ("Delete", U),
    ],
    "containerd.services.containers.v1.Containers": [
        ("Get", U), ("List", U), ("ListStream", S), ("Create", U), ("Update", U), ("Delete", U),
    ],
    "containerd.services.images.v1.Images": [
        ("Get", U), ("List", U), ("Create", U), ("Update", U), ("Delete", U),
    ],
    "containerd.services.content.v1.Content": [
        ("Info", U), ("Update", U), ("List", S), ("Delete", U), ("Read", S), ("Status", U),
        ("ListStatuses", U), ("Write", B), ("Abort", U),
    ],
    "containerd.services.snapshots.v1.Snapshots": [
        ("Prepare", U), ("View", U), ("Mounts", U), ("Commit", U), ("Remove", U), ("Stat", U),
        ("Update", U), ("List", S), ("Usage", U), ("Cleanup", U),
    ],
    "containerd.services.diff.v1.Diff": [("Apply", U), ("Diff", U)],
    "containerd.services.leases.v1.Leases": [
        ("Create", U), ("Delete", U), ("List", U), ("AddResource", U), ("DeleteResource", U),
        ("ListResources", U),
    ],
    "containerd.services.tasks.v1.Tasks": [
        ("Create", U), ("Start", U), ("Delete", U), ("DeleteProcess", U), ("Get", U),
        ("List", U), ("Kill", U), ("Exec", U), ("ResizePty", U), ("CloseIO", U), ("Pause", U),
        ("Resume", U), ("ListPids", U), ("Checkpoint", U), ("Update", U), ("Metrics", U),
        ("Wait", U),
    ],
    "containerd.services.events.v1.Events": [("Publish", U), ("Forward", U), ("Subscribe", S)],
}

# Message -> {field: number}: the ones clients get wrong most easily or that carry events.
FIELD_NUMBERS = {
    "containerd.services.content.v1.WriteContentRequest": {
        "action": 1, "ref": 2, "total": 3, "expected": 4, "offset": 5, "data": 6, "labels": 7,
    },
    "containerd.services.content.v1.WriteContentResponse": {
        "action": 1, "started_at": 2, "updated_at": 3, "offset": 4, "total": 5, "digest": 6,
    },
    "containerd.services.events.v1.Envelope": {
        "timestamp": 1, "namespace": 2, "topic": 3, "event": 4,
    },
    "containerd.events.TaskExit": {
        "container_id": 1, "id": 2, "pid": 3, "exit_status": 4, "exited_at": 5,
    },
    "containerd.services.tasks.v1.CreateTaskRequest": {
        "container_id": 1, "rootfs": 3, "stdin": 4, "stdout": 5, "stderr": 6, "terminal": 7,
        "checkpoint": 8, "options": 9, "runtime_path": 10,
    },
    "containerd.services.images.v1.Image": {
        "name": 1, "labels": 2, "target": 3, "created_at": 7, "updated_at": 8,
    },
    "containerd.services.diff.v1.DiffResponse": {"diff": 3},
    "containerd.types.Descriptor": {"media_type": 1, "digest": 2, "size": 3, "annotations": 5},
    "io.containerd.cgroups.v1.Metrics": {
        "hugetlb": 1, "pids": 2, "cpu": 3, "memory": 4, "blkio": 5, "rdma": 6, "network": 7,
        "cgroup_stats": 8, "memory_oom_control": 9,
    },
    "io.containerd.cgroups.v2.Metrics": {
        "pids": 1, "cpu": 2, "memory": 4, "rdma": 5, "io": 6, "hugetlb": 7, "memory_events": 8,
    },
}


def _generated_modules() -> list[str]:
    names = []
    for path in sorted(API_DIR.rglob("*_pb2*.py")):
        names.append(".".join(path.relative_to(REPO).with_suffix("").parts))
    return names


@pytest.fixture(scope="module")
def pool() -> descriptor_pool.DescriptorPool:
    """The default pool, with every generated module imported into it."""
    for name in _generated_modules():
        importlib.import_module(name)
    return descriptor_pool.Default()


def test_generated_code_is_current():
    result = subprocess.run(
        [sys.executable, str(PROTO_DIR / "generate.py"), "--check"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr + result.stdout


def test_no_top_level_containerd_or_github_package(pool):
    for top in ("containerd", "github", "cgroups"):
        assert importlib.util.find_spec(top) is None, f"a top-level {top} package exists"
    bad_import = re.compile(r"^\s*(from|import) (github|containerd|cgroups)\b", re.M)
    offenders = [
        p.relative_to(REPO).as_posix()
        for p in API_DIR.rglob("*.py*")
        if p.suffix in (".py", ".pyi") and bad_import.search(p.read_text())
    ]
    assert offenders == []


def test_every_containerd_file_is_delivered():
    assert set(OUR_CONTAINERD_PROTOS) == EXPECTED_FILES


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_service_names_and_method_shapes(pool, service):
    desc = pool.FindServiceByName(service)
    shapes = []
    for method in desc.methods:
        shape = {(False, False): U, (False, True): S, (True, True): B}[
            (method.client_streaming, method.server_streaming)
        ]
        shapes.append((method.name, shape))
    assert shapes == SERVICES[service]


@pytest.mark.parametrize("message", sorted(FIELD_NUMBERS))
def test_field_numbers(pool, message):
    desc = pool.FindMessageTypeByName(message)
    assert {f.name: f.number for f in desc.fields} == FIELD_NUMBERS[message]


def test_enum_values_are_containerds(pool):
    write_action = pool.FindEnumTypeByName("containerd.services.content.v1.WriteAction")
    assert {v.name: v.number for v in write_action.values} == {"STAT": 0, "WRITE": 1, "COMMIT": 2}
    status = pool.FindEnumTypeByName("containerd.v1.types.Status")
    assert [v.name for v in status.values] == [
        "UNKNOWN", "CREATED", "RUNNING", "STOPPED", "PAUSED", "PAUSING",
    ]


# ---- compiled comparison against containerd's own .proto files ----------------------------

GOGO_IMPORT = re.compile(
    r'^\s*import\s+(weak\s+)?"(gogoproto/gogo\.proto|'
    r'github\.com/containerd/containerd/protobuf/plugin/fieldpath\.proto)";[ \t]*$',
    re.M,
)
GOGO_FILE_OPTION = re.compile(r"^\s*option\s+\((gogoproto|containerd\.plugin)\.[^;]*;", re.M)
GOGO_FIELD_OPTIONS = re.compile(r"\s*\[\s*\((gogoproto|containerd\.plugin)\.[^\]]*\]")


def strip_gogo(text: str) -> str:
    """Remove Go-codegen-only options; they do not change the wire format."""
    text = GOGO_IMPORT.sub("", text)
    text = GOGO_FILE_OPTION.sub("", text)
    return GOGO_FIELD_OPTIONS.sub("", text)


def googleapis_include() -> Path:
    import google.rpc.status_pb2

    return Path(google.rpc.status_pb2.__file__).parents[2]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """containerd 1.6's protos, compiled by protoc from the installed Debian sources."""
    tmp = tmp_path_factory.mktemp("reference")
    for name in sorted(EXPECTED_FILES):
        source = GOCODE / name
        assert source.is_file(), f"{source} missing: `make deb` installs the reference protos"
        copy = tmp / "src" / name
        copy.parent.mkdir(parents=True, exist_ok=True)
        stripped = strip_gogo(source.read_text())
        assert "gogoproto" not in stripped and "containerd.plugin" not in stripped, name
        copy.write_text(stripped)
    out = tmp / "reference.pb"
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp / 'src'}",
            f"-I{googleapis_include()}", "--include_imports",
            f"--descriptor_set_out={out}", *sorted(EXPECTED_FILES),
        ],
        check=True, capture_output=True, text=True,
    )
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return {f.name: f for f in files}


def shape(fdp: descriptor_pb2.FileDescriptorProto) -> dict[str, object]:
    """Everything about a file that reaches the wire, keyed for a readable diff."""
    out: dict[str, object] = {"package": fdp.package}

    def enum(prefix: str, e: descriptor_pb2.EnumDescriptorProto) -> None:
        out[f"enum {prefix}{e.name}"] = sorted((v.number, v.name) for v in e.value)

    def message(prefix: str, m: descriptor_pb2.DescriptorProto) -> None:
        name = f"{prefix}{m.name}"
        out[f"message {name}"] = {
            "map_entry": m.options.map_entry,
            "fields": sorted(
                (f.number, f.name, f.label, f.type, f.type_name, f.oneof_index
                 if f.HasField("oneof_index") else None)
                for f in m.field
            ),
            "oneofs": [o.name for o in m.oneof_decl],
        }
        for nested in m.nested_type:
            message(name + ".", nested)
        for nested in m.enum_type:
            enum(name + ".", nested)

    for m in fdp.message_type:
        message("", m)
    for e in fdp.enum_type:
        enum("", e)
    for s in fdp.service:
        out[f"service {s.name}"] = [
            (m.name, m.input_type, m.output_type, m.client_streaming, m.server_streaming)
            for m in s.method
        ]
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED_FILES))
def test_matches_containerd_reference(pool, reference, name):
    ours = descriptor_pb2.FileDescriptorProto()
    pool.FindFileByName(name).CopyToProto(ours)
    theirs = shape(reference[name])
    mine = shape(ours)
    missing = sorted(set(theirs) - set(mine))
    extra = sorted(set(mine) - set(theirs))
    assert not missing, f"{name}: missing {missing}"
    assert not extra, f"{name}: not in containerd {extra}"
    differing = {k: (mine[k], theirs[k]) for k in theirs if mine[k] != theirs[k]}
    assert not differing, f"{name}: (ours, containerd's) differ: {differing}"
    # Imports that reach other contract files must be the same (gogo ones are dropped).
    assert sorted(ours.dependency) == sorted(reference[name].dependency)


def test_reference_comparison_catches_a_wrong_number(reference):
    """The comparison itself must be able to fail: a renumbered field is noticed."""
    fdp = descriptor_pb2.FileDescriptorProto()
    fdp.CopyFrom(reference["github.com/containerd/containerd/api/events/task.proto"])
    before = shape(fdp)
    exit_msg = next(m for m in fdp.message_type if m.name == "TaskExit")
    exit_msg.field[3].number = 6
    assert shape(fdp) != before


# ---- the real ctr against servicers built on the generated modules ------------------------


@pytest.fixture
def ctr_server(tmp_path):
    """A gRPC server on a unix socket with minimal Version/Introspection/Events servicers."""
    from runtimed.api.containerd.events import task_pb2
    from runtimed.api.containerd.services.events.v1 import events_pb2, events_pb2_grpc
    from runtimed.api.containerd.services.introspection.v1 import (
        introspection_pb2,
        introspection_pb2_grpc,
    )
    from runtimed.api.containerd.services.version.v1 import version_pb2, version_pb2_grpc
    from runtimed.api.containerd.types import platform_pb2

    class Version(version_pb2_grpc.VersionServicer):
        def Version(self, request, context):
            return version_pb2.VersionResponse(version="v9.8.7-test", revision="rev-abc")

    class Introspection(introspection_pb2_grpc.IntrospectionServicer):
        def Server(self, request, context):
            return introspection_pb2.ServerResponse(uuid="1b4e28ba-2fa1-11d2-883f-0016d3cca427")

        def Plugins(self, request, context):
            from google.rpc import status_pb2

            return introspection_pb2.PluginsResponse(plugins=[
                introspection_pb2.Plugin(
                    type="io.containerd.snapshotter.v1", id="overlayfs",
                    platforms=[platform_pb2.Platform(os="linux", architecture="amd64")],
                ),
                introspection_pb2.Plugin(
                    type="io.containerd.snapshotter.v1", id="zfs",
                    init_err=status_pb2.Status(code=9, message="zfs is not available here"),
                ),
            ])

    class Events(events_pb2_grpc.EventsServicer):
        def Subscribe(self, request, context):
            event = task_pb2.TaskExit(container_id="c1", id="c1", pid=42, exit_status=7)
            # containerd's type URLs are the bare full name (no type.googleapis.com/ prefix):
            # its typeurl resolves them through the Go proto registry by that name.
            packed = any_pb2.Any(
                type_url=event.DESCRIPTOR.full_name, value=event.SerializeToString()
            )
            yield events_pb2.Envelope(
                timestamp=timestamp_pb2.Timestamp(seconds=1_700_000_000),
                namespace="default", topic="/tasks/exit", event=packed,
            )

    socket = tmp_path / "ctr.sock"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    version_pb2_grpc.add_VersionServicer_to_server(Version(), server)
    introspection_pb2_grpc.add_IntrospectionServicer_to_server(Introspection(), server)
    events_pb2_grpc.add_EventsServicer_to_server(Events(), server)
    server.add_insecure_port(f"unix://{socket}")
    server.start()
    try:
        yield socket
    finally:
        server.stop(None).wait()
        socket.unlink(missing_ok=True)


def ctr(socket: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ctr", "-a", str(socket), "--timeout", "10s", *args],
        capture_output=True, text=True, timeout=30,
    )


def test_ctr_version_and_server_uuid(ctr_server):
    result = ctr(ctr_server, "version")
    assert result.returncode == 0, result.stderr
    assert "v9.8.7-test" in result.stdout
    assert "rev-abc" in result.stdout
    assert "UUID: 1b4e28ba-2fa1-11d2-883f-0016d3cca427" in result.stdout


def test_ctr_plugins_reads_platforms_and_init_err(ctr_server):
    table = ctr(ctr_server, "plugins", "ls")
    assert table.returncode == 0, table.stderr
    rows = {line.split()[1]: line.split() for line in table.stdout.splitlines()[1:]}
    assert rows["overlayfs"][2:] == ["linux/amd64", "ok"]
    assert rows["zfs"][2:] == ["-", "error"]
    detailed = ctr(ctr_server, "plugins", "ls", "-d")
    assert "FailedPrecondition" in detailed.stdout
    assert "zfs is not available here" in detailed.stdout


def test_ctr_events_decodes_our_envelope_and_task_exit(ctr_server):
    # The servicer ends the stream after one event, so ctr prints it and then exits with EOF.
    result = ctr(ctr_server, "events")
    line = next(row for row in result.stdout.splitlines() if "/tasks/exit" in row)
    assert " default /tasks/exit " in line
    assert '"container_id":"c1"' in line
    assert '"pid":42' in line
    assert '"exit_status":7' in line
