"""Layers applied ahead of their Diff.Apply, while the client is still sending the image.

`ctr images import` (and the Go client generally) streams every blob through Content.Write,
one reply per MiB, and only then prepares a snapshot and calls Diff.Apply layer after
layer. While a blob streams in, the daemon waits for the client most of the time (the
client hashes and frames each MiB before it sends it). So a blob that looks like a layer
is applied, as soon as it is committed, on a background thread into a private directory
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

import errno
import io
import logging
import os
import shutil
import stat
import threading
from pathlib import Path

from runtimed.diff.apply import ApplyResult, adopt_parents, apply_layer

log = logging.getLogger("runtimed.diff.staging")

STAGED_DIR = ".staged"
_GZIP, _ZSTD = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"
MIN_FREE_BYTES = 4 << 30
IDLE_TIMEOUT = 60.0  # an ingest sending nothing for this long is not followed further


def looks_like_layer(head: bytes) -> bool:
    """gzip or zstd data, or a tar (its first header's magic): what a layer blob is."""
    return head[:2] == _GZIP or head[:4] == _ZSTD or head[257:262] == b"ustar"


def _head(path: str | os.PathLike) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(512)
    except OSError:
        return b""


class _Growing(io.RawIOBase):
    """The data file of an ingest, read while it is written: a read waits for bytes the
    writer has not written yet, and the end is the size the blob was committed with."""

    def __init__(self, path: str | os.PathLike):
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.pos = 0
        self.limit = 0  # bytes written so far
        self.final: int | None = None  # the committed size
        self.gone = False  # abandoned: the ingest restarted, failed or was closed
        self.cond = threading.Condition()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        with self.cond:
            while self.pos >= self.limit and self.final is None and not self.gone:
                if not self.cond.wait(IDLE_TIMEOUT):
                    self.gone = True
            if self.gone:
                raise OSError(errno.ECANCELED, "the ingest was not committed")
            available = self.limit - self.pos
        if available <= 0:
            return 0
        n = os.preadv(self.fd, [memoryview(buffer)[:available]], self.pos)
        self.pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


class _Follower:
    """What an announced ingest tells about itself (see ContentStore.add_ingest_hook)."""

    def __init__(self, staged: StagedLayers, entry: _Entry, source: _Growing):
        self.staged = staged
        self.entry = entry
        self.source = source

    def grow(self, offset: int) -> None:
        with self.source.cond:
            self.source.limit = offset
            self.source.cond.notify()

    def committed(self, digest: str) -> None:
        self.staged._name(self.entry, digest)
        with self.source.cond:
            self.source.final = self.source.limit
            self.source.cond.notify()

    def abandon(self) -> None:
        with self.source.cond:
            self.source.gone = True
            self.source.cond.notify()


class _Entry:
    def __init__(self, digest: str | None):
        self.digest = digest  # None while its ingest is followed
        self.following = False
        self.orphan = False
        self.state = "queued"  # -> running -> done | failed; or cancelled while queued
        self.done = threading.Event()
        self.root: str | None = None
        self.result: ApplyResult | None = None


class StagedLayers:
    def __init__(self, directory: str | os.PathLike, ttl: float = 120.0, max_entries: int = 16):
        self.dir = Path(directory)
        self.ttl = ttl
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._following = 0  # ingests being staged as they arrive, not committed yet
        # two at a time: a followed ingest keeps its slot until it is committed
        self._slots = threading.BoundedSemaphore(2)

    # -- staging ------------------------------------------------------------------------

    def follow(self, path: str | os.PathLike, head: bytes) -> _Follower | None:
        """An ingest starts (its data file `path`, its first bytes `head`): stage it as it
        arrives if it looks like a layer, so the staging ends about when the commit does.
        The follower learns of every write and of the commit. Never raises."""
        try:
            if not looks_like_layer(head) or not self._room():
                return None
            entry = _Entry(None)
            source = _Growing(path)
            with self._lock:
                if len(self._entries) + self._following >= self.max_entries:
                    source.close()
                    return None
                self._following += 1
                entry.following = True
            self._submit(entry, source)
            return _Follower(self, entry, source)
        except Exception:  # noqa: BLE001 - an optimisation: never fail the write for it
            log.exception("following ingest %s", path)
            return None

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
            with self._lock:
                if digest in self._entries or len(self._entries) + self._following >= self.max_entries:
                    return
                entry = self._entries[digest] = _Entry(digest)
            self._submit(entry, open(path, "rb"))
        except Exception:  # noqa: BLE001 - an optimisation: never fail the commit for it
            log.exception("staging layer %s", digest)

    def _submit(self, entry: _Entry, source) -> None:
        # a daemon thread: one still following an ingest must not hold up the daemon's exit
        threading.Thread(target=self._run, args=(entry, source), name="layer-stage",
                         daemon=True).start()

    def _run(self, entry: _Entry, source) -> None:
        with self._slots:
            self._stage(entry, source)

    def _room(self) -> bool:
        self.dir.mkdir(mode=0o700, exist_ok=True)
        st = os.statvfs(self.dir)
        return st.f_bavail * st.f_frsize >= MIN_FREE_BYTES

    def _stage(self, entry: _Entry, source) -> None:
        with self._lock:
            cancelled = entry.state == "cancelled"
            if not cancelled:
                entry.state = "running"
        if cancelled:
            source.close()
            entry.done.set()
            return
        root = None
        try:
            with source:
                root = str(self.dir / os.urandom(8).hex())
                os.mkdir(root, 0o755)
                entry.result = apply_layer(source, root, overlay=True, parents=[])
            with self._lock:
                if entry.following or entry.orphan:
                    raise OSError(errno.ECANCELED, "not committed, or staged twice")
            entry.root, root = root, None
            entry.state = "done"
        except Exception as exc:  # noqa: BLE001 - not a layer after all, or no space: skip
            log.debug("layer %s not staged: %s", entry.digest, exc)
            entry.state = "failed"
            with self._lock:
                if entry.following:
                    entry.following = False
                    self._following -= 1
        finally:
            if root is not None:
                shutil.rmtree(root, ignore_errors=True)
            entry.done.set()
        timer = threading.Timer(self.ttl, self._expire, (entry,))
        timer.daemon = True
        timer.start()

    def _expire(self, entry: _Entry) -> None:
        with self._lock:
            if self._entries.get(entry.digest) is not entry:
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
            if entry.state == "queued":
                entry.state = "cancelled"  # not started: the caller is as quick
                return None
        entry.done.wait()
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

