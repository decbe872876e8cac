"""The daemon process: status codes over gRPC, socket handling, config file, restart."""

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import empty_pb2

from runtimed.api.containerd.services.introspection.v1 import introspection_pb2_grpc
from runtimed.api.containerd.services.namespaces.v1 import namespace_pb2 as ns_pb
from runtimed.api.containerd.services.namespaces.v1 import namespace_pb2_grpc
from tests.conftest import DaemonProcess


def namespaces(daemon):
    return namespace_pb2_grpc.NamespacesStub(daemon.channel())


def test_status_codes_have_messages_a_person_can_act_on(daemon):
    stub = namespaces(daemon)
    with pytest.raises(grpc.RpcError) as err:
        stub.Delete(ns_pb.DeleteNamespaceRequest(name="unknown"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "namespace 'unknown' not found" in err.value.details()

    with pytest.raises(grpc.RpcError) as err:
        stub.Create(ns_pb.CreateNamespaceRequest(namespace=ns_pb.Namespace(name="-bad")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "-bad" in err.value.details()

    with pytest.raises(grpc.RpcError) as err:
        stub.Get(ns_pb.GetNamespaceRequest(name="x"), metadata=[("containerd-namespace", "no good")])
    # Get does not use the metadata namespace; a bad metadata namespace matters for others
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    with pytest.raises(grpc.RpcError) as err:
        stub.List(ns_pb.ListNamespacesRequest(filter="name=x"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parse error" in err.value.details()


def test_update_with_label_mask_merges_only_named_keys(daemon):
    stub = namespaces(daemon)
    stub.Create(ns_pb.CreateNamespaceRequest(namespace=ns_pb.Namespace(name="n", labels={"a": "1", "b": "2"})))
    request = ns_pb.UpdateNamespaceRequest(namespace=ns_pb.Namespace(name="n", labels={"a": "9", "c": "3"}))
    request.update_mask.paths.append("labels.a")
    reply = stub.Update(request)
    assert dict(reply.namespace.labels) == {"a": "9", "b": "2"}
    request = ns_pb.UpdateNamespaceRequest(namespace=ns_pb.Namespace(name="n", labels={"z": "1"}))
    request.update_mask.paths.append("name")
    with pytest.raises(grpc.RpcError) as err:
        stub.Update(request)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_server_uuid_persists_across_restart(daemon):
    stub = introspection_pb2_grpc.IntrospectionStub(daemon.channel())
    first = stub.Server(empty_pb2.Empty()).uuid
    assert len(first) == 36
    daemon.restart()
    stub = introspection_pb2_grpc.IntrospectionStub(daemon.channel())
    assert stub.Server(empty_pb2.Empty()).uuid == first
    assert namespaces(daemon).List(ns_pb.ListNamespacesRequest()) is not None


def test_socket_mode_and_removal_on_sigterm(daemon):
    mode = os.stat(daemon.address).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660
    assert daemon.stop() == 0
    assert not os.path.exists(daemon.address)


def test_stale_socket_is_replaced_after_kill9(daemon):
    namespaces(daemon).Create(ns_pb.CreateNamespaceRequest(namespace=ns_pb.Namespace(name="kept")))
    daemon.kill9()
    assert os.path.exists(daemon.address)  # left behind by the killed daemon
    daemon.start()
    names = [n.name for n in namespaces(daemon).List(ns_pb.ListNamespacesRequest()).namespaces]
    assert "kept" in names


def test_config_file_and_bad_config(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('root = "/x"\nbogus = 1\n')
    result = subprocess.run(
        [sys.executable, "-m", "runtimed.daemon", "--config", str(bad)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert "unknown keys bogus" in result.stderr


def test_config_file_sets_the_same_keys_as_flags():
    base = Path(tempfile.mkdtemp(prefix="rtd-", dir="/tmp"))
    (base / "runtimed.toml").write_text(
        f'root = "{base}/croot"\nstate = "{base}/cstate"\naddress = "{base}/c.sock"\n'
        'log-level = "debug"\nlog_format = "json"\n'
    )
    probe = DaemonProcess(base)
    probe.address = f"{base}/c.sock"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "runtimed.daemon", "--config", str(base / "runtimed.toml")],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not (os.path.exists(probe.address) and probe._healthy()):
            assert time.monotonic() < deadline, "runtimed did not come up"
            time.sleep(0.05)
        assert (base / "croot" / "meta.db").exists()
    finally:
        daemon.terminate()
        _, err = daemon.communicate(timeout=20)
        shutil.rmtree(base, ignore_errors=True)
    assert '"msg": "runtimed 0.1.0 serving on' in err
