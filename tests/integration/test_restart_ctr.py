"""The daemon's restart manager driven by containerd's own restart labels, set with the
real `ctr`: no ctl involved, so the restart is the daemon's doing."""

from __future__ import annotations

import json
import time

from tests import testimages


def test_containerd_restart_labels_restart_a_ctr_container(daemon, tmp_path):
    daemon.ctr("images", "import", testimages.build(tmp_path / "images")["busybox"].archive)
    log = tmp_path / "out.log"
    daemon.ctr("run", "-d", "--label", "containerd.io/restart.status=running",
               "--label", "containerd.io/restart.policy=on-failure:1",
               "--label", f"containerd.io/restart.loguri=file://{log}", "--log-uri", f"file://{log}",
               testimages.BUSYBOX_NAME, "crash", "sh", "-c", "echo hi; exit 1")
    deadline = time.monotonic() + 10
    labels = {}
    while time.monotonic() < deadline:
        labels = json.loads(daemon.ctr("containers", "info", "crash").stdout)["Labels"]
        tasks = daemon.ctr("tasks", "ls").stdout
        if labels.get("io.runtimed.restart-count") == "1" and "STOPPED" in tasks:
            break
        time.sleep(0.1)
    assert labels.get("io.runtimed.restart-count") == "1", labels
    assert labels.get("io.runtimed.exit-code") == "1"
    time.sleep(0.5)  # on-failure:1 allows no second restart
    assert json.loads(daemon.ctr("containers", "info", "crash").stdout)["Labels"][
        "io.runtimed.restart-count"] == "1"
    assert log.read_text() == "hi\nhi\n"
    daemon.ctr("tasks", "delete", "crash")
    daemon.ctr("containers", "rm", "crash")
