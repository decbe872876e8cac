"""`make run`: start runtimed (if it is not running yet) and show the main job working.

Leaves the daemon running on the default socket so the user can carry on with `ctl` and
`ctr`, and prints what to try next.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ADDRESS = "/run/runtimed/runtimed.sock"
LOG = "/run/runtimed/runtimed.log"
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def step(title: str) -> None:
    print(f"\n\033[1m==> {title}\033[0m", flush=True)


def run(*cmd: str) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def answering() -> bool:
    return os.path.exists(ADDRESS) and subprocess.run(
        ["ctr", "-a", ADDRESS, "version"], capture_output=True
    ).returncode == 0


def start_daemon() -> None:
    if answering():
        print(f"runtimed is already serving on {ADDRESS}")
        return
    Path(LOG).parent.mkdir(parents=True, exist_ok=True)
    with open(LOG, "ab") as log:
        subprocess.Popen(
            [str(BIN / "runtimed"), "--address", ADDRESS], stdout=log, stderr=log,
            start_new_session=True,
        )
    for _ in range(200):
        if answering():
            print(f"runtimed started on {ADDRESS} (log: {LOG})")
            return
        time.sleep(0.05)
    sys.exit(f"runtimed did not start; see {LOG}")


def main() -> None:
    step("starting runtimed")
    start_daemon()
    step("containerd's own ctr talks to it")
    run("ctr", "-a", ADDRESS, "version")
    run("ctr", "-a", ADDRESS, "plugins", "ls")

    images = REPO / ".cache" / "images"
    step("building the busybox test image offline (Debian's busybox-static)")
    run(sys.executable, str(REPO / "tests" / "testimages.py"), str(images))
    step("importing it")
    run("ctr", "-a", ADDRESS, "images", "import", str(images / "busybox.tar"))
    run("ctr", "-a", ADDRESS, "images", "ls")

    step("running a container")
    ctl = shutil.which("ctl", path=str(BIN)) or "ctl"
    run(ctl, "--address", ADDRESS, "run", "--rm", "--pull", "never", "busybox",
        "echo", "hello from a container")

    step("what to try next")
    print(f"""  runtimed keeps running (log: {LOG}). Try:
    {BIN}/ctl run --rm -it busybox sh
    {BIN}/ctl run -d --name web busybox sleep 1000 && {BIN}/ctl ps && {BIN}/ctl exec web ps
    ctr -a {ADDRESS} run --rm docker.io/library/busybox:latest t1 echo hi
    {BIN}/ctl --help
  Stop it with: kill $(cat /var/lib/runtimed/runtimed.lock)""")


if __name__ == "__main__":
    main()
