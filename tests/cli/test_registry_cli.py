"""ctl push / pull / login / logout against a real registry on loopback."""

from __future__ import annotations

import json

from tests.cli.conftest import Ctl
from tests.registry_server import registry, registry_basic  # noqa: F401 - fixtures


def test_push_then_pull_round_trip(ctl, busybox, registry, test_images):  # noqa: F811
    ref = f"{registry.host}/team/busybox:1"
    ctl("tag", "busybox", ref)
    pushed = ctl("push", ref)
    assert pushed.returncode == 0
    other = Ctl(ctl.address, namespace="puller")
    other("pull", ref)
    digest = json.loads(other("image", "inspect", ref).stdout)[0]["Target"]["digest"]
    assert digest == test_images["busybox"].target["digest"]
    assert other("run", "--rm", "--pull", "never", ref, "echo", "pulled").stdout == "pulled\n"
    missing = other("pull", f"{registry.host}/team/absent:1", check=False)
    assert missing.returncode == 125 and "absent" in missing.stderr


def test_login_logout_with_basic_auth(ctl, busybox, registry_basic, tmp_path):  # noqa: F811
    env = {"DOCKER_CONFIG": str(tmp_path)}
    ref = f"{registry_basic.host}/private/busybox:1"
    ctl("tag", "busybox", ref)
    refused = ctl("push", ref, check=False, env=env)
    assert refused.returncode == 125 and "Traceback" not in refused.stderr
    ctl("login", "-u", registry_basic.username, "--password-stdin", registry_basic.host,
        input=registry_basic.password + "\n", env=env)
    assert registry_basic.host in json.loads((tmp_path / "config.json").read_text())["auths"]
    ctl("push", ref, env=env)
    ctl("logout", registry_basic.host, env=env)
    assert registry_basic.host not in json.loads((tmp_path / "config.json").read_text()).get("auths", {})
