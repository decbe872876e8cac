"""runc-shaped stats → containerd's cgroup Metrics messages (v1 and v2)."""

from __future__ import annotations

from runtimed.api.cgroups.stats.v1 import metrics_pb2 as v1
from runtimed.api.cgroups.v2.stats import metrics_pb2 as v2
from shimd.metrics import stats_to_any

STATS = {
    "type": "stats",
    "id": "c",
    "data": {
        "cpu": {"usage": {"total": 5_000_000, "kernel": 2_000_000, "user": 3_000_000,
                          "percpu": [4_000_000, 1_000_000]},
                "throttling": {"periods": 7, "throttledPeriods": 2, "throttledTime": 9000}},
        "memory": {"usage": {"usage": 1 << 20, "max": 2 << 20, "limit": 64 << 20, "failcnt": 1},
                   "swap": {"usage": 0, "limit": -1},
                   "raw": {"rss": 4096, "cache": 8192, "anon": 4096, "file": 8192, "pgpgin": 5},
                   "events": {"oom_kill": 1}},
        "pids": {"current": 3, "limit": 100},
    },
}


def test_v1_metrics():
    packed = stats_to_any(STATS)
    assert packed.type_url == "io.containerd.cgroups.v1.Metrics"
    m = v1.Metrics.FromString(packed.value)
    assert (m.pids.current, m.pids.limit) == (3, 100)
    assert m.cpu.usage.total == 5_000_000 and list(m.cpu.usage.per_cpu) == [4_000_000, 1_000_000]
    assert m.cpu.throttling.throttled_periods == 2
    assert m.memory.usage.usage == 1 << 20 and m.memory.usage.limit == 64 << 20
    assert m.memory.rss == 4096 and m.memory.cache == 8192 and m.memory.pg_pg_in == 5
    assert m.memory.swap.limit == 0  # "max" (-1) is no number


def test_v2_metrics():
    packed = stats_to_any(STATS, v2=True)
    assert packed.type_url == "io.containerd.cgroups.v2.Metrics"
    m = v2.Metrics.FromString(packed.value)
    assert m.cpu.usage_usec == 5000 and m.cpu.system_usec == 2000 and m.cpu.throttled_usec == 9
    assert m.memory.usage == 1 << 20 and m.memory.usage_limit == 64 << 20
    assert m.memory.anon == 4096 and m.memory.file == 8192
    assert m.memory_events.oom_kill == 1
