"""Layers applied ahead of their Diff.Apply, while the client is still sending the image.

`ctr images import` (and the Go client generally) streams every blob through Content.Write,
one reply per MiB, and only then prepares a snapshot and calls Diff.Apply layer after
layer. While a blob streams in, the daemon waits for the client most of the time (the
client hashes and frames each MiB before it sends it). So a blob that looks like a layer
is applied while it arrives (followed write by write; a blob not followed, at its
commit) by a helper process (`runtimed/diff/stager.py`) into a private directory
(`<tmpmounts>/.staged/`); when Diff.Apply then asks for that blob onto an empty target,
the staged tree is renamed into place instead of being extracted again.

The staged tree is exactly what an apply would have written, or it is not used:

- it is applied in overlay mode with no lower layers. Onto an overlay upper directory
  that is the same tree, except for parent directories the layer lacks: an apply over
  lower layers gives them the attributes the lowers have, and so they are given them
  before the move (`apply.adopt_parents`);
- onto a plain directory (a bind mount: a first layer), whiteouts delete instead of
  being recorded, so a layer with whiteouts is extracted again;
- the target must be empty and on the same filesystem (one rename); its own owner, mode
  and extended attributes are kept, as an apply leaves the root alone;
- the namespace must hold the blob (checked by the differ before it asks), and the diff
  ID and size come from the same bytes.

A staged tree nobody asked for is removed after `ttl` seconds; at most `max_entries`
wait at a time, and nothing is staged when the filesystem is short of space. A crash
leaves only the directory, which the differ empties at start.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

from runtimed.diff import compression
from runtimed.diff.apply import ApplyResult, adopt_parents
from runtimed.diff.stager import NICENESS

log = logging.getLogger("runtimed.diff.staging")

STAGED_DIR = ".staged"
MIN_FREE_BYTES = 4 << 30
WAIT_TIMEOUT = 300.0  # Diff.Apply waits this long at most for a staging still running


def looks_like_layer(head: bytes) -> bool:
    """gzip or zstd data, or a tar (its first header's magic): what a layer blob is."""
    return compression.detect(head) != compression.NONE or head[257:262] == b"ustar"


def _head(path: str | os.PathLike) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(512)
    except OSError:
        return b""


class _Entry:
    def __init__(self, job: int, digest: str | None, root: str):
        self.job = job
        self.digest = digest  # None while its ingest is followed
        self.dir = root  # where the stager applies it
        self.fd: int | None = None  # the blob or ingest file, open for the stager
        self.following = False
        self.orphan = False  # committed as a digest staged already: dropped when done
        self.state = "running"  # -> done | failed
        self.done = threading.Event()
        self.root: str | None = None  # the staged tree, once done and until used
        self.result: ApplyResult | None = None


class _Follower:
    """What an announced ingest tells about itself (see ContentStore.add_ingest_hook)."""

    def __init__(self, staged: StagedLayers, entry: _Entry):
        self.staged = staged
        self.entry = entry

    def grow(self, offset: int) -> None:
        self.staged._send({"op": "grow", "id": self.entry.job, "limit": offset})

    def committed(self, digest: str) -> None:
        self.staged._name(self.entry, digest)
        self.staged._send({"op": "final", "id": self.entry.job})

    def abandon(self) -> None:
        self.staged._send({"op": "abandon", "id": self.entry.job})


class StagedLayers:
    """Stages through a helper process (`python -m runtimed.diff.stager`), started at the
    first layer and again after it died; it exits when the daemon does (its stdin
    closes)."""

    def __init__(self, directory: str | os.PathLike, ttl: float = 120.0, max_entries: int = 16):
        self.dir = Path(directory)
        self.ttl = ttl
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}  # committed blobs, staged or being staged
        self._jobs: dict[int, _Entry] = {}  # what the stager works on
        self._following = 0  # ingests being staged as they arrive, not committed yet
        self._next_job = 0
        self._helper: subprocess.Popen | None = None
        self._send_lock = threading.Lock()

    # -- the helper process -------------------------------------------------------------

    def _start(self, entry: _Entry, path: str) -> None:
        # the ingest's name goes at its commit, maybe before the stager opens it: it opens
        # the daemon's descriptor instead, kept until the stager answers
        entry.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        path = f"/proc/{os.getpid()}/fd/{entry.fd}"
        with self._send_lock:
            if self._helper is None or self._helper.poll() is not None:
                self._helper = subprocess.Popen(
                    [sys.executable, "-m", "runtimed.diff.stager"], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, text=True, close_fds=True)
                # a stager that stops reading must not stall the Write calls telling it
                # of their progress: a full pipe ends it instead (see _write)
                os.set_blocking(self._helper.stdin.fileno(), False)
                threading.Thread(target=self._read, args=(self._helper,), name="layer-stager",
                                 daemon=True).start()
            started = self._write({"op": "start", "id": entry.job, "path": path,
                                   "root": entry.dir})
        if not started:  # it exited just now (idle): no reader may answer for it
            with self._lock:
                mine = self._jobs.pop(entry.job, None) is not None
            if mine:
                self._finish(entry, None, "the stager exited")

    def _send(self, message: dict) -> None:
        with self._send_lock:
            self._write(message)

    def _write(self, message: dict) -> bool:
        helper = self._helper
        if helper is None:
            return False
        line = (json.dumps(message) + "\n").encode()
        try:
            written = os.write(helper.stdin.fileno(), line)
        except (OSError, ValueError):
            written = -1  # it died (its reader fails what it had) or its pipe is full
        if written != len(line):
            helper.kill()  # its reader then fails what it had; the next layer starts another
            return False
        return True

    def _read(self, helper: subprocess.Popen) -> None:
        for line in helper.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                entry = self._jobs.pop(message.get("id"), None)
            if entry is not None:
                result = message.get("result") if message.get("ok") else None
                self._finish(entry, ApplyResult(**result) if result else None,
                             message.get("error", ""))
        helper.wait()
        with self._lock:
            mine = [e for e in self._jobs.values() if e.state == "running"]
            for entry in mine:
                del self._jobs[entry.job]
        for entry in mine:
            self._finish(entry, None, "the stager exited")

    @staticmethod
    def _renice(helper: subprocess.Popen | None, niceness: int) -> None:
        if helper is None:
            return
        try:
            threads = os.listdir(f"/proc/{helper.pid}/task")  # niceness is per thread
        except OSError:
            return
        for tid in threads:
            try:
                os.setpriority(os.PRIO_PROCESS, int(tid), niceness)
            except OSError:
                pass  # gone, or not ours to raise (without CAP_SYS_NICE): it only waits longer

    def close(self) -> None:
        """Stop the helper (the daemon needs not: its exit closes the pipe)."""
        with self._send_lock:
            helper, self._helper = self._helper, None
        if helper is not None:
            helper.stdin.close()
            try:
                helper.wait(10)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait()

    # -- staging ------------------------------------------------------------------------

    def follow(self, path: str | os.PathLike, head: bytes) -> _Follower | None:
        """An ingest starts (its data file `path`, its first bytes `head`): stage it as it
        arrives if it looks like a layer, so the staging ends about when the commit does.
        The follower learns of every write and of the commit. Never raises."""
        try:
            if not looks_like_layer(head) or not self._room():
                return None
            entry = self._new(None)
            if entry is None:
                return None
            entry.following = True
            self._start(entry, os.fspath(path))
            return _Follower(self, entry)
        except Exception:  # noqa: BLE001 - an optimisation: never fail the write for it
            log.exception("following ingest %s", path)
            return None

    def _new(self, digest: str | None) -> _Entry | None:
        with self._lock:
            if digest is not None and digest in self._entries:
                return None
            if len(self._entries) + self._following >= self.max_entries:
                return None
            self._next_job += 1
            entry = _Entry(self._next_job, digest, str(self.dir / os.urandom(8).hex()))
            os.mkdir(entry.dir, 0o755)
            self._jobs[entry.job] = entry
            if digest is None:
                self._following += 1
            else:
                self._entries[digest] = entry
            return entry

    def _name(self, entry: _Entry, digest: str) -> None:
        """A followed ingest was committed as `digest`: Diff.Apply can find its staging."""
        with self._lock:
            if not entry.following:
                return  # its staging failed already
            self._following -= 1
            entry.following = False
            entry.digest = digest
            if digest in self._entries:
                entry.orphan = True  # staged already (the same blob in another namespace)
                return
            self._entries[digest] = entry

    def offer(self, digest: str, path: str | os.PathLike) -> None:
        """A blob was just committed: stage it if it looks like a layer and was not
        followed while it was written. Never raises."""
        try:
            with self._lock:
                if digest in self._entries:
                    return
            if not looks_like_layer(_head(path)) or not self._room():
                return
            entry = self._new(digest)
            if entry is None:
                return
            self._start(entry, os.fspath(path))
            self._send({"op": "grow", "id": entry.job, "limit": os.stat(path).st_size})
            self._send({"op": "final", "id": entry.job})
        except Exception:  # noqa: BLE001 - an optimisation: never fail the commit for it
            log.exception("staging layer %s", digest)

    def _room(self) -> bool:
        self.dir.mkdir(mode=0o700, exist_ok=True)
        st = os.statvfs(self.dir)
        return st.f_bavail * st.f_frsize >= MIN_FREE_BYTES

    def _finish(self, entry: _Entry, result: ApplyResult | None, error: str) -> None:
        if entry.fd is not None:
            os.close(entry.fd)
            entry.fd = None
        with self._lock:
            if entry.following:  # never committed
                entry.following = False
                self._following -= 1
                result = None
            keep = result is not None and not entry.orphan
            entry.result = result
            entry.state = "done" if keep else "failed"
            if keep:
                entry.root = entry.dir
        if not keep:
            log.debug("layer %s not staged: %s", entry.digest, error or "dropped")
            shutil.rmtree(entry.dir, ignore_errors=True)
        entry.done.set()
        timer = threading.Timer(self.ttl, self._expire, (entry,))
        timer.daemon = True
        timer.start()

    def _expire(self, entry: _Entry) -> None:
        with self._lock:
            if entry.digest is None or self._entries.get(entry.digest) is not entry:
                return  # taken
            del self._entries[entry.digest]
        self._discard(entry)

    @staticmethod
    def _discard(entry: _Entry) -> None:
        if entry.root is not None:
            shutil.rmtree(entry.root, ignore_errors=True)
            entry.root = None

    # -- use ----------------------------------------------------------------------------

    def apply(self, digest: str, target: str, lowers: list[str], overlay: bool) -> ApplyResult | None:
        """Put the staged tree of blob `digest` in place of the empty directory `target`
        (an overlay upper over `lowers`, or with `overlay` False a plain directory) and
        return its apply result; None when there is none or it would differ from an
        apply, and the caller extracts the layer itself."""
        with self._lock:
            entry = self._entries.pop(digest, None)
            if entry is None:
                return None
        if not entry.done.is_set():
            # the caller waits for it now: the stager's low priority would slow it down
            helper = self._helper
            self._renice(helper, 0)
            finished = entry.done.wait(WAIT_TIMEOUT)
            self._renice(helper, NICENESS)
            if not finished:
                self._send({"op": "abandon", "id": entry.job})
                return None
        try:
            result = entry.result
            if entry.state != "done" or result is None:
                return None
            if not overlay and result.whiteouts:
                return None
            if os.listdir(target):
                return None
            st = os.stat(target)
            if st.st_dev != os.stat(entry.root).st_dev:
                return None
            if overlay and result.made_parents and lowers:
                if result.rewrote_parent:
                    return None
                if not adopt_parents(entry.root, result.made_parents, lowers):
                    return None
            os.chown(entry.root, st.st_uid, st.st_gid)
            os.chmod(entry.root, stat.S_IMODE(st.st_mode))
            for key in os.listxattr(target):
                os.setxattr(entry.root, key, os.getxattr(target, key))
            os.rename(entry.root, target)  # replaces the empty directory in one step
            entry.root = None
            return result
        except OSError as exc:
            log.debug("staged layer %s not used: %s", digest, exc)
            return None
        finally:
            self._discard(entry)

    def pending(self) -> int:
        with self._lock:
            return len(self._entries)

    @staticmethod
    def repair(directory: str | os.PathLike) -> None:
        """Remove what a crash left staged."""
        shutil.rmtree(directory, ignore_errors=True)

