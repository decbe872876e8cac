"""Records of watching the daemon: events as they happen, a task's resource usage."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass
class Event:
    """An event from the daemon, its payload decoded to a dict."""

    timestamp: datetime | None
    namespace: str
    topic: str
    type_url: str
    payload: dict

    def __str__(self) -> str:
        import json

        when = self.timestamp.isoformat() if self.timestamp else "-"
        return f"{when} {self.namespace} {self.topic} {json.dumps(self.payload, sort_keys=True)}"


@dataclass
class Stats:
    """A task's resource usage, from its cgroup metrics."""

    container_id: str
    cpu_usage_ns: int = 0
    memory_usage: int = 0
    memory_limit: int = 0
    pids: int = 0
    pids_limit: int = 0
    type_url: str = ""
