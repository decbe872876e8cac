"""OCI lifecycle hooks: each is a program run with the container's state JSON on stdin.

Run with fork/execve/waitpid rather than subprocess: the container's init runs some of
them (createContainer, startContainer), and subprocess's import and threads have no place
there.
"""

from __future__ import annotations

import json
import os
import signal
import time

from shimd.oci.state import OCI_VERSION


class HookError(Exception):
    pass


def state_json(spec: dict, container_id: str, status: str, pid: int, bundle: str) -> bytes:
    return json.dumps({"ociVersion": OCI_VERSION, "id": container_id, "status": status, "pid": pid,
                       "bundle": bundle, "annotations": spec.get("annotations") or {}}).encode()


def run(spec: dict, kind: str, state: bytes) -> None:
    """Run the spec's hooks of this kind in order; the first failure raises HookError."""
    for hook in (spec.get("hooks") or {}).get(kind) or ():
        _run_one(kind, hook, state)


def run_quietly(spec: dict, kind: str, state: bytes) -> list[str]:
    """poststart/poststop: failures are warnings (the spec says so); returns them."""
    warnings = []
    for hook in (spec.get("hooks") or {}).get(kind) or ():
        try:
            _run_one(kind, hook, state)
        except HookError as e:
            warnings.append(str(e))
    return warnings


def _run_one(kind: str, hook: dict, state: bytes) -> None:
    path = hook["path"]
    args = hook.get("args") or [path]
    env = dict(e.split("=", 1) for e in hook.get("env") or () if "=" in e)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(r, 0)
            os.execve(path, args, env)
        finally:
            os._exit(127)
    os.close(r)
    try:
        os.write(w, state)
    except BrokenPipeError:
        pass
    finally:
        os.close(w)
    timeout = hook.get("timeout")
    deadline = time.monotonic() + timeout if timeout else None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG if deadline else 0)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise HookError(f"{kind} hook {path} timed out after {timeout}s")
        time.sleep(0.005)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise HookError(f"{kind} hook {path} failed with {'exit code ' + str(code) if code > 0 else 'signal ' + str(-code)}")
