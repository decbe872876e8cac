"""Container stats as containerd reports them: the OCI runtime's `events --stats` JSON
(runc's format) turned into io.containerd.cgroups.v1.Metrics, packed in an Any."""

from __future__ import annotations

from google.protobuf import any_pb2

from runtimed.errors import Unimplemented


def stats_to_any(stats: dict) -> any_pb2.Any:
    try:
        from runtimed.api.cgroups.stats.v1 import metrics_pb2
    except ImportError:
        raise Unimplemented(
            "stats need the io.containerd.cgroups.v1.Metrics proto, not generated yet"
        ) from None
    data = stats.get("data", stats)
    metrics = metrics_pb2.Metrics()
    pids = data.get("pids", {})
    metrics.pids.current = pids.get("current", 0)
    metrics.pids.limit = pids.get("limit", 0)
    cpu = data.get("cpu", {}).get("usage", {})
    metrics.cpu.usage.total = cpu.get("total", 0)
    metrics.cpu.usage.kernel = cpu.get("kernel", 0)
    metrics.cpu.usage.user = cpu.get("user", 0)
    metrics.cpu.usage.per_cpu.extend(cpu.get("percpu") or [])
    throttling = data.get("cpu", {}).get("throttling", {})
    metrics.cpu.throttling.periods = throttling.get("periods", 0)
    metrics.cpu.throttling.throttled_periods = throttling.get("throttledPeriods", 0)
    metrics.cpu.throttling.throttled_time = throttling.get("throttledTime", 0)
    memory = data.get("memory", {})
    metrics.memory.cache = memory.get("cache", 0)
    usage = memory.get("usage", {})
    metrics.memory.usage.usage = usage.get("usage", 0)
    metrics.memory.usage.max = usage.get("max", 0)
    metrics.memory.usage.limit = usage.get("limit", 0)
    metrics.memory.usage.failcnt = usage.get("failcnt", 0)
    raw = memory.get("raw", {}) or {}
    for name in ("rss", "rss_huge", "mapped_file", "dirty", "writeback", "pgfault",
                 "pgmajfault", "inactive_anon", "active_anon", "inactive_file",
                 "active_file", "unevictable", "total_rss", "total_cache"):
        if name in raw and hasattr(metrics.memory, name):
            setattr(metrics.memory, name, raw[name])
    packed = any_pb2.Any()
    packed.Pack(metrics, type_url_prefix="")
    packed.type_url = metrics.DESCRIPTOR.full_name
    return packed
