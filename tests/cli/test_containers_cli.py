"""Containers and tasks through `ctl`, against a real runtimed running real containers."""

from __future__ import annotations

import json
import signal
import subprocess
import time


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def test_run_rm_prints_and_passes_exit_codes(ctl, busybox):
    result = ctl("run", "--rm", "busybox", "echo", "hello from a container")
    assert result.stdout == "hello from a container\n"
    assert ctl("run", "--rm", "busybox", "sh", "-c", "exit 3", check=False).returncode == 3
    err = ctl("run", "--rm", "busybox", "sh", "-c", "echo oops >&2", check=False)
    assert err.stderr == "oops\n" and err.stdout == ""
    assert ctl("ps", "-a", "-q").stdout.strip() == ""


def test_docker_exit_codes_for_missing_things(ctl, busybox):
    missing = ctl("run", "--rm", "busybox", "/no/such/binary", check=False)
    assert missing.returncode == 127, missing.stderr
    not_executable = ctl("run", "--rm", "busybox", "/etc/passwd", check=False)
    assert not_executable.returncode == 126, not_executable.stderr
    directory = ctl("run", "--rm", "busybox", "/etc", check=False)
    assert directory.returncode == 126, directory.stderr
    no_image = ctl("run", "--rm", "--pull", "never", "example.com/absent:1", "true", check=False)
    assert no_image.returncode == 125 and "no such image" in no_image.stderr
    assert no_image.stderr.count("\n") == 1
    assert ctl("ps", "-a", "-q").stdout.strip() == ""


def test_stdin_env_user_workdir_hostname_readonly(ctl, busybox, tmp_path):
    piped = ctl("run", "--rm", "-i", "busybox", "tr", "a-z", "A-Z", input="shout\n")
    assert piped.stdout == "SHOUT\n"
    env_file = tmp_path / "env"
    env_file.write_text("# comment\nFROM_FILE=yes\n")
    out = ctl("run", "--rm", "-e", "A=1", "--env-file", str(env_file), "-u", "nobody", "-w", "/tmp",
              "-h", "boxy", "busybox", "sh", "-c", 'echo $A $FROM_FILE $(id -u) $(pwd) $(hostname)').stdout
    assert out.split() == ["1", "yes", "65534", "/tmp", "boxy"]
    ro = ctl("run", "--rm", "--read-only", "busybox", "touch", "/x", check=False)
    assert ro.returncode != 0 and "Read-only file system" in ro.stderr


def test_mounts_and_resources(ctl, busybox, tmp_path):
    (tmp_path / "in.txt").write_text("from the host\n")
    out = ctl("run", "--rm", "-v", f"{tmp_path}:/data", "--tmpfs", "/scratch", "busybox",
              "sh", "-c", "cat /data/in.txt; echo back > /data/out.txt; mount | grep -c ' /scratch '").stdout
    assert out.splitlines() == ["from the host", "1"]
    assert (tmp_path / "out.txt").read_text() == "back\n"
    ro = ctl("run", "--rm", "--mount", f"type=bind,source={tmp_path},target=/data,readonly",
             "busybox", "touch", "/data/nope", check=False)
    assert ro.returncode != 0
    limits = ctl("run", "--rm", "--memory", "64m", "--pids-limit", "30", "--cap-drop", "ALL",
                 "busybox", "sh", "-c", "grep CapEff /proc/self/status").stdout
    assert limits.split()[1] == "0000000000000000"


def test_detached_lifecycle(ctl, busybox):
    cid = ctl("run", "-d", "--name", "web", "busybox", "sh", "-c",
              "echo started; trap 'echo bye; exit 0' TERM; while true; do sleep 0.1; done").stdout.strip()
    assert cid == "web"
    wait_for(lambda: "started" in ctl("logs", "web").stdout)
    rows = [json.loads(r) for r in ctl("ps", "--format", "json").stdout.splitlines()]
    assert [(r["Names"], r["State"]) for r in rows] == [("web", "running")]
    assert ctl("ps", "-q", "--filter", "status=exited").stdout.strip() == ""

    exec_out = ctl("exec", "-e", "X=42", "-w", "/etc", "web", "sh", "-c", "echo $X $(pwd); exit 4", check=False)
    assert exec_out.returncode == 4 and exec_out.stdout.split() == ["42", "/etc"]
    assert ctl("exec", "web", "/nope", check=False).returncode == 127

    top = ctl("top", "web").stdout.splitlines()
    assert top[0].split()[:2] == ["UID", "PID"] and any("sleep" in line or "sh -c" in line for line in top[1:])
    stats = ctl("stats", "--no-stream", "--format", "{{.Name}} {{.PIDs}}").stdout.split()
    assert stats[0] == "web" and int(stats[1]) >= 1

    ctl("pause", "web")
    assert "(Paused)" in ctl("ps", "--format", "{{.Status}}").stdout
    assert ctl("exec", "web", "true", check=False).returncode == 125
    ctl("unpause", "web")

    inspect = json.loads(ctl("inspect", "web").stdout)[0]
    assert inspect["State"]["Running"] is True and inspect["State"]["Pid"] > 0
    assert inspect["Config"]["Cmd"][0] == "sh"

    refused = ctl("rm", "web", check=False)
    assert refused.returncode == 1 and "stop it first" in refused.stderr
    ctl("stop", "-t", "5", "web")
    assert "bye" in ctl("logs", "--tail", "1", "web").stdout
    assert ctl("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", "web").stdout.split() == ["exited", "0"]
    assert ctl("wait", "web").stdout.strip() == "0"
    assert "Exited (0)" in ctl("ps", "-a", "--format", "{{.Status}}").stdout

    ctl("start", "web")
    wait_for(lambda: ctl("logs", "web").stdout.count("started") == 2)
    ctl("restart", "-t", "5", "web")
    ctl("kill", "-s", "KILL", "web")
    assert ctl("wait", "web").stdout.strip() == "137"
    ctl("rm", "web")
    assert ctl("ps", "-a", "-q").stdout.strip() == ""


def test_logs_follow_and_rm_force(ctl, busybox):
    ctl("run", "-d", "--name", "counter", "busybox", "sh", "-c",
        "for i in 1 2 3; do echo line $i; sleep 0.3; done")
    followed = ctl("logs", "-f", "counter", timeout=30).stdout
    assert followed.splitlines() == ["line 1", "line 2", "line 3"]
    ctl("run", "-d", "--name", "sleeper", "busybox", "sleep", "1000")
    ctl("rm", "-f", "sleeper")
    ctl("rm", "counter")
    assert ctl("ps", "-a", "-q").stdout.strip() == ""


def test_create_start_attach_and_foreground_logs(ctl, busybox):
    cid = ctl("create", "busybox", "echo", "created then started").stdout.strip()
    assert len(cid) == 64
    assert "Created" in ctl("ps", "-a", "--format", "{{.Status}}").stdout
    assert ctl("start", "-a", cid).stdout == "created then started\n"
    assert ctl("logs", cid[:12]).stdout == "created then started\n"
    ctl("run", "--name", "fg", "busybox", "echo", "kept")
    assert ctl("logs", "fg").stdout == "kept\n"
    assert ctl("ps", "-a", "--filter", "name=fg", "--format", "{{.Status}}").stdout.startswith("Exited (0)")
    ctl("rm", cid[:12], "fg")


def test_cp_both_ways(ctl, busybox, tmp_path):
    ctl("run", "-d", "--name", "files", "busybox", "sleep", "1000")
    src = tmp_path / "hello.txt"
    src.write_text("copied in\n")
    ctl("cp", str(src), "files:/tmp/")
    assert ctl("exec", "files", "cat", "/tmp/hello.txt").stdout == "copied in\n"
    ctl("exec", "files", "sh", "-c", "mkdir -p /out/sub && echo deep > /out/sub/f")
    ctl("cp", "files:/out", str(tmp_path / "got"))
    assert (tmp_path / "got" / "sub" / "f").read_text() == "deep\n"
    ctl("export", "-o", str(tmp_path / "fs.tar"), "files")
    import tarfile

    with tarfile.open(tmp_path / "fs.tar") as tar:
        names = set(tar.getnames())
    assert {"./bin/busybox", "./tmp/hello.txt", "./out/sub/f"} <= names
    ctl("rm", "-f", "files")


def test_ctrl_c_on_run_is_forwarded(ctl, busybox):
    proc = subprocess.Popen(
        ctl.command("run", "--rm", "--name", "sig", "busybox", "sh", "-c",
                    "trap 'echo got INT; exit 5' INT; echo ready; while true; do sleep 0.1; done"),
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 5
        assert "got INT" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert ctl("ps", "-a", "-q").stdout.strip() == ""


def test_events_show_the_lifecycle(ctl, busybox):
    import threading

    watcher = subprocess.Popen(
        ctl.command("events", "--filter", "type=container", "--until", "60s", "--format", "{{.Topic}}"),
        stdout=subprocess.PIPE, text=True,
    )
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(line.strip() for line in watcher.stdout), daemon=True)
    reader.start()
    try:
        # the watcher subscribes asynchronously: run until one whole lifecycle was seen
        for _ in range(10):
            ctl("run", "--rm", "busybox", "true")
            time.sleep(0.5)
            if "/containers/delete" in seen and "/containers/create" in seen:
                break
    finally:
        watcher.kill()
        watcher.wait()
        reader.join(5)
    first = seen.index("/containers/create")
    lifecycle = seen[first:]
    for topic in ("/containers/create", "/tasks/create", "/tasks/start", "/tasks/exit",
                  "/tasks/delete", "/containers/delete"):
        assert topic in lifecycle, seen
    assert lifecycle.index("/tasks/start") < lifecycle.index("/tasks/exit")
    assert not any(t.startswith(("/snapshot/", "/images/")) for t in seen)  # type=container


def test_system_df_and_prune(ctl, busybox):
    ctl("run", "--name", "done", "busybox", "true")
    rows = {r.split()[0]: r.split() for r in ctl("system", "df").stdout.splitlines()[1:]}
    assert rows["Images"][1] == "1" and rows["Containers"][1] == "1"
    ctl("system", "prune", "-f")
    assert ctl("ps", "-a", "-q").stdout.strip() == ""
    ctl("system", "prune", "-a", "-f")
    assert ctl("images", "-q").stdout.strip() == ""


def test_more_run_and_exec_flags(ctl, busybox, tmp_path):
    log = tmp_path / "custom.log"
    ctl("run", "-d", "--name", "flags", "--label", "tier=web", "--log-opt", f"path={log}",
        "--cpus", "0.5", "--cap-add", "NET_ADMIN", "--entrypoint", "/bin/sh", "busybox",
        "-c", "echo via entrypoint; grep CapEff /proc/self/status; sleep 1000")
    wait_for(lambda: log.exists() and "CapEff" in log.read_text())
    text = log.read_text()
    assert text.startswith("via entrypoint\n")
    cap_eff = int(text.split("CapEff:")[1].split()[0], 16)
    assert cap_eff & (1 << 12)  # CAP_NET_ADMIN
    assert ctl("ps", "-q", "--filter", "label=tier=web").stdout.split() == ["flags"]
    assert ctl("ps", "-q", "--filter", "label=tier=db").stdout.strip() == ""
    quota = [p for p in ("/sys/fs/cgroup/cpu/default/flags/cpu.cfs_quota_us",
                         "/sys/fs/cgroup/default/flags/cpu.max") if __import__("os").path.exists(p)]
    assert quota and open(quota[0]).read().split()[0] == "50000"

    ctl("exec", "-d", "flags", "sh", "-c", "echo detached > /tmp/d")
    wait_for(lambda: ctl("exec", "flags", "cat", "/tmp/d", check=False).stdout == "detached\n")
    assert ctl("exec", "-u", "nobody", "flags", "id", "-u").stdout.strip() == "65534"
    assert ctl("exec", "-i", "flags", "wc", "-c", input="12345").stdout.strip() == "5"

    proc = subprocess.Popen(ctl.command("stats", "--format", "{{.Name}}"), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "flags"  # live mode keeps printing
        assert proc.stdout.readline().strip() == "flags"
    finally:
        proc.kill()
        proc.wait()
    ctl("rm", "-f", "flags")

    privileged = ctl("run", "--rm", "--privileged", "busybox", "sh", "-c",
                     "mkdir -p /tmp/m && mount -t tmpfs none /tmp/m && echo mounted").stdout
    assert "mounted" in privileged


def test_events_since_filters_old_ones(ctl, busybox):
    result = ctl("events", "--since", "2999-01-01T00:00:00Z", "--until", "3s",
                 "--format", "{{.Topic}}", timeout=30)
    assert result.stdout.strip() == ""
