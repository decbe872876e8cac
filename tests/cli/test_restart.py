"""Restart policies, `run -d --rm` and `--init` through `ctl`, against a real runtimed:
the restarts happen in the daemon, after the client is gone."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

from tests.cli.test_containers_cli import wait_for


def inspect(ctl, name: str) -> dict:
    return json.loads(ctl("inspect", name).stdout)[0]


def test_on_failure_restarts_up_to_the_limit_with_the_same_log(ctl, busybox):
    ctl("run", "-d", "--name", "flaky", "--restart", "on-failure:2", "busybox",
        "sh", "-c", "echo ran; exit 3")
    wait_for(lambda: inspect(ctl, "flaky")["RestartCount"] == 2
             and inspect(ctl, "flaky")["State"]["Status"] == "exited", timeout=15)
    doc = inspect(ctl, "flaky")
    assert doc["State"]["ExitCode"] == 3
    assert doc["HostConfig"]["RestartPolicy"] == {"Name": "on-failure", "MaximumRetryCount": 2}
    time.sleep(0.5)  # no third restart
    assert inspect(ctl, "flaky")["RestartCount"] == 2
    assert ctl("logs", "flaky").stdout == "ran\nran\nran\n"
    assert "Exited (3)" in ctl("ps", "-a", "--filter", "name=flaky").stdout


def test_on_failure_does_not_restart_a_success(ctl, busybox):
    ctl("run", "-d", "--name", "fine", "--restart", "on-failure", "busybox", "true")
    wait_for(lambda: inspect(ctl, "fine")["State"]["Status"] == "exited")
    time.sleep(0.5)
    assert inspect(ctl, "fine")["RestartCount"] == 0


def test_always_restarts_until_stopped_and_stop_sticks(ctl, busybox):
    ctl("run", "-d", "--name", "loop", "--restart", "always", "busybox", "sh", "-c", "sleep 0.2")
    wait_for(lambda: inspect(ctl, "loop")["RestartCount"] >= 3, timeout=15)
    ctl("stop", "-t", "1", "loop")
    count = inspect(ctl, "loop")["RestartCount"]
    time.sleep(1.5)
    doc = inspect(ctl, "loop")
    assert doc["State"]["Status"] == "exited" and doc["RestartCount"] == count
    ctl("start", "loop")  # a user's start: the count starts over, the policy applies again
    wait_for(lambda: inspect(ctl, "loop")["RestartCount"] >= 1, timeout=10)
    ctl("rm", "-f", "loop")


def test_kill_marks_explicitly_stopped(ctl, busybox):
    ctl("run", "-d", "--name", "victim", "--restart", "unless-stopped", "busybox", "sleep", "100")
    ctl("kill", "victim")
    wait_for(lambda: inspect(ctl, "victim")["State"]["Status"] == "exited")
    time.sleep(0.5)
    doc = inspect(ctl, "victim")
    assert doc["State"]["Status"] == "exited" and doc["RestartCount"] == 0
    assert doc["Config"]["Labels"]["io.runtimed.explicitly-stopped"] == "true"


def reboot(daemon, *container_pids: int) -> None:
    """The host "reboots": runtimed and every shim and container die; runtimed starts."""
    daemon.kill9()
    for pid_file in Path(daemon.state).rglob("shim.pid"):
        # a stopped task the daemon was still deleting: its bundle may be gone by now, and
        # its shim exited and reaped (by the zygote that forked it)
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    for pid in container_pids:
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists())
    daemon.start()


def test_daemon_restart_brings_back_always_and_unless_stopped(ctl, busybox, daemon):
    ctl("run", "-d", "--name", "keep", "--restart", "unless-stopped", "busybox", "sleep", "100")
    ctl("run", "-d", "--name", "parked", "--restart", "unless-stopped", "busybox", "sleep", "100")
    ctl("run", "-d", "--name", "plain", "busybox", "sleep", "100")
    ctl("stop", "-t", "0", "parked")
    pids = {n: inspect(ctl, n)["State"]["Pid"] for n in ("keep", "plain")}
    ctl("stop", "-t", "0", "plain")
    reboot(daemon, pids["keep"])
    wait_for(lambda: inspect(ctl, "keep")["State"]["Status"] == "running", timeout=15)
    assert inspect(ctl, "keep")["State"]["Pid"] != pids["keep"]
    assert inspect(ctl, "parked")["State"]["Status"] == "exited"
    assert inspect(ctl, "plain")["State"]["Status"] == "exited"
    ctl("rm", "-f", "keep", "parked", "plain")


def test_run_detached_rm_removes_the_container_when_it_exits(ctl, busybox):
    cid = ctl("run", "-d", "--rm", "busybox", "sh", "-c", "sleep 1.5").stdout.strip()
    doc = inspect(ctl, cid)
    assert doc["HostConfig"]["AutoRemove"] is True
    log_path = doc["LogPath"]
    wait_for(lambda: ctl("ps", "-a", "-q", "--no-trunc").stdout.strip() == "", timeout=10)
    assert ctl("inspect", cid, check=False).returncode != 0
    assert not os.path.exists(log_path)
    conflict = ctl("run", "-d", "--rm", "--restart", "always", "busybox", "true", check=False)
    assert conflict.returncode == 125 and "--restart and --rm" in conflict.stderr


def test_autoremove_containers_not_running_at_start_are_removed(ctl, busybox, daemon):
    """dockerd's rule: an autoremove container found not running at start is removed: one
    whose task died with the host, and one whose removal a kill -9 of runtimed cut short
    after its task was deleted (made here with `ctr`: a started container, no task).
    One created and never started stays."""
    cid = ctl("run", "-d", "--rm", "busybox", "sleep", "100").stdout.strip()
    state = inspect(ctl, cid)
    for name, labels in [("cut-short", ["io.runtimed.restart-count=0"]), ("never-started", [])]:
        flags = [arg for label in ["io.runtimed.autoremove=true", *labels] for arg in ("--label", label)]
        daemon.ctr("containers", "create", *flags, busybox, name, "true", namespace="default")
    snapshots = daemon.ctr("snapshots", "ls", namespace="default").stdout
    assert all(key in snapshots for key in (cid, "cut-short")) and os.path.exists(state["LogPath"])
    reboot(daemon, state["State"]["Pid"])
    wait_for(lambda: ctl("ps", "-a", "-q", "--no-trunc").stdout.split() == ["never-started"], timeout=15)
    snapshots = daemon.ctr("snapshots", "ls", namespace="default").stdout
    assert not os.path.exists(state["LogPath"]) and cid not in snapshots and "cut-short" not in snapshots
    ctl("rm", "never-started")


ORPHAN = "sh -c 'sleep 0.2 &'; exec sleep 100"  # the orphan goes to PID 1, which then sleeps


def zombies(ctl, name: str) -> int:
    out = ctl("exec", name, "ps", "-o", "stat,comm").stdout
    return sum(1 for line in out.splitlines()[1:] if line.split()[0].startswith("Z"))


def test_init_is_pid_1_reaps_orphans_and_forwards_stop(ctl, busybox):
    ctl("run", "-d", "--init", "--name", "tini", "busybox", "sh", "-c", ORPHAN)
    cmdline = ctl("exec", "tini", "cat", "/proc/1/cmdline").stdout.split("\0")
    assert cmdline[:3] == ["/sbin/docker-init", "--", "sh"]
    assert inspect(ctl, "tini")["HostConfig"]["Init"] is True
    time.sleep(0.6)
    assert zombies(ctl, "tini") == 0
    started = time.monotonic()
    ctl("stop", "tini")  # tini forwards SIGTERM to sleep: no 10 s grace period to wait out
    assert time.monotonic() - started < 5
    ctl("rm", "tini")


def test_without_init_orphans_stay_zombies(ctl, busybox):
    """The control: the same orphan under a PID 1 that never waits stays a zombie."""
    ctl("run", "-d", "--name", "noinit", "busybox", "sh", "-c", ORPHAN)
    time.sleep(0.6)
    assert zombies(ctl, "noinit") == 1
    ctl("rm", "-f", "noinit")


def test_ctrl_c_on_a_foreground_init_container_stops_it(ctl, busybox):
    """Without an init, `sleep` as PID 1 ignores SIGINT; tini passes it on."""
    import subprocess

    proc = subprocess.Popen(ctl.command("run", "--init", "--name", "fgint", "busybox", "sleep", "100"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: '"running"' in ctl("inspect", "--format", "{{json .State.Status}}", "fgint",
                                            check=False).stdout)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=5) == 128 + signal.SIGINT
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    ctl("rm", "-f", "fgint")


def test_detached_tty_container_is_logged_and_restarted_with_a_pty(ctl, busybox):
    ctl("run", "-dt", "--name", "ttyd", "--restart", "on-failure:1", "busybox",
        "sh", "-c", "tty; exit 2")
    wait_for(lambda: ctl("logs", "ttyd").stdout.count("/dev/pts/") == 2, timeout=10)
    wait_for(lambda: inspect(ctl, "ttyd")["State"]["Status"] == "exited")
    assert inspect(ctl, "ttyd")["RestartCount"] == 1
    ctl("rm", "ttyd")
