"""The real `ctr` against runtimed: version, plugins, namespaces."""

import subprocess
import sys


def test_version_prints_runtimed(daemon):
    out = daemon.ctr("version").stdout
    server = out.split("Server:", 1)[1]
    assert "Version:  0.1.0" in server
    assert "Revision: runtimed" in server


def test_plugins_ls_lists_grpc_services(daemon):
    out = daemon.ctr("plugins", "ls").stdout
    rows = {tuple(line.split()[:2]) for line in out.splitlines()[1:]}
    for service in ("version", "namespaces", "introspection", "containers", "events"):
        assert ("io.containerd.grpc.v1", service) in rows
    filtered = daemon.ctr("plugins", "ls", "id==namespaces").stdout.splitlines()[1:]
    assert [line.split()[1] for line in filtered] == ["namespaces"]


def test_namespace_create_label_list_remove(daemon):
    daemon.ctr("namespaces", "create", "a", "team=blue")
    daemon.ctr("namespaces", "create", "b")
    daemon.ctr("namespaces", "label", "b", "x=y")
    rows = [line.split() for line in daemon.ctr("namespaces", "ls").stdout.splitlines()[1:]]
    assert ["a", "team=blue"] in rows
    assert ["b", "x=y"] in rows
    daemon.ctr("namespaces", "label", "b", "x=")  # an empty value removes the label
    assert ["b"] in [line.split() for line in daemon.ctr("ns", "ls").stdout.splitlines()[1:]]
    assert daemon.ctr("namespaces", "rm", "a", "b").stdout.split() == ["a", "b"]
    assert daemon.ctr("namespaces", "ls", "-q").stdout.split() == []


def test_namespace_create_twice_is_already_exists(daemon):
    daemon.ctr("namespaces", "create", "a")
    result = daemon.ctr("namespaces", "create", "a", check=False)
    assert result.returncode != 0
    assert "already exists" in result.stderr


def test_invalid_namespace_name_is_refused(daemon):
    result = daemon.ctr("namespaces", "create", "bad/name", check=False)
    assert result.returncode != 0
    assert "invalid argument" in result.stderr
    assert "bad/name" in result.stderr


def test_removing_a_non_empty_namespace_is_refused(daemon):
    spec = '{"ociVersion": "1.0.2", "process": {"args": ["true"]}}'
    with daemon.channel() as channel:
        from runtimed.api.containerd.services.containers.v1 import containers_pb2 as pb
        from runtimed.api.containerd.services.containers.v1 import containers_pb2_grpc

        container = pb.Container(id="c1")
        container.runtime.name = "io.containerd.runc.v2"
        container.spec.type_url = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
        container.spec.value = spec.encode()
        containers_pb2_grpc.ContainersStub(channel).Create(
            pb.CreateContainerRequest(container=container), metadata=[("containerd-namespace", "busy")]
        )
    result = daemon.ctr("namespaces", "rm", "busy", check=False)
    assert result.returncode != 0
    assert 'namespace \'busy\' must be empty, but it still has containers' in result.stderr
    assert "failed precondition" in result.stderr
    assert daemon.ctr("containers", "ls", "-q", namespace="busy").stdout.split() == ["c1"]
    daemon.ctr("containers", "rm", "c1", namespace="busy")
    daemon.ctr("namespaces", "rm", "busy")


def test_second_daemon_on_same_root_exits_with_message(daemon):
    result = subprocess.run(
        [sys.executable, "-m", "runtimed.daemon", "--root", str(daemon.root),
         "--state", str(daemon.base / "state2"), "--address", str(daemon.base / "other.sock")],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode != 0
    assert f"root {daemon.root} is in use by another runtimed" in result.stderr
    # the first daemon still serves
    assert "Server:" in daemon.ctr("version").stdout
