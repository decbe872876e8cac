"""Container stats as containerd reports them: runc's `events --stats` data (which the
built-in runtime and the cgroups library produce in the same shape) turned into
io.containerd.cgroups.v1.Metrics, or io.containerd.cgroups.v2.Metrics on a cgroup v2
machine, packed in an Any with the bare type URL containerd's typeurl registry uses."""

from __future__ import annotations

from google.protobuf import any_pb2

# memory.stat keys whose protobuf field is spelled differently
V1_RENAMED = {
    "pgpgin": "pg_pg_in", "pgpgout": "pg_pg_out", "total_pgpgin": "total_pg_pg_in",
    "total_pgpgout": "total_pg_pg_out", "pgfault": "pg_fault", "pgmajfault": "pg_maj_fault",
    "total_pgfault": "total_pg_fault", "total_pgmajfault": "total_pg_maj_fault",
}


def _u64(value) -> int:
    """Negative or missing counters ("max" limits read as -1) become 0."""
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return 0


def v1_metrics(stats: dict):
    from runtimed.api.cgroups.stats.v1 import metrics_pb2

    data = stats.get("data", stats)
    m = metrics_pb2.Metrics()
    pids = data.get("pids") or {}
    m.pids.current = _u64(pids.get("current"))
    m.pids.limit = _u64(pids.get("limit"))
    cpu = data.get("cpu") or {}
    usage = cpu.get("usage") or {}
    m.cpu.usage.total = _u64(usage.get("total"))
    m.cpu.usage.kernel = _u64(usage.get("kernel"))
    m.cpu.usage.user = _u64(usage.get("user"))
    m.cpu.usage.per_cpu.extend(_u64(v) for v in usage.get("percpu") or [])
    throttling = cpu.get("throttling") or {}
    m.cpu.throttling.periods = _u64(throttling.get("periods"))
    m.cpu.throttling.throttled_periods = _u64(throttling.get("throttledPeriods"))
    m.cpu.throttling.throttled_time = _u64(throttling.get("throttledTime"))
    memory = data.get("memory") or {}
    raw = memory.get("raw") or {}
    fields = m.memory.DESCRIPTOR.fields_by_name
    for name, value in raw.items():
        field = V1_RENAMED.get(name, name)
        if field in fields and fields[field].type == fields[field].TYPE_UINT64:
            setattr(m.memory, field, _u64(value))
    m.memory.cache = _u64(memory.get("cache", raw.get("cache")))
    for field, key in (("usage", "usage"), ("swap", "swap"), ("kernel", "kernel"),
                       ("kernel_tcp", "kernelTCP")):
        entry = memory.get(key) or {}
        target = getattr(m.memory, field)
        target.usage = _u64(entry.get("usage"))
        target.max = _u64(entry.get("max"))
        target.limit = _u64(entry.get("limit"))
        target.failcnt = _u64(entry.get("failcnt"))
    return m


def v2_metrics(stats: dict):
    from runtimed.api.cgroups.v2.stats import metrics_pb2

    data = stats.get("data", stats)
    m = metrics_pb2.Metrics()
    pids = data.get("pids") or {}
    m.pids.current = _u64(pids.get("current"))
    m.pids.limit = _u64(pids.get("limit"))
    cpu = data.get("cpu") or {}
    usage = cpu.get("usage") or {}
    m.cpu.usage_usec = _u64(usage.get("total")) // 1000
    m.cpu.user_usec = _u64(usage.get("user")) // 1000
    m.cpu.system_usec = _u64(usage.get("kernel")) // 1000
    throttling = cpu.get("throttling") or {}
    m.cpu.nr_periods = _u64(throttling.get("periods"))
    m.cpu.nr_throttled = _u64(throttling.get("throttledPeriods"))
    m.cpu.throttled_usec = _u64(throttling.get("throttledTime")) // 1000
    memory = data.get("memory") or {}
    raw = memory.get("raw") or {}
    for name, value in raw.items():
        if name in m.memory.DESCRIPTOR.fields_by_name:
            setattr(m.memory, name, _u64(value))
    usage = memory.get("usage") or {}
    m.memory.usage = _u64(usage.get("usage"))
    m.memory.usage_limit = _u64(usage.get("limit"))
    swap = memory.get("swap") or {}
    m.memory.swap_usage = _u64(swap.get("usage"))
    m.memory.swap_limit = _u64(swap.get("limit"))
    events = memory.get("events") or {}
    for name in ("low", "high", "max", "oom", "oom_kill"):
        setattr(m.memory_events, name, _u64(events.get(name)))
    return m


def stats_to_any(stats: dict, v2: bool = False) -> any_pb2.Any:
    metrics = v2_metrics(stats) if v2 else v1_metrics(stats)
    packed = any_pb2.Any()
    packed.type_url = metrics.DESCRIPTOR.full_name
    packed.value = metrics.SerializeToString()
    return packed
