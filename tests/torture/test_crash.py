"""Crash safety: runtimed killed with SIGKILL at random moments of content writes, image
import (unpack), container create, task start, delete and garbage collection; after each
restart the metadata is consistent, no blob is corrupt, nothing is orphaned, the
containers that ran still run and every exit status is known. A shim killed with SIGKILL:
its task is reported exited with 255 and cleaned up.

The CI variant injects one crash per operation; the `slow` variant 100 at random.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import tempfile
import time

import grpc
import pytest

from runtimed.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from runtimed.api.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from runtimed.api.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from runtimed.api.containerd.types.task import task_pb2
from tests import testimages
from tests.torture import stats
from tests.torture.conftest import namespace_cgroups
from tests.torture.helpers import (
    blob_path,
    corrupt_blobs,
    list_content,
    list_tasks,
    md,
    metadata_problems,
    orphan_problems,
    version,
)

IMAGE = testimages.BUSYBOX_NAME
# how long after starting an operation the crash may come (seconds): about its duration
WINDOWS = {"content": 0.6, "import": 1.2, "gc": 0.6, "create": 0.6, "start": 0.9,
           "delete": 0.9}
OPERATIONS = list(WINDOWS)


def daemon_log(daemon, lines: int = 40) -> str:
    """The end of runtimed's log without grpc's per-call debug chatter."""
    text = [line for line in daemon.log_text().splitlines() if "grpc._cython" not in line]
    return "\n".join(text[-lines:])


class Crasher:
    """Runs one operation through the real `ctr`, kills runtimed during it, restarts it and
    checks everything a crash must not break."""

    def __init__(self, daemon, ns: str, archive: str, rng: random.Random):
        self.daemon = daemon
        self.ns = ns
        self.archive = archive
        self.rng = rng
        self.serial = 0
        self.keep_pid = 0
        self.log: list[str] = []

    def ctr(self, *args: str, check: bool = True, input: bytes | None = None):
        return self.daemon.ctr(*args, namespace=self.ns, check=check, input=input)

    def spawn(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(self.daemon.ctr_command(*args, namespace=self.ns),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)

    def spawn_sh(self, script: str) -> subprocess.Popen:
        ctr = f"ctr -a {self.daemon.address} -n {self.ns}"
        return subprocess.Popen(["sh", "-c", script.replace("CTR", ctr)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    # ---- setup ---------------------------------------------------------------------

    def setup(self) -> None:
        self.ctr("images", "import", self.archive)
        self.ctr("run", "-d", IMAGE, "keep", "sleep", "100000")
        self.ctr("run", "-d", IMAGE, "exit7", "sh", "-c", "exit 7")
        self.keep_pid = self._task("keep").pid
        for _ in range(100):
            if self._task("exit7").status == task_pb2.STOPPED:
                break
            time.sleep(0.05)

    def _task(self, id: str):
        with self.daemon.channel() as channel:
            return list_tasks(channel, [self.ns])[(self.ns, id)]

    def _has_image(self) -> bool:
        return IMAGE in self.ctr("images", "ls", "-q").stdout.split()

    def _ensure_image(self) -> None:
        if not self._has_image():
            self.ctr("images", "import", self.archive)

    # ---- one crash -----------------------------------------------------------------

    def inject(self, op: str) -> None:
        self.serial += 1
        n = self.serial
        proc, finish = getattr(self, f"_op_{op}")(n)
        delay = self.rng.uniform(0, WINDOWS[op])
        time.sleep(delay)
        self.daemon.kill9()
        stats.record("crashes")
        self.daemon.start()
        try:  # containerd's client waits for the daemon to come back, then carries on
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"ctr hung after the crash in {op} #{n}") from None
        self.log.append(f"{op}#{n} killed after {delay:.3f}s (ctr exit {proc.returncode})")
        self.verify(f"after crash in {op} #{n} at {delay:.3f}s")
        finish()
        self.verify(f"after finishing {op} #{n}")

    def _op_content(self, n: int):
        data = random.Random(n).randbytes(12 << 20)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        args = ("content", "ingest", "--expected-size", str(len(data)),
                "--expected-digest", digest, f"blob-{n}")
        proc = subprocess.Popen(["ctr", "-a", self.daemon.address, "-n", self.ns, *args],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)

        def feed():
            try:
                proc.stdin.write(data)
                proc.stdin.close()
            except BrokenPipeError:
                pass

        import threading

        threading.Thread(target=feed, daemon=True).start()

        def finish():
            # resumes (seeking its input to the ingest's offset: a file, not a pipe) or
            # starts over
            with tempfile.TemporaryFile() as f:
                f.write(data)
                f.seek(0)
                done = subprocess.run(["ctr", "-a", self.daemon.address, "-n", self.ns, *args],
                                      stdin=f, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            assert digest in self.ctr("content", "ls", "-q").stdout.split()
            self.ctr("content", "rm", digest)

        return proc, finish

    def _op_import(self, n: int):
        def finish():
            self.ctr("images", "import", self.archive)
            self.ctr("run", "--rm", IMAGE, f"check-{n}", "true")  # unpacked and usable

        return self.spawn("images", "import", self.archive), finish

    def _op_gc(self, n: int):
        self._ensure_image()

        def finish():
            self.ctr("images", "rm", "--sync", IMAGE, check=False)
            assert not self._has_image()
            self.ctr("images", "import", self.archive)

        return self.spawn("images", "rm", "--sync", IMAGE), finish

    def _op_create(self, n: int):
        self._ensure_image()
        id = f"c{n}"
        return self.spawn("containers", "create", IMAGE, id, "sleep", "100000"), \
            lambda: self._remove(id)

    def _op_start(self, n: int):
        self._ensure_image()
        id = f"s{n}"
        self.ctr("containers", "create", IMAGE, id, "sleep", "100000")

        def finish():
            with self.daemon.channel() as channel:
                task = list_tasks(channel, [self.ns]).get((self.ns, id))
            if task is None:
                self.ctr("tasks", "start", "-d", id)
            elif task.status == task_pb2.CREATED:
                self.ctr("tasks", "start", "-d", id, check=False)  # ctr makes a new one
                self.ctr("tasks", "rm", "-f", id, check=False)
                self.ctr("tasks", "start", "-d", id)
            assert self._task(id).status == task_pb2.RUNNING
            self._remove(id)

        return self.spawn("tasks", "start", "-d", id), finish

    def _op_delete(self, n: int):
        self._ensure_image()
        id = f"d{n}"
        self.ctr("run", "-d", IMAGE, id, "sleep", "100000")
        proc = self.spawn_sh(f"CTR tasks rm -f {id} && CTR containers rm {id}")
        return proc, lambda: self._remove(id)

    def _remove(self, id: str) -> None:
        """Remove a container whatever state the crash left it in; that must work."""
        for _ in range(50):
            result = self.ctr("tasks", "rm", "-f", id, check=False)
            if result.returncode == 0 or "not found" in result.stderr:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"task {id} cannot be removed: {result.stderr}")
        result = self.ctr("containers", "rm", id, check=False)
        assert result.returncode == 0 or "not found" in result.stderr, result.stderr
        assert id not in self.ctr("containers", "ls", "-q").stdout.split()
        assert not (self.daemon.state / "tasks" / self.ns / id).exists()

    # ---- what must hold after every restart ----------------------------------------

    def verify(self, when: str, keepers: bool = True) -> None:
        root, state = self.daemon.root, self.daemon.state
        with self.daemon.channel() as channel:
            assert version(channel)
            problems = metadata_problems(channel, root)
            problems += [f"corrupt blob {d}" for d in corrupt_blobs(root)]
            tasks = list_tasks(channel, [self.ns])
            problems += orphan_problems(self.daemon.base, state, tasks)
            ids = {id for _, id in tasks}
            problems += [f"orphaned cgroup {child}" for parent in namespace_cgroups(self.ns)
                         for child in parent.iterdir() if child.is_dir() and child.name not in ids]
            if keepers:
                problems += self._keeper_problems(tasks)
            stub = tasks_pb2_grpc.TasksStub(channel)
            for (_, id), task in tasks.items():
                if task.status != task_pb2.STOPPED:
                    continue
                waited = stub.Wait(tasks_pb2.WaitRequest(container_id=id), metadata=md(self.ns),
                                   timeout=10)
                if waited.exit_status != task.exit_status:
                    problems.append(f"{id}: Wait says {waited.exit_status}, "
                                    f"Get says {task.exit_status}")
        if problems:
            stats.record("leaks", len(problems))
        assert not problems, f"{when}: {problems}\n{self.log}\n{daemon_log(self.daemon)}"

    def _keeper_problems(self, tasks) -> list[str]:
        problems = []
        keep = tasks.get((self.ns, "keep"))
        if keep is None or keep.status != task_pb2.RUNNING or keep.pid != self.keep_pid:
            problems.append(f"container 'keep' no longer runs as before: {keep}")
        exit7 = tasks.get((self.ns, "exit7"))
        if exit7 is None or exit7.status != task_pb2.STOPPED or exit7.exit_status != 7:
            problems.append(f"exit status of 'exit7' lost: {exit7}")
        return problems

    def teardown(self) -> None:
        ids = self.ctr("containers", "ls", "-q", check=False).stdout.split()
        for id in ids:
            self._remove(id)


def run_crashes(daemon, ns, archive, operations: list[str], seed: int) -> None:
    crasher = Crasher(daemon, ns, archive, random.Random(seed))
    crasher.setup()
    try:
        for op in operations:
            crasher.inject(op)
    finally:
        crasher.teardown()
    crasher.verify("at the end", keepers=False)


def test_kill9_during_each_operation(daemon, ns, busybox_archive):
    rng = random.Random()
    operations = list(OPERATIONS)
    rng.shuffle(operations)
    run_crashes(daemon, ns, busybox_archive, operations, seed=rng.randrange(1 << 30))


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_kill9_soak(daemon, ns, busybox_archive):
    rng = random.Random()
    operations = [rng.choice(OPERATIONS) for _ in range(100)]
    run_crashes(daemon, ns, busybox_archive, operations, seed=rng.randrange(1 << 30))


def test_kill9_of_a_shim_reports_255_and_cleans_up(daemon, ns, busybox_archive):
    daemon.ctr("images", "import", busybox_archive, namespace=ns)
    daemon.ctr("run", "-d", IMAGE, "victim", "sleep", "100000", namespace=ns)
    daemon.ctr("run", "-d", IMAGE, "bystander", "sleep", "100000", namespace=ns)
    bundle = daemon.state / "tasks" / ns / "victim"
    shim_pid = int((bundle / "shim.pid").read_text())
    with daemon.channel() as channel:
        tasks = tasks_pb2_grpc.TasksStub(channel)
        init_pid = tasks.Get(tasks_pb2.GetRequest(container_id="victim"), metadata=md(ns)).process.pid
        waiter = tasks.Wait.future(tasks_pb2.WaitRequest(container_id="victim"),
                                   metadata=md(ns), timeout=60)
        time.sleep(0.2)
        os.kill(shim_pid, signal.SIGKILL)
        stats.record("crashes")
        assert waiter.result().exit_status == 255
        for _ in range(100):
            if not bundle.exists() and not os.path.exists(f"/proc/{init_pid}"):
                break
            time.sleep(0.05)
        assert not bundle.exists()
        assert not os.path.exists(f"/proc/{init_pid}")  # the container went with its shim
        with pytest.raises(grpc.RpcError) as info:
            tasks.Get(tasks_pb2.GetRequest(container_id="victim"), metadata=md(ns))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        listed = list_tasks(channel, [ns])
        assert listed[(ns, "bystander")].status == task_pb2.RUNNING
        assert orphan_problems(daemon.base, daemon.state, listed) == []
    daemon.ctr("containers", "rm", "victim", namespace=ns)
    daemon.ctr("tasks", "rm", "-f", "bystander", namespace=ns)
    daemon.ctr("containers", "rm", "bystander", namespace=ns)


def _write_blob(channel, ns: str, data: bytes, labels: dict[str, str],
                lease: str = "") -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    request = content_pb2.WriteContentRequest(
        action=content_pb2.COMMIT, ref=f"blob-{digest}", total=len(data), expected=digest,
        data=data, labels=labels)
    metadata = md(ns) + ((("containerd-lease", lease),) if lease else ())
    list(content_pb2_grpc.ContentStub(channel).Write(iter([request]), metadata=metadata,
                                                      timeout=30))
    return digest


LIST = "/containerd.services.content.v1.Content/List"


class _AfterList(grpc.UnaryStreamClientInterceptor):
    """Runs `then` once, after the first Content.List of `ns` answered and before its
    caller sees the answer."""

    def __init__(self, ns: str, then):
        self.ns, self.then = ns, then

    def intercept_unary_stream(self, continuation, details, request):
        replies = continuation(details, request)
        if self.then is None or details.method != LIST \
                or ("containerd-namespace", self.ns) not in (details.metadata or ()):
            return replies
        replies = list(replies)
        then, self.then = self.then, None
        then()
        return iter(replies)


def test_the_check_takes_a_blob_collected_meanwhile_for_gone_a_missing_file_for_broken(daemon, ns):
    """metadata_problems lists a namespace's content, then looks at the disk. The GC may
    collect a listed blob in between: test_kill9_during_each_operation failed once in CI
    so ('import#6 killed after 0.039s', then 'content sha256:94c5cb… listed but not on disk
    whole': the index `ctr images import` writes, which only its lease holds, collected
    100 ms after the import ends, when the check after it runs). Such a blob is not a
    problem; a listed blob whose file is gone still is. Fails on the old check (the
    collected blob was reported)."""
    root = {"containerd.io/gc.root": "1"}
    with daemon.channel() as channel:
        collected = _write_blob(channel, ns, b"collected" * 1000, {})
        broken = _write_blob(channel, ns, b"broken" * 1000, root)
        kept = _write_blob(channel, ns, b"kept" * 1000, root)
        content = content_pb2_grpc.ContentStub(channel)

        def collect_one_break_one():
            content.Delete(content_pb2.DeleteContentRequest(digest=collected), metadata=md(ns),
                           timeout=10)  # the GC runs 100 ms later
            for _ in range(200):
                if not blob_path(daemon.root, collected).exists():
                    break
                time.sleep(0.05)
            assert not blob_path(daemon.root, collected).exists()
            blob_path(daemon.root, broken).unlink()

        problems = metadata_problems(
            grpc.intercept_channel(channel, _AfterList(ns, collect_one_break_one)), daemon.root)
        assert problems == [f"{ns}: content {broken} listed but not on disk whole"]
        listed = {i.digest for reply in content.List(content_pb2.ListContentRequest(),
                                                     metadata=md(ns), timeout=10)
                  for i in reply.info}
        assert listed == {broken, kept}
        for digest in (broken, kept):
            content.Delete(content_pb2.DeleteContentRequest(digest=digest), metadata=md(ns),
                           timeout=10)


def _kill_when_it_opens(daemon, path) -> subprocess.Popen:
    """strace, attached to every thread of runtimed, kills it with SIGKILL as it opens
    `path` (and before the open is done)."""
    pid = daemon.proc.pid
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-p", str(pid), "-P", str(path), "-e", "trace=openat",
         "-e", "inject=openat:signal=SIGKILL"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(400):
        traced = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                status = open(f"/proc/{pid}/task/{tid}/status").read()
            except FileNotFoundError:
                continue
            traced.append(f"TracerPid:\t{tracer.pid}\n" in status)
        if traced and all(traced):
            return tracer
        time.sleep(0.05)
    tracer.kill()
    tracer.wait()
    raise AssertionError("strace did not attach to runtimed")


def _rows(daemon, digest: str) -> list[str]:
    """The namespaces whose content_blobs rows name `digest`, read from the database of a
    dead daemon."""
    db = sqlite3.connect(daemon.root / "meta.db")
    try:
        return [r[0] for r in db.execute(
            "SELECT namespace FROM content_blobs WHERE digest = ?", (digest,))]
    finally:
        db.close()


def _died_of_sigkill(daemon, tracer: subprocess.Popen) -> None:
    assert daemon.proc.wait(timeout=30) == -signal.SIGKILL
    tracer.wait(timeout=30)
    stats.record("crashes")


@pytest.mark.parametrize("moment", ["gc-after-unlink", "commit-after-rename"])
def test_kill9_where_a_blob_row_and_its_file_disagree(daemon, ns, moment):
    """The two moments where a blob's row and its file part before COMMIT: the GC has
    unlinked a collected blob (the row stays: rolled back), a commit has renamed the
    verified data into blobs/ (no row yet). runtimed is killed there (strace, at the next
    openat: the GC's scan of ingest/, the commit's fsync of blobs/sha256); the next start
    repairs either before it serves: nothing listed without its file, no file left that
    nothing names, and the blob can be written again."""
    data = moment.encode() * 2000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = blob_path(daemon.root, digest)
    with daemon.channel() as channel:
        if moment == "gc-after-unlink":
            leases = leases_pb2_grpc.LeasesStub(channel)
            leases.Create(leases_pb2.CreateRequest(id="held"), metadata=md(ns), timeout=10)
            _write_blob(channel, ns, data, {}, lease="held")
            tracer = _kill_when_it_opens(daemon, daemon.root / "content" / "ingest")
            leases.Delete(leases_pb2.DeleteRequest(id="held"), metadata=md(ns),
                          timeout=10)  # the blob is collected 100 ms later
        else:
            tracer = _kill_when_it_opens(daemon, path.parent)
            with pytest.raises(grpc.RpcError) as info:
                _write_blob(channel, ns, data, {})
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    _died_of_sigkill(daemon, tracer)
    # killed where meant: the row and the file disagree
    if moment == "gc-after-unlink":
        assert (_rows(daemon, digest), path.exists()) == ([ns], False)
    else:
        assert (_rows(daemon, digest), path.exists()) == ([], True)
    daemon.start()
    with daemon.channel() as channel:
        assert metadata_problems(channel, daemon.root) == []
        assert digest not in list_content(channel, ns)
        assert not path.exists()
        _write_blob(channel, ns, data, {"containerd.io/gc.root": "1"})
        assert list_content(channel, ns)[digest] == len(data)
        assert path.read_bytes() == data
        content_pb2_grpc.ContentStub(channel).Delete(
            content_pb2.DeleteContentRequest(digest=digest), metadata=md(ns), timeout=10)
