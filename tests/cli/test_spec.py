"""The OCI spec builder: Docker's defaults, image config, and every run option."""

from __future__ import annotations

import errno

import pytest

from runtimed.errors import InvalidArgument, NotFound
from runtimed.oci.seccomp import default_profile
from runtimed.oci.spec import (
    DEFAULT_CAPS,
    ImageConfig,
    SpecOptions,
    build_spec,
    capabilities,
    exec_process,
    merge_env,
    parse_memory,
    parse_mount,
    parse_tmpfs,
    parse_volume,
    resolve_user,
)

PASSWD = b"root:x:0:0:root:/root:/bin/sh\nwww:x:33:33:www:/var/www:/bin/false\nbob:x:1000:1000::/home/bob:/bin/sh\n"
GROUP = b"root:x:0:\nwww:x:33:\nbob:x:1000:\naudio:x:29:bob\nvideo:x:44:bob,www\n"


def reader(path: str) -> bytes | None:
    return {"/etc/passwd": PASSWD, "/etc/group": GROUP}.get(path)


def image(**kw) -> ImageConfig:
    base = {"cmd": ["sh"], "env": ["PATH=/usr/bin:/bin", "LANG=C"]}
    base.update(kw)
    return ImageConfig(**base)


def test_default_spec_is_dockers():
    spec = build_spec("abc", "ns1", image(), SpecOptions())
    proc, linux = spec["process"], spec["linux"]
    assert proc["args"] == ["sh"]
    assert proc["capabilities"]["bounding"] == proc["capabilities"]["effective"]
    assert sorted(proc["capabilities"]["bounding"]) == sorted(DEFAULT_CAPS)
    assert proc["noNewPrivileges"] is True
    assert {m["destination"] for m in spec["mounts"]} >= {
        "/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys"}
    assert "/proc/kcore" in linux["maskedPaths"] and "/proc/sys" in linux["readonlyPaths"]
    assert linux["cgroupsPath"] == "/ns1/abc"
    assert {n["type"] for n in linux["namespaces"]} == {"pid", "ipc", "uts", "mount", "network"}
    assert linux["seccomp"]["defaultAction"] == "SCMP_ACT_ERRNO"
    assert spec["hostname"] == "abc"
    assert "HOME=/root" not in proc["env"] and "HOME=/" in proc["env"]  # no passwd read


def test_image_config_and_overrides():
    cfg = image(entrypoint=["/entry"], cmd=["a", "b"], working_dir="/srv", env=["A=1", "B=2"])
    spec = build_spec("x", "default", cfg, SpecOptions())
    assert spec["process"]["args"] == ["/entry", "a", "b"]
    assert spec["process"]["cwd"] == "/srv"
    spec = build_spec("x", "default", cfg, SpecOptions(args=["c"], env=["B=3", "C=4"], cwd="/tmp"))
    assert spec["process"]["args"] == ["/entry", "c"]
    assert spec["process"]["env"][:3] == ["A=1", "B=3", "C=4"]
    assert spec["process"]["cwd"] == "/tmp"
    # a new entrypoint drops the image's Cmd, as docker does
    spec = build_spec("x", "default", cfg, SpecOptions(entrypoint=["/bin/echo"]))
    assert spec["process"]["args"] == ["/bin/echo"]
    with pytest.raises(InvalidArgument):
        build_spec("x", "default", ImageConfig(), SpecOptions())


def test_user_from_the_image_passwd_and_group():
    u = resolve_user("bob", reader)
    assert (u.uid, u.gid, sorted(u.additional_gids), u.home) == (1000, 1000, [29, 44], "/home/bob")
    assert (resolve_user("33", reader).uid, resolve_user("33", reader).gid) == (33, 33)
    assert resolve_user("www:video", reader).gid == 44
    assert (resolve_user("4242", reader).uid, resolve_user("4242", reader).gid) == (4242, 0)
    assert resolve_user("5:6", None).gid == 6
    with pytest.raises(NotFound):
        resolve_user("nobody-here", reader)
    spec = build_spec("x", "default", image(user="www"), SpecOptions(), reader)
    assert spec["process"]["user"] == {"uid": 33, "gid": 33, "additionalGids": [44]}
    assert "HOME=/var/www" in spec["process"]["env"]
    spec = build_spec("x", "default", image(user="www"), SpecOptions(user="bob"), reader)
    assert spec["process"]["user"]["uid"] == 1000


def test_capabilities_add_drop_all():
    assert "CAP_NET_ADMIN" in capabilities(["NET_ADMIN"], [])
    assert "CAP_CHOWN" not in capabilities([], ["chown"])
    assert capabilities(["NET_ADMIN"], ["ALL"]) == ["CAP_NET_ADMIN"]
    every = capabilities(["ALL"], ["SYS_ADMIN"])
    assert "CAP_SYS_ADMIN" not in every and "CAP_SYS_MODULE" in every
    with pytest.raises(InvalidArgument):
        capabilities(["NOT_A_CAP"], [])


def test_seccomp_follows_capabilities():
    plain = default_profile(DEFAULT_CAPS, "x86_64")
    allowed = {n for r in plain["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" and "args" not in r
               for n in r["names"]}
    assert "read" in allowed and "mount" not in allowed and "arch_prctl" in allowed
    clone3 = [r for r in plain["syscalls"] if r["names"] == ["clone3"]]
    assert clone3 and clone3[0]["errnoRet"] == errno.ENOSYS
    clone = [r for r in plain["syscalls"] if r["names"] == ["clone"]][0]
    assert clone["args"][0]["op"] == "SCMP_CMP_MASKED_EQ"
    admin = default_profile([*DEFAULT_CAPS, "CAP_SYS_ADMIN"], "x86_64")
    names = {n for r in admin["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" for n in r["names"]}
    assert {"mount", "unshare", "setns"} <= names
    assert not [r for r in admin["syscalls"] if r["names"] == ["clone3"] and r["action"] != "SCMP_ACT_ALLOW"]


def test_privileged_read_only_resources_mounts_network():
    opts = SpecOptions(privileged=True, read_only=True, memory=parse_memory("64m"), cpus=1.5,
                       pids_limit=20, hostname="box", network="host",
                       mounts=[parse_volume("/srv:/data:ro"), parse_tmpfs("/run:size=1m"),
                               parse_mount("type=bind,source=/etc,target=/hostetc,readonly")])
    spec = build_spec("x", "default", image(), opts)
    linux = spec["linux"]
    assert "seccomp" not in linux and linux["maskedPaths"] == [] and linux["readonlyPaths"] == []
    assert spec["root"]["readonly"] is True
    assert linux["resources"]["memory"] == {"limit": 64 << 20}
    assert linux["resources"]["cpu"] == {"quota": 150000, "period": 100000}
    assert linux["resources"]["pids"] == {"limit": 20}
    assert "network" not in {n["type"] for n in linux["namespaces"]}
    mounts = {m["destination"]: m for m in spec["mounts"]}
    assert mounts["/data"]["source"] == "/srv" and "ro" in mounts["/data"]["options"]
    assert mounts["/run"]["type"] == "tmpfs" and "size=1m" in mounts["/run"]["options"]
    assert "ro" in mounts["/hostetc"]["options"]
    with pytest.raises(InvalidArgument):
        build_spec("x", "default", image(), SpecOptions(memory=1024))


def test_parsers_reject_garbage():
    for bad in ("nodest", "/a:relative", "/a:/b:xx"):
        with pytest.raises(InvalidArgument):
            parse_volume(bad)
    with pytest.raises(InvalidArgument):
        parse_mount("type=bind,target=/x")
    with pytest.raises(InvalidArgument):
        parse_memory("12q")
    assert parse_memory("1g") == 1 << 30 and parse_memory("100") == 100


def test_exec_process_and_env_merge():
    base = {"args": ["sh"], "env": ["PATH=/bin", "A=1"], "cwd": "/", "user": {"uid": 0, "gid": 0},
            "terminal": False}
    proc = exec_process(base, ["ls"], env=["A=2"], cwd="/tmp", terminal=True)
    assert proc["args"] == ["ls"] and proc["cwd"] == "/tmp" and proc["terminal"]
    assert "A=2" in proc["env"] and "A=1" not in proc["env"] and "TERM=xterm" in proc["env"]
    assert merge_env(["A=1", "B=2"], ["A=3"]) == ["A=3", "B=2"]
