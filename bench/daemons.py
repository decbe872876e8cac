"""The two daemons under test, each on private temporary dirs and socket.

containerd runs with its CRI plugin disabled and its own root, state and socket, so the
benchmark never touches a system containerd. runtimed runs from this checkout.

`BENCH_STATE_TMPFS=1` puts each daemon's state dir on a tmpfs of its own, as a real
machine's /run is (both daemons' default state dirs are there). On this VM /run and /tmp
are on the root ext4, which has no journal: every new inode there costs a scan of the
inodes freed in the last 60 s (up to 360 s, docs/benchmarks.md), so the default run keeps
that cost in, for both daemons alike. (containerd's runc keeps its own state in
/run/containerd/runc either way: a system path, left alone.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CONTAINERD_CONFIG = """version = 2
root = "{base}/root"
state = "{base}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{base}/containerd.sock"
[ttrpc]
  address = "{base}/containerd.sock.ttrpc"
[debug]
  address = "{base}/debug.sock"
"""


class Daemon:
    name = "?"

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix=f"bench-{self.name}-", dir="/tmp"))
        self.proc: subprocess.Popen | None = None
        self.address = ""

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        if os.environ.get("BENCH_STATE_TMPFS") == "1":  # unmounted by stop(), as any mount under base
            (self.base / "state").mkdir(exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0711", "tmpfs", str(self.base / "state")],
                           check=True)
        log = open(self.base / "daemon.log", "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if os.path.exists(self.address) and subprocess.run(
                ["ctr", "-a", self.address, "version"], capture_output=True
            ).returncode == 0:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start; see {self.base / 'daemon.log'}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        subprocess.run(["sh", "-c", f"grep -o ' {self.base}[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount -l"],
                       capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)


class Runtimed(Daemon):
    name = "runtimed"

    def command(self) -> list[str]:
        self.address = str(self.base / "rd.sock")
        return [sys.executable, "-m", "runtimed.daemon", "--root", str(self.base / "root"),
                "--state", str(self.base / "state"), "--address", self.address,
                "--log-level", "warning"]


class Containerd(Daemon):
    name = "containerd"

    @staticmethod
    def available() -> bool:
        return shutil.which("containerd") is not None and shutil.which("runc") is not None

    def command(self) -> list[str]:
        self.address = str(self.base / "containerd.sock")
        config = self.base / "config.toml"
        config.write_text(CONTAINERD_CONFIG.format(base=self.base))
        return ["containerd", "--config", str(config), "--log-level", "warn"]
