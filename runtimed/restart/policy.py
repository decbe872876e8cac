"""Restart policies as docker defines them, kept in container labels.

Pure decisions (no I/O), so ctl can import the label names cheaply and the manager's
choices are unit-testable. The labels are the contract between any client and the
daemon's restart manager:

- `io.runtimed.restart-policy`: `no`, `always`, `unless-stopped`, `on-failure[:N]`
- `io.runtimed.explicitly-stopped`: `true` once a user stopped or killed the container
  (clients set it before killing); cleared when a user starts it again
- `io.runtimed.restart-count`: restarts so far; clients set `0` on a user start, which
  also marks the container as started once (only those come back after a daemon restart)
- `io.runtimed.restarting`: `true` while the manager waits out its backoff
- `io.runtimed.exit-code` / `io.runtimed.exited-at`: the last exit the manager saw
- `io.runtimed.started-at`: when the manager last started it
- `io.runtimed.log-uri`: the stdout/stderr URI a restarted task gets (`file://...`)
- `io.runtimed.autoremove`: `true`: remove the container when it exits (`run --rm -d`)

containerd's own restart labels are honoured too: `containerd.io/restart.status=running`
with `containerd.io/restart.policy` (default `always`) and `containerd.io/restart.loguri`
or `.logpath`; `containerd.io/restart.status=stopped` counts as explicitly stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtimed.errors import InvalidArgument

LABEL_POLICY = "io.runtimed.restart-policy"
LABEL_STOPPED = "io.runtimed.explicitly-stopped"
LABEL_COUNT = "io.runtimed.restart-count"
LABEL_RESTARTING = "io.runtimed.restarting"
LABEL_EXIT_CODE = "io.runtimed.exit-code"
LABEL_EXITED_AT = "io.runtimed.exited-at"
LABEL_STARTED_AT = "io.runtimed.started-at"
LABEL_LOG_URI = "io.runtimed.log-uri"
LABEL_AUTOREMOVE = "io.runtimed.autoremove"

CONTAINERD_STATUS = "containerd.io/restart.status"
CONTAINERD_POLICY = "containerd.io/restart.policy"
CONTAINERD_LOG_URI = "containerd.io/restart.loguri"
CONTAINERD_LOG_PATH = "containerd.io/restart.logpath"

BACKOFF_START = 0.1
BACKOFF_MAX = 60.0
BACKOFF_RESET_AFTER = 10.0


@dataclass(frozen=True)
class Policy:
    """A container's restart policy, docker's `--restart`."""

    name: str = "no"  # no | always | unless-stopped | on-failure
    max_retries: int = 0  # on-failure only; 0: unlimited

    @classmethod
    def parse(cls, text: str) -> Policy:
        name, colon, count = (text or "no").partition(":")
        if name not in ("no", "always", "unless-stopped", "on-failure"):
            raise InvalidArgument(
                f"invalid restart policy {text!r}: use no, always, unless-stopped or on-failure[:N]"
            )
        if not colon:
            return cls(name)
        if name != "on-failure":
            raise InvalidArgument(f"maximum retry count cannot be used with restart policy {name!r}")
        if not count.isdigit():
            raise InvalidArgument(f"invalid restart policy {text!r}: the retry count must be a number")
        return cls(name, int(count))

    def __str__(self) -> str:
        return f"{self.name}:{self.max_retries}" if self.max_retries else self.name


def policy_of(labels: dict[str, str]) -> Policy:
    """The container's policy; an unparsable label means `no` (never restart by accident)."""
    text = labels.get(LABEL_POLICY)
    if text is None and labels.get(CONTAINERD_STATUS) == "running":
        text = labels.get(CONTAINERD_POLICY) or "always"
    try:
        return Policy.parse(text or "no")
    except InvalidArgument:
        return Policy()


def stopped_by_user(labels: dict[str, str]) -> bool:
    return labels.get(LABEL_STOPPED) == "true" or labels.get(CONTAINERD_STATUS) == "stopped"


def autoremove(labels: dict[str, str]) -> bool:
    """`run -d --rm`: the daemon removes the container when its task exits."""
    return labels.get(LABEL_AUTOREMOVE) == "true"


def restart_count(labels: dict[str, str]) -> int:
    try:
        return int(labels.get(LABEL_COUNT) or 0)
    except ValueError:
        return 0


def log_uri(labels: dict[str, str]) -> str:
    uri = labels.get(LABEL_LOG_URI) or labels.get(CONTAINERD_LOG_URI) or ""
    if not uri and labels.get(CONTAINERD_LOG_PATH):
        uri = "file://" + labels[CONTAINERD_LOG_PATH]
    return uri


def should_restart(policy: Policy, exit_status: int, count: int, stopped: bool,
                   at_boot: bool = False) -> bool:
    """docker's rule. A user's stop cancels every policy for that exit; when the daemon
    starts, `always` brings a container back even so (docker does), `unless-stopped` not."""
    if policy.name == "no":
        return False
    if stopped and not (at_boot and policy.name == "always"):
        return False
    if policy.name == "on-failure":
        return exit_status != 0 and (policy.max_retries == 0 or count < policy.max_retries)
    return True


@dataclass
class Backoff:
    """docker's delay before a restart: 100 ms, doubling, at most a minute, back to
    100 ms after a run of at least 10 s."""

    delay: float = 0.0

    def next(self, ran_seconds: float) -> float:
        if ran_seconds >= BACKOFF_RESET_AFTER:
            self.delay = 0.0
        self.delay = BACKOFF_START if self.delay == 0 else min(self.delay * 2, BACKOFF_MAX)
        return self.delay
