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

A staging that fails or is dropped (its ingest restarted, was closed or was committed as
a blob staged already) is removed at once; a finished one nobody asked for after `ttl`
seconds. At most `max_entries` directories exist at a time, and nothing is staged when
the filesystem is short of space. Who removes a directory, once no stager writes into it:
`_finish` when the staging is dropped, else whoever takes it out of `_entries` (Diff.Apply,
the TTL's timer, `close`).

A crash leaves at most `.staged/`, which the differ removes at start. A stager whose
daemon died removes the directories it was applying into before it exits (a daemon
restarted at once could empty `.staged/` while it still wrote). A stager killed writes
no more, and the daemon removes what it was staging when its pipe closes.
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
from dataclasses import dataclass, field
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


@dataclass(eq=False)
class _Entry:
    """One staging. Its directory exists while it is in `StagedLayers._entries`."""

    job: int
    digest: str | None  # None until its ingest is committed, or when nobody will use it
    dir: str  # where the stager applies it
    helper: subprocess.Popen | None = None  # the stager it was sent to
    fd: int | None = None  # the blob or ingest file, open for the stager until it answers
    done: threading.Event = field(default_factory=threading.Event)  # the stager answered
    result: ApplyResult | None = None  # set when done if the tree is kept
    claimed: bool = False  # Diff.Apply took it: no other may, and no timer removes it
    timer: threading.Timer | None = None  # removes it unused after the TTL


class _Follower:
    """What an announced ingest tells about itself (see ContentStore.add_ingest_hook)."""

    def __init__(self, staged: StagedLayers, entry: _Entry):
        self.staged = staged
        self.entry = entry

    def grow(self, offset: int) -> None:
        self.staged._tell(self.entry, {"op": "grow", "id": self.entry.job, "limit": offset})

    def committed(self, digest: str) -> None:
        self.staged._name(self.entry, digest)

    def abandon(self) -> None:
        self.staged._tell(self.entry, {"op": "abandon", "id": self.entry.job})


class StagedLayers:
    """Stages through a helper process (`python -m runtimed.diff.stager`), started at the
    first layer and again after it died; it exits when the daemon does (its stdin
    closes)."""

    def __init__(self, directory: str | os.PathLike, ttl: float = 120.0, max_entries: int = 16):
        self.dir = Path(directory)
        self.ttl = ttl
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: dict[int, _Entry] = {}  # by job: every staging that has a directory
        self._next_job = 0
        self._helper: subprocess.Popen | None = None  # the stager new stagings go to
        self._send_lock = threading.Lock()

    # -- the helper process -------------------------------------------------------------

    def _start(self, entry: _Entry, path: str, **fields) -> None:
        try:
            # the ingest's name goes at its commit, maybe before the stager opens it: it
            # opens the daemon's descriptor instead, kept until the stager answers
            entry.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            message = {"op": "start", "id": entry.job, "path": f"/proc/{os.getpid()}/fd/{entry.fd}",
                       "root": entry.dir, **fields}
            with self._send_lock:
                if self._helper is None or self._helper.poll() is not None:
                    self._helper = self._spawn()
                entry.helper = self._helper
                started = self._write(entry.helper, message)
        except Exception as exc:  # noqa: BLE001 - an optimisation: the layer is extracted
            log.warning("staging layer %s: %s", entry.digest, exc)
            started = False
        if not started:
            # gone just now (idle) or never started: no reader may answer for it (if one
            # does, _finish ignores the second answer)
            self._finish(entry, None, "the stager did not take it")

    def _spawn(self) -> subprocess.Popen:
        helper = subprocess.Popen([sys.executable, "-m", "runtimed.diff.stager"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        # a stager that stops reading must not stall the Write calls telling it of their
        # progress: a full pipe ends it instead (see _write)
        os.set_blocking(helper.stdin.fileno(), False)
        threading.Thread(target=self._read, args=(helper,), name="layer-stager",
                         daemon=True).start()
        return helper

    def _tell(self, entry: _Entry, message: dict) -> None:
        if not entry.done.is_set():
            with self._send_lock:
                self._write(entry.helper, message)

    @staticmethod
    def _write(helper: subprocess.Popen | None, message: dict) -> bool:
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
        """Answers of `helper` until it exits; then what it still had fails (only what
        was sent to it: a stager started after it died may be at work already)."""
        for line in helper.stdout:
            try:
                message = json.loads(line)
                job = message["id"]
                result = ApplyResult(**message["result"]) if message["ok"] else None
            except (ValueError, KeyError, TypeError):
                continue
            with self._lock:
                entry = self._entries.get(job)
            if entry is not None and entry.helper is helper:
                self._finish(entry, result, message.get("error", ""))
        helper.wait()
        with self._lock:
            left = [e for e in self._entries.values() if e.helper is helper and not e.done.is_set()]
        for entry in left:
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
        """Stop the helper and remove what is staged (the daemon needs not: its exit
        closes the pipe, and its next start empties the directory)."""
        with self._send_lock:
            helper, self._helper = self._helper, None
        if helper is not None:
            helper.stdin.close()
            try:
                helper.wait(10)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait()
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            self._finish(entry, None, "closed")  # its reader may not have come to it yet
            self._expire(entry)

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
            self._start(entry, os.fspath(path))
            return _Follower(self, entry)
        except Exception:  # noqa: BLE001 - an optimisation: never fail the write for it
            log.exception("following ingest %s", path)
            return None

    def _find(self, digest: str) -> _Entry | None:
        """The staging of blob `digest` Diff.Apply may take (under the lock): running or
        kept, not one dropped whose directory is being removed."""
        return next((e for e in self._entries.values()
                     if e.digest == digest and not e.claimed
                     and (e.result is not None or not e.done.is_set())), None)

    def _new(self, digest: str | None) -> _Entry | None:
        with self._lock:
            if len(self._entries) >= self.max_entries:
                return None
            if digest is not None and self._find(digest) is not None:
                return None
            self._next_job += 1
            entry = _Entry(self._next_job, digest, str(self.dir / os.urandom(8).hex()))
            os.mkdir(entry.dir, 0o755)
            self._entries[entry.job] = entry
            return entry

    def _name(self, entry: _Entry, digest: str) -> None:
        """A followed ingest was committed as `digest`: Diff.Apply can find its staging,
        unless that blob is staged already (the same blob in another namespace)."""
        with self._lock:
            if entry.done.is_set():
                return  # it failed (or ended before the commit): the blob is offered again
            duplicate = self._find(digest) is not None
            if not duplicate:
                entry.digest = digest
        self._tell(entry, {"op": "abandon" if duplicate else "final", "id": entry.job})

    def offer(self, digest: str, path: str | os.PathLike) -> None:
        """A blob was just committed: stage it if it looks like a layer and was not
        followed while it was written. Never raises."""
        try:
            with self._lock:
                if self._find(digest) is not None:
                    return
            if not looks_like_layer(_head(path)) or not self._room():
                return
            size = os.stat(path).st_size
            entry = self._new(digest)
            if entry is not None:
                self._start(entry, os.fspath(path), limit=size, final=True)
        except Exception:  # noqa: BLE001 - an optimisation: never fail the commit for it
            log.exception("staging layer %s", digest)

    def _room(self) -> bool:
        self.dir.mkdir(mode=0o700, exist_ok=True)
        st = os.statvfs(self.dir)
        return st.f_bavail * st.f_frsize >= MIN_FREE_BYTES

    def _finish(self, entry: _Entry, result: ApplyResult | None, error: str) -> None:
        """The stager answered for `entry` (or cannot): keep its tree if it is a committed
        blob's, else remove it now. A second call does nothing."""
        with self._lock:
            if entry.done.is_set():
                return
            keep = result is not None and entry.digest is not None
            if keep:
                entry.result = result
                if not entry.claimed:
                    entry.timer = threading.Timer(self.ttl, self._expire, (entry,))
                    entry.timer.daemon = True
                    entry.timer.start()
            entry.done.set()
        if entry.fd is not None:
            os.close(entry.fd)
            entry.fd = None
        if not keep:
            log.debug("layer %s not staged: %s", entry.digest, error or "dropped")
            shutil.rmtree(entry.dir, ignore_errors=True)
            with self._lock:
                del self._entries[entry.job]

    def _expire(self, entry: _Entry) -> None:
        """Remove a finished staging nobody took."""
        with self._lock:
            if (entry.claimed or entry.result is None
                    or self._entries.get(entry.job) is not entry):
                return
            del self._entries[entry.job]
            if entry.timer is not None:
                entry.timer.cancel()
        shutil.rmtree(entry.dir, ignore_errors=True)

    # -- use ----------------------------------------------------------------------------

    def apply(self, digest: str, target: str, lowers: list[str], overlay: bool) -> ApplyResult | None:
        """Put the staged tree of blob `digest` in place of the empty directory `target`
        (an overlay upper over `lowers`, or with `overlay` False a plain directory) and
        return its apply result; None when there is none or it would differ from an
        apply, and the caller extracts the layer itself."""
        with self._lock:
            entry = self._find(digest)
            if entry is None:
                return None
            entry.claimed = True
            if entry.timer is not None:
                entry.timer.cancel()
        if not entry.done.is_set() and not self._wait(entry):
            return None
        try:
            result = entry.result
            if result is None:
                return None  # it failed: _finish removed it
            if not overlay and result.whiteouts:
                return None
            if os.listdir(target):
                return None
            st = os.stat(target)
            if st.st_dev != os.stat(entry.dir).st_dev:
                return None
            if overlay and result.made_parents and lowers:
                if result.rewrote_parent:
                    return None
                if not adopt_parents(entry.dir, result.made_parents, lowers):
                    return None
            os.chown(entry.dir, st.st_uid, st.st_gid)
            os.chmod(entry.dir, stat.S_IMODE(st.st_mode))
            for key in os.listxattr(target):
                os.setxattr(entry.dir, key, os.getxattr(target, key))
            os.rename(entry.dir, target)  # replaces the empty directory in one step
            return result
        except OSError as exc:
            log.debug("staged layer %s not used: %s", digest, exc)
            return None
        finally:
            if entry.result is not None:  # kept (else _finish removes it)
                with self._lock:
                    del self._entries[entry.job]
                shutil.rmtree(entry.dir, ignore_errors=True)  # nothing left once renamed

    def _wait(self, entry: _Entry) -> bool:
        """Wait for a staging Diff.Apply took while it runs. The stager's low priority
        would slow the caller down: it is raised meanwhile. False when it took too long:
        it is then removed once the stager stopped writing into it."""
        helper = entry.helper
        self._renice(helper, 0)
        entry.done.wait(WAIT_TIMEOUT)
        with self._lock:
            finished = entry.done.is_set()
            if not finished:
                entry.digest = None  # its answer drops it
            if not any(e.claimed and e is not entry and e.helper is helper
                       and not e.done.is_set() for e in self._entries.values()):
                self._renice(helper, NICENESS)  # (under the lock: another may raise it now)
        if not finished:
            self._tell(entry, {"op": "abandon", "id": entry.job})
        return finished

    def pending(self) -> int:
        """Stagings that have a directory (running, or finished and not yet used)."""
        with self._lock:
            return len(self._entries)

    @staticmethod
    def repair(directory: str | os.PathLike) -> None:
        """Remove what a crash left staged."""
        shutil.rmtree(directory, ignore_errors=True)
