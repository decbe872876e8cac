"""Event fan-out load: subscribers in their own processes, so the figure is the daemon's.

With the subscribers as threads of the benchmark process, one interpreter parsed every
delivery of every stream under one GIL and the publisher waited its turn: the client was
the limit, not the daemon. Here each subscriber is a process running `python -m
bench.events ADDRESS TOPIC COUNT` (one connection, one Events.Subscribe); the parent only
publishes (grpcio). The publish time (CLOCK_MONOTONIC, one clock for every process)
travels in the event itself (TaskExit.exited_at), so each subscriber measures its own
publish→delivery latency.

Subscribers read with ctl's standard-library gRPC client (ctl/client/wire.py), the same
code for both daemons: it reads frames in the iterating thread, where grpcio's sync
stream hands every message between its C core's threads. Measured here (10 subscribers,
2000 events, 16 publishes in flight), the subscribers spent ~10-15 µs of CPU per delivery
with it and ~70-90 µs with grpcio, the publisher (grpcio futures) ~8-10 µs per delivery
and each daemon ~5-12 µs: with grpcio subscribers the two cores went to the clients.
The clients still share the machine with the daemon, so delivered/s moves with their
cost too; the daemon's own CPU per delivery (`cpu_per_delivery`) is the figure that is
the daemon's alone.

Child protocol, one line each on stdout: `open` once its stream is started, `probe` at
the first probe event (the subscription has reached the daemon: the parent publishes
probes until every subscriber says so), then a JSON object with what it received. A child
exits by itself when its stdin closes, so it cannot outlive the parent.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROBE = "probe"  # TaskExit.id of the events that only check a subscription is live
TYPE_URL = "containerd.events.TaskExit"


# ---- subscriber (child process) -------------------------------------------------------

def _subscriber(address: str, topic: str, count: int) -> None:
    from ctl.client.wire import Channel
    from runtimed.api.containerd.events import task_pb2
    from runtimed.api.containerd.services.events.v1 import events_pb2

    def parent_gone() -> None:
        while os.read(0, 4096):  # unbuffered: no lock left held at interpreter exit
            pass
        os._exit(0)  # EOF: the parent closed our stdin, or died

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C is the parent's to handle; it kills us
    threading.Thread(target=parent_gone, daemon=True).start()
    out = sys.stdout
    channel = Channel(address)
    call = channel.call("/containerd.services.events.v1.Events/Subscribe",
                        events_pb2.SubscribeRequest(filters=[f'topic=="{topic}"']).SerializeToString(),
                        [])
    out.write("open\n")
    out.flush()
    latencies: list[int] = []  # ns
    probed = False
    clock = time.monotonic_ns
    envelope_of = events_pb2.Envelope.FromString
    exit_of = task_pb2.TaskExit.FromString
    cpu = last = 0
    for message in call:
        now = clock()
        event = exit_of(envelope_of(message).event.value)
        if event.id == PROBE:
            if not probed:
                probed = True
                out.write("probe\n")
                out.flush()
            continue
        if not latencies:
            cpu = time.process_time()
        last = now
        latencies.append(now - event.exited_at.ToNanoseconds())
        if len(latencies) == count:
            break
    cpu = time.process_time() - cpu
    call.cancel()
    out.write(json.dumps({"received": len(latencies), "last": last, "cpu": cpu,
                          "latencies": latencies}) + "\n")
    out.flush()
    channel.close()


# ---- driver (benchmark process) -------------------------------------------------------

@contextlib.contextmanager
def subscribers(address: str, topic: str, count: int, n: int) -> Iterator[list[subprocess.Popen]]:
    """`n` subscriber processes, each expecting `count` events on `topic`; every one is
    killed and reaped on the way out, whatever happened."""
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "bench.events", address, topic, str(count)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO))
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for proc in procs:
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):
                    pipe.close()


def _lines(procs: list[subprocess.Popen], want: str | None, until: float,
           between=None) -> list[str]:
    """One line from each child: the line `want` (or any line when None), read as they
    come; `between()` runs whenever no child spoke for 20 ms. (A child writes its next
    line only after the parent's next step, so no line waits unseen in a read buffer.)"""
    got: dict[int, str] = {}
    with selectors.DefaultSelector() as sel:
        for i, proc in enumerate(procs):
            sel.register(proc.stdout, selectors.EVENT_READ, i)
        while len(got) < len(procs):
            if time.monotonic() > until:
                raise TimeoutError(f"event subscribers: {len(got)} of {len(procs)} "
                                   f"answered {want or 'results'} in time")
            ready = sel.select(0.02)
            if not ready and between:
                between()
            for key, _ in ready:
                i = key.data
                line = procs[i].stdout.readline().decode()
                if not line:
                    raise RuntimeError(f"event subscriber {i} exited ({procs[i].wait()}) "
                                       f"before {want or 'its results'}")
                if want is None or line.strip() == want:
                    got[i] = line
                    sel.unregister(procs[i].stdout)
    return [got[i] for i in range(len(procs))]


def _cpu_seconds(pid: int) -> float:
    """CPU time of a process: the sum over its threads of the scheduler's runtime (ns;
    /proc/PID/stat counts in 10 ms ticks, a sixth of a run's daemon CPU). Both daemons
    keep their threads (the event loop and its executor; Go's Ms), so no thread that
    ran in the window is missing from the sum."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:  # gone since listed
            pass
    return total / 1e9


def run(channel, address: str, daemon_pid: int, topic: str, *, subscribers_n: int = 10,
        events: int = 1000, window: int = 1, interval: float = 0.0,
        timeout: float = 60.0) -> dict[str, float]:
    """Publish `events` TaskExit events on `topic` (at most `window` Publish calls in flight,
    at least `interval` s apart) to `subscribers_n` subscriber processes that each must
    get all of them. Returns delivered/s over all subscribers (first publish to last
    delivery), the median publish→delivery latency in seconds, and CPU seconds per
    delivery of the daemon, of the subscribers together (from their first event on) and
    of this process (publishing)."""
    import statistics

    from runtimed.api.containerd.events import task_pb2
    from runtimed.api.containerd.services.events.v1 import events_pb2, events_pb2_grpc

    stub = events_pb2_grpc.EventsStub(channel)
    md = [("containerd-namespace", "bench")]

    def request(seq: int, event_id: str = "") -> events_pb2.PublishRequest:
        message = task_pb2.TaskExit(id=event_id, pid=seq)
        message.exited_at.FromNanoseconds(time.monotonic_ns())
        req = events_pb2.PublishRequest(topic=topic)
        req.event.type_url = TYPE_URL
        req.event.value = message.SerializeToString()
        return req

    until = time.monotonic() + timeout
    with subscribers(address, topic, events, subscribers_n) as procs:
        _lines(procs, "open", until)
        _lines(procs, "probe", until,
               between=lambda: stub.Publish(request(0, PROBE), metadata=md))
        cpu = _cpu_seconds(daemon_pid)
        own_cpu = time.process_time()
        start = time.monotonic_ns()
        in_flight: deque = deque()
        next_at = time.monotonic()
        try:
            for seq in range(events):
                if interval:
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    next_at += interval
                if len(in_flight) >= window:
                    in_flight.popleft().result()
                in_flight.append(stub.Publish.future(request(seq), metadata=md))
            while in_flight:
                in_flight.popleft().result()
            own_cpu = time.process_time() - own_cpu
        finally:  # a call left behind would hold up the channel's close for good
            for future in in_flight:
                future.cancel()
        results = [json.loads(line) for line in _lines(procs, None, until)]
        cpu = _cpu_seconds(daemon_pid) - cpu
    delivered = sum(r["received"] for r in results)
    if delivered != events * subscribers_n:
        raise RuntimeError(f"event subscribers got {delivered} of {events * subscribers_n} events")
    elapsed = (max(r["last"] for r in results) - start) / 1e9
    latencies = [ns for r in results for ns in r["latencies"]]
    return {"throughput": delivered / elapsed, "latency": statistics.median(latencies) / 1e9,
            "cpu_per_delivery": cpu / delivered,
            "subscriber_cpu_per_delivery": sum(r["cpu"] for r in results) / delivered,
            "publisher_cpu_per_delivery": own_cpu / delivered}


if __name__ == "__main__":
    _subscriber(sys.argv[1], sys.argv[2], int(sys.argv[3]))
