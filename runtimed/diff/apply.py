"""Apply a layer (an OCI changeset tar, possibly compressed) onto a directory.

The archive is read as a stream (decompression in C, see `compression`), hashed on the fly
to give the diff ID, and each entry is written with *at() system calls relative to a
directory fd opened with openat2(RESOLVE_BENEATH) (see `safepath`): an entry whose name is
absolute or climbs out with `..`, a write through a symlink pointing outside the root, or a
hard link to something outside, is refused with InvalidArgument before anything is written
there. The standard library's extraction is not used: its filters strip setuid bits and
refuse device nodes, which container layers legitimately carry.

Whiteouts follow the OCI layer spec. `overlay=True` (applying straight into an overlayfs
upper directory) turns `.wh.name` into a 0/0 character device and `.wh..wh..opq` into the
`trusted.overlay.opaque=y` xattr, as the kernel expects; otherwise (a mounted or a native
snapshot) they delete what they name. In overlay mode missing parent directories take
their owner, mode and xattrs from the first lower layer that has them, so creating a file
in a lower directory does not change the directory's attributes.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import stat
import struct
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import BinaryIO

from runtimed.diff import compression
from runtimed.diff.safepath import clean, open_dir, openat2
from runtimed.errors import FailedPrecondition, InvalidArgument

WHITEOUT_PREFIX = ".wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
XATTR_PAX_PREFIX = "SCHILY.xattr."
MAX_HEADER_SIZE = 1 << 20  # a pax or GNU long-name header larger than this is hostile
CHUNK = 1 << 20
_FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ENOMEM}


@dataclass
class ApplyResult:
    digest: str  # sha256 of the uncompressed tar: the layer's diff ID
    size: int  # bytes of the uncompressed tar
    # what makes the tree depend on where it was applied (see diff/staging.py):
    whiteouts: bool = False  # the layer has whiteout or opaque entries
    # parent directories the layer lacks, created in this order
    made_parents: list[str] = field(default_factory=list)
    rewrote_parent: bool = False  # the layer has an entry for one of them after all


_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s8x32s32s8s8s155s")
_PLAIN_TYPES = frozenset((tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                          tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.XHDTYPE,
                          tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK))


def _octal(field: bytes) -> int:
    """An octal header number; ValueError for anything else (base-256 included)."""
    if field[:1] in (b"\x80", b"\xff"):
        raise ValueError("base-256 number")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _text(field: bytes, encoding: str, errors: str) -> str:
    return field.split(b"\0", 1)[0].decode(encoding, errors)


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses oversized extended headers before tarfile reads them into memory, and
    parses plain headers in one struct call (tarfile's generic parser is most of the
    per-file cost of a layer of small files); anything unusual goes to tarfile's."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        if len(buf) != tarfile.BLOCKSIZE or buf[156:157] not in _PLAIN_TYPES:
            return super().frombuf(buf, encoding, errors)
        (name, mode, uid, gid, size, mtime, chksum, type_, linkname, uname, gname,
         devmajor, devminor, prefix) = _HEADER.unpack_from(buf)
        try:
            checksum = _octal(chksum)
            if checksum != sum(buf) - sum(buf[148:156]) + 256:
                return super().frombuf(buf, encoding, errors)
            obj = cls()
            obj.mode, obj.uid, obj.gid = _octal(mode), _octal(uid), _octal(gid)
            obj.size, obj.mtime = _octal(size), _octal(mtime)
            if type_ in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                obj.devmajor, obj.devminor = _octal(devmajor), _octal(devminor)
        except ValueError:
            return super().frombuf(buf, encoding, errors)
        obj.chksum = checksum
        obj.type = type_
        obj.name = _text(name, encoding, errors)
        obj.linkname = _text(linkname, encoding, errors)
        obj.uname = _text(uname, encoding, errors)
        obj.gname = _text(gname, encoding, errors)
        if obj.type == tarfile.DIRTYPE:
            obj.name = obj.name.rstrip("/")
        if prefix[:1] not in (b"", b"\0") and obj.type not in tarfile.GNU_TYPES:
            obj.name = _text(prefix, encoding, errors) + "/" + obj.name
        return obj

    def _proc_member(self, tarfile_):
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK,
                         tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE):
            if self.size > MAX_HEADER_SIZE:
                raise InvalidArgument(
                    f"layer has a {self.size}-byte extended header (limit {MAX_HEADER_SIZE})"
                )
        return super()._proc_member(tarfile_)


def apply_layer(source: BinaryIO, root: str | os.PathLike, *, overlay: bool = False,
                parents: list[str] | None = None, media_type: str | None = None) -> ApplyResult:
    """Apply the (compressed or plain) layer read from `source` onto directory `root`."""
    try:
        raw = compression.decompressed(source, media_type)
    except OSError as exc:
        raise InvalidArgument(f"layer is not readable as {media_type or 'a tar'}: {exc}") from exc
    reader = compression.DigestReader(raw)
    rootfd = os.open(os.fspath(root), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    writer = _Writer(rootfd, overlay, [os.fspath(p) for p in parents or []])
    try:
        try:
            tf = tarfile.open(fileobj=_ForwardReader(reader), mode="r:", tarinfo=_BoundedTarInfo,
                              errorlevel=2)
        except tarfile.ReadError as exc:
            if reader.size == 0:
                return ApplyResult(digest=reader.digest, size=0)  # an empty layer
            raise InvalidArgument(f"layer is not a valid tar archive: {exc}") from exc
        while True:
            member = tf.next()
            if member is None:
                break
            tf.members.clear()  # a stream: do not keep every header in memory
            writer.entry(tf, member)
        writer.finish()
        reader.drain()
    except (tarfile.TarError, EOFError, *_decompress_errors()) as exc:
        raise InvalidArgument(f"layer is truncated or corrupt: {exc}") from exc
    except OSError as exc:
        if exc.errno == errno.EROFS:
            raise FailedPrecondition(
                f"cannot apply a layer onto {os.fspath(root)}: it is read-only (a view?)"
            ) from exc
        raise
    finally:
        writer.close()
        os.close(rootfd)
        raw.close()
    return ApplyResult(digest=reader.digest, size=reader.size, whiteouts=writer.whiteouts,
                       made_parents=writer.made_parents, rewrote_parent=writer.rewrote_parent)


def adopt_parents(root: str | os.PathLike, made: list[str], parents: list[str]) -> bool:
    """Turn a layer applied in overlay mode without lower layers into the same layer
    applied over `parents`: the directories it created for want of entries (`made`, in
    order) take the owner, mode and xattrs the apply would have copied from the lower
    layers (their modification time stays: the apply's own, from the entries it created
    in them). False when the result would still differ: a directory that becomes
    set-group-ID would have passed its group to what was created inside it. (A layer with
    an entry for such a directory after all, whose attributes would come on top of the
    lowers', is not handled here: ApplyResult.rewrote_parent.)"""
    rootfd = os.open(os.fspath(root), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    writer = _Writer(rootfd, True, [os.fspath(p) for p in parents])
    try:
        for rel in made:
            parent, _, name = rel.rpartition("/")
            try:
                pfd = writer.dirfd(parent, create=False)
                before = os.lstat(name, dir_fd=pfd)
            except (FileNotFoundError, NotADirectoryError, InvalidArgument):
                continue  # removed later in the layer
            if not stat.S_ISDIR(before.st_mode):
                continue  # replaced later in the layer
            writer._copy_dir_info(rel, pfd, name)
            after = os.lstat(name, dir_fd=pfd)
            if after.st_mode & stat.S_ISGID:
                return False
            os.utime(name, ns=(after.st_atime_ns, before.st_mtime_ns), dir_fd=pfd,
                     follow_symlinks=False)
        return True
    finally:
        writer.close()
        os.close(rootfd)


class _ForwardReader:
    """A stream that tarfile may treat as seekable, as long as it only seeks forward.

    tarfile's own stream mode ("r|") re-slices its whole read buffer on every header read,
    which dominates the cost of layers with many small files; "r:" on this wrapper reads
    through a BufferedReader instead and skips unread data by reading it (it must be hashed
    for the diff ID anyway).
    """

    def __init__(self, raw):
        self._f = io.BufferedReader(raw, buffer_size=256 << 10)
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._pos += len(data)
        return data

    def readinto(self, buffer) -> int:
        n = self._f.readinto(buffer)
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 1:
            offset += self._pos
        elif whence != 0:
            raise io.UnsupportedOperation("a layer stream cannot seek from its end")
        if offset < self._pos:
            raise io.UnsupportedOperation("a layer stream cannot seek backwards")
        while self._pos < offset:
            if not self.read(min(CHUNK, offset - self._pos)):
                break
        return self._pos


def _decompress_errors() -> tuple[type[BaseException], ...]:
    import zlib

    import zstandard
    from isal import igzip, isal_zlib

    return (zlib.error, isal_zlib.error, igzip.BadGzipFile, zstandard.ZstdError)


def _copy_file(src: int, dst: int) -> None:
    try:
        while os.copy_file_range(src, dst, CHUNK):
            pass
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    os.lseek(src, 0, os.SEEK_SET)
    os.lseek(dst, 0, os.SEEK_SET)
    os.ftruncate(dst, 0)
    while data := os.read(src, CHUNK):
        view = memoryview(data)
        while view:
            view = view[os.write(dst, view):]


def _mtime_ns(member: tarfile.TarInfo, key: str = "mtime") -> int:
    text = member.pax_headers.get(key)
    if text:
        whole, _, frac = text.partition(".")
        try:
            return int(whole) * 1_000_000_000 + int((frac + "000000000")[:9] or 0) * (
                -1 if whole.startswith("-") else 1)
        except ValueError:
            pass
    return int(member.mtime) * 1_000_000_000


def _umask() -> int | None:
    """The process umask, read without changing it (os.umask would, for every thread)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return None


class _Writer:
    """Writes entries with as few system calls as the header allows: a new entry is
    created with its final permission bits when the umask leaves them alone, its owner is
    set only when it is not already the creator's, and nothing is looked up before it is
    created (an existing name shows as EEXIST and is handled then)."""

    def __init__(self, rootfd: int, overlay: bool, parents: list[str]):
        self.rootfd = rootfd
        self.overlay = overlay
        self.parents = parents
        self.owner = (os.geteuid(), os.getegid())
        umask = _umask()
        # permission bits a creating call may be trusted with; the rest take a chmod
        self.keep_mask = 0o777 & ~umask if umask is not None else 0
        self._sgid: dict[str, bool] = {}  # parent directory -> is set-group-ID
        self._buf = memoryview(bytearray(CHUNK))
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._dirs: list[tuple[str, int, int]] = []
        self._unpacked: set[str] = set()
        self._opaque: list[str] = []
        self.whiteouts = False
        self.made_parents: list[str] = []
        self._made: set[str] = set()
        self.rewrote_parent = False

    # -- directory fds ------------------------------------------------------------------

    def dirfd(self, rel: str, create: bool = True) -> int:
        fd = self._fds.get(rel)
        if fd is not None:
            self._fds.move_to_end(rel)
            return fd
        try:
            fd = open_dir(self.rootfd, rel)
        except FileNotFoundError:
            if not create:
                raise
            self._mkparents(rel)
            fd = open_dir(self.rootfd, rel)
        except NotADirectoryError:
            raise InvalidArgument(f"{rel!r} is not a directory in the layer's target") from None
        self._fds[rel] = fd
        if len(self._fds) > 128:
            gone, old = self._fds.popitem(last=False)
            os.close(old)
            self._sgid.pop(gone, None)
        return fd

    def setgid(self, rel: str, fd: int) -> bool:
        """Whether directory `rel` (open as `fd`) is set-group-ID: what is created in it
        then takes its group (and a directory its set-group-ID bit) rather than ours."""
        sgid = self._sgid.get(rel)
        if sgid is None:
            sgid = self._sgid[rel] = bool(os.fstat(fd).st_mode & stat.S_ISGID)
        return sgid

    def _forget(self) -> None:
        """Drop every cached fd: a directory or symlink was removed, and cached fds may
        have been resolved through it under other names."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._sgid.clear()

    def _mkparents(self, rel: str) -> None:
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            try:
                os.close(open_dir(self.rootfd, sub))
                continue
            except FileNotFoundError:
                pass
            pfd = self.dirfd("/".join(parts[:i - 1]), create=False)
            name = parts[i - 1]
            try:
                os.mkdir(name, 0o755, dir_fd=pfd)
            except FileExistsError:
                continue
            self.made_parents.append(sub)
            self._made.add(sub)
            if self.overlay:
                self._copy_dir_info(sub, pfd, name)
            self._sgid.pop(sub, None)

    def _copy_dir_info(self, rel: str, pfd: int, name: str) -> None:
        for lower in self.parents:
            try:
                lfd = os.open(lower, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                try:
                    fd = openat2(lfd, rel, os.O_RDONLY | os.O_NOFOLLOW)
                except (FileNotFoundError, InvalidArgument):
                    continue
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        return  # replaced by a non-directory in that lower: keep defaults
                    raise
                try:
                    st = os.fstat(fd)
                    if not stat.S_ISDIR(st.st_mode):
                        return
                    os.chown(name, st.st_uid, st.st_gid, dir_fd=pfd, follow_symlinks=False)
                    os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=pfd)
                    for key in os.listxattr(fd):
                        if key.startswith("trusted.overlay."):
                            continue
                        os.setxattr(self._proc(pfd, name), key, os.getxattr(fd, key),
                                    follow_symlinks=False)
                    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=pfd,
                             follow_symlinks=False)
                    return
                finally:
                    os.close(fd)
            finally:
                os.close(lfd)

    # -- hard links to lower layers ------------------------------------------------------

    def _copy_up(self, target: str) -> bool:
        """A hard link to a file that only a lower layer has: copy the file into the upper
        directory first, as overlayfs does when the link is made in the mounted snapshot
        (a link cannot span layers). False when no layer shows `target`."""
        found = self._lower_lookup(target)
        if found is None:
            return False
        lparent, lname, st = found
        try:
            tparent, _, tbase = target.rpartition("/")
            pfd = self.dirfd(tparent)  # missing parents take the lower layers' attributes
            mode = st.st_mode
            if stat.S_ISREG(mode):
                src = os.open(lname, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=lparent)
                try:
                    dst = os.open(tbase, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                  | os.O_CLOEXEC, 0o600, dir_fd=pfd)
                    try:
                        _copy_file(src, dst)
                    finally:
                        os.close(dst)
                finally:
                    os.close(src)
            elif stat.S_ISLNK(mode):
                os.symlink(os.readlink(lname, dir_fd=lparent), tbase, dir_fd=pfd)
            else:
                os.mknod(tbase, stat.S_IFMT(mode) | 0o600, st.st_rdev, dir_fd=pfd)
            os.chown(tbase, st.st_uid, st.st_gid, dir_fd=pfd, follow_symlinks=False)
            lpath, upath = self._proc(lparent, lname), self._proc(pfd, tbase)
            for key in os.listxattr(lpath, follow_symlinks=False):
                if not key.startswith("trusted.overlay."):
                    os.setxattr(upath, key, os.getxattr(lpath, key, follow_symlinks=False),
                                follow_symlinks=False)
            if not stat.S_ISLNK(mode):
                os.chmod(tbase, stat.S_IMODE(mode), dir_fd=pfd)
            os.utime(tbase, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=pfd,
                     follow_symlinks=False)
        finally:
            os.close(lparent)
        return True

    def _lower_lookup(self, rel: str) -> tuple[int, str, os.stat_result] | None:
        """Where the merged view of the upper directory over its lower layers finds the
        non-directory `rel`: (an fd of its directory in that layer, its name, its stat).
        None when a layer above whites it out, hides it under a non-directory or an
        opaque directory, or no layer has it. Every step is one name, never a path."""
        parts = rel.split("/")
        layers = [None, *self.parents]  # None: the upper directory itself
        for layer in layers:
            try:
                cur = (os.dup(self.rootfd) if layer is None
                       else os.open(layer, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
            except OSError:
                continue
            hides_below = False
            try:
                for i, name in enumerate(parts):
                    try:
                        st = os.lstat(name, dir_fd=cur)
                    except FileNotFoundError:
                        break  # not in this layer: look in the next one down
                    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                        return None  # whited out
                    if i == len(parts) - 1:
                        if stat.S_ISDIR(st.st_mode) or layer is None:
                            return None  # a directory; or the upper has it: not our case
                        lparent, cur = cur, -1  # handed to the caller, which closes it
                        return lparent, name, st
                    if not stat.S_ISDIR(st.st_mode):
                        return None  # a non-directory hides what lower layers have below
                    nfd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                  dir_fd=cur)
                    os.close(cur)
                    cur = nfd
                    try:
                        if os.getxattr(self._proc(cur, "."), OPAQUE_XATTR) == b"y":
                            hides_below = True
                    except OSError:
                        pass
            finally:
                if cur >= 0:
                    os.close(cur)
            if hides_below:
                return None
        return None

    @staticmethod
    def _proc(pfd: int, name: str) -> str:
        return f"/proc/self/fd/{pfd}/{name}"

    # -- entries ------------------------------------------------------------------------

    def entry(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = clean(member.name)
        if not name:
            return  # the root itself: left as the snapshotter made it
        parent, _, base = name.rpartition("/")
        try:
            pfd = self.dirfd(parent)
            if base.startswith(WHITEOUT_PREFIX):
                self._whiteout(parent, pfd, base, member)
                return
            self._write(tf, member, name, parent, pfd, base)
        except OSError as exc:
            if exc.errno in _FATAL_ERRNOS:
                raise
            raise InvalidArgument(f"layer entry {member.name!r}: {exc.strerror or exc}") from exc
        except InvalidArgument as exc:
            raise InvalidArgument(f"layer entry {member.name!r}: {exc}") from exc

    def _whiteout(self, parent: str, pfd: int, base: str, member: tarfile.TarInfo) -> None:
        self.whiteouts = True
        if base == WHITEOUT_OPAQUE:
            if self.overlay:
                os.setxattr(self._proc(pfd, "."), OPAQUE_XATTR, b"y")
            else:
                self._opaque.append(parent)
            return
        target = base[len(WHITEOUT_PREFIX):]
        if target in ("", ".", "..") or "/" in target:
            raise InvalidArgument(f"invalid whiteout name {base!r}")
        rel = f"{parent}/{target}" if parent else target
        self._remove(pfd, target, rel)
        pfd = self.dirfd(parent)
        if self.overlay:
            os.mknod(target, stat.S_IFCHR | 0o000, 0, dir_fd=pfd)
            os.chown(target, member.uid, member.gid, dir_fd=pfd, follow_symlinks=False)

    def _remove(self, pfd: int, base: str, rel: str) -> None:
        try:
            st = os.lstat(base, dir_fd=pfd)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(base, dir_fd=pfd)
            self._forget()
        else:
            os.unlink(base, dir_fd=pfd)
            if stat.S_ISLNK(st.st_mode):
                self._forget()

    def _write(self, tf: tarfile.TarFile, member: tarfile.TarInfo, name: str, parent: str,
               pfd: int, base: str) -> None:
        if name in self._made:
            self.rewrote_parent = True  # an entry for a directory made for want of one
        try:
            self._create(tf, member, name, parent, pfd, base, False)
        except FileExistsError:
            st = os.lstat(base, dir_fd=pfd)
            if stat.S_ISDIR(st.st_mode) and member.isdir():
                self._dir_meta(name, pfd, base, member, st)
            else:
                # in an overlay upper, a directory replacing a whiteout must hide the lower
                # one's contents: it becomes opaque
                opaque = (self.overlay and stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
                          and member.isdir())
                self._remove(pfd, base, name)
                pfd = self.dirfd(parent)
                self._create(tf, member, name, parent, pfd, base, opaque)
        self._unpacked.add(name)

    def _create(self, tf: tarfile.TarFile, member: tarfile.TarInfo, name: str, parent: str,
                pfd: int, base: str, opaque: bool) -> None:
        """Create `base` as the entry says; FileExistsError (before anything is written)
        when the name is taken."""
        mode = member.mode & 0o7777
        type_ = member.type
        if type_ in tarfile.REGULAR_TYPES:
            self._regular(tf, member, parent, pfd, base, mode)
        elif type_ == tarfile.DIRTYPE:
            os.mkdir(base, mode & self.keep_mask or 0o700, dir_fd=pfd)
            if opaque:
                os.setxattr(self._proc(pfd, base), OPAQUE_XATTR, b"y", follow_symlinks=False)
            self._dirs.append((name, _mtime_ns(member, "atime") if "atime" in member.pax_headers
                               else _mtime_ns(member), _mtime_ns(member)))
            sgid = self.setgid(parent, pfd)
            self._meta(pfd, base, member, mode, sgid, sgid)
            self._sgid.pop(name, None)
        elif type_ == tarfile.SYMTYPE:
            os.symlink(member.linkname, base, dir_fd=pfd)
            self._meta(pfd, base, member, None, self.setgid(parent, pfd), False)
        elif type_ == tarfile.LNKTYPE:
            target = clean(member.linkname, "hard link target")
            if not target:
                raise InvalidArgument(f"hard link to the root ({member.linkname!r})")
            tparent, _, tbase = target.rpartition("/")
            try:
                tfd = self.dirfd(tparent, create=False)
                os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                if not (self.overlay and self._copy_up(target)):
                    raise
                tfd = self.dirfd(tparent, create=False)
                os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        elif type_ in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            kind = stat.S_IFCHR if type_ == tarfile.CHRTYPE else stat.S_IFBLK
            os.mknod(base, kind | 0o600, os.makedev(member.devmajor, member.devminor), dir_fd=pfd)
            self._meta(pfd, base, member, mode, self.setgid(parent, pfd), True)
        elif type_ == tarfile.FIFOTYPE:
            os.mkfifo(base, 0o600, dir_fd=pfd)
            self._meta(pfd, base, member, mode, self.setgid(parent, pfd), True)
        else:
            raise InvalidArgument(f"unsupported tar entry type {member.type!r}")

    def _needs_chmod(self, mode: int) -> bool:
        return bool(mode & ~self.keep_mask)

    def _regular(self, tf, member, parent: str, pfd: int, base: str, mode: int) -> None:
        created = mode & self.keep_mask
        fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     created or 0o600, dir_fd=pfd)
        try:
            if member.size:
                self._copy_data(tf, member, fd)
            if (member.uid, member.gid) != self.owner or self.setgid(parent, pfd):
                os.fchown(fd, member.uid, member.gid)
            if member.pax_headers:
                self._xattrs(member, fd=fd)
            if mode != created or not created:
                os.fchmod(fd, mode)
            mtime = _mtime_ns(member)
            atime = _mtime_ns(member, "atime") if "atime" in member.pax_headers else mtime
            os.utime(fd, ns=(atime, mtime))
        finally:
            os.close(fd)

    def _copy_data(self, tf: tarfile.TarFile, member: tarfile.TarInfo, fd: int) -> None:
        """Copy the member's data from the stream into `fd` through one reused buffer."""
        if member.sparse is not None:  # the stored data is not the file's bytes
            stream = tf.extractfile(member)
        else:
            stream = tf.fileobj
            if stream.tell() != member.offset_data:  # tarfile left the stream elsewhere
                stream.seek(member.offset_data)
        buf = self._buf
        remaining = member.size
        while remaining > 0:
            n = stream.readinto(buf[:remaining] if remaining < len(buf) else buf)
            if not n:
                raise InvalidArgument("file data ends early: truncated layer")
            view = buf[:n]
            while view:
                view = view[os.write(fd, view):]
            remaining -= n

    def _meta(self, pfd: int, base: str, member: tarfile.TarInfo, mode: int | None,
              sgid_parent: bool, chmod: bool) -> None:
        """Owner, xattrs, mode and (except for directories, done at the end) times of a
        newly created entry; `chmod` when its creation mode is not final anyway."""
        if (member.uid, member.gid) != self.owner or sgid_parent:
            os.chown(base, member.uid, member.gid, dir_fd=pfd, follow_symlinks=False)
        if member.pax_headers:
            self._xattrs(member, path=self._proc(pfd, base))
        if mode is not None and (chmod or self._needs_chmod(mode) or not mode & self.keep_mask):
            os.chmod(base, mode, dir_fd=pfd)
        if member.type != tarfile.DIRTYPE:
            mtime = _mtime_ns(member)
            os.utime(base, ns=(mtime, mtime), dir_fd=pfd, follow_symlinks=False)

    def _dir_meta(self, name: str, pfd: int, base: str, member: tarfile.TarInfo,
                  st: os.stat_result) -> None:
        """A directory entry for a directory that exists: it takes the entry's owner,
        mode and xattrs (only what differs is changed) and, at the end, its times."""
        mode = member.mode & 0o7777
        self._dirs.append((name, _mtime_ns(member, "atime") if "atime" in member.pax_headers
                           else _mtime_ns(member), _mtime_ns(member)))
        if (st.st_uid, st.st_gid) != (member.uid, member.gid):
            os.chown(base, member.uid, member.gid, dir_fd=pfd, follow_symlinks=False)
            st = os.lstat(base, dir_fd=pfd)  # chown may clear set-ID bits
        if member.pax_headers:
            self._xattrs(member, path=self._proc(pfd, base))
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(base, mode, dir_fd=pfd)
        self._sgid.pop(name, None)

    def _xattrs(self, member: tarfile.TarInfo, fd: int | None = None,
                path: str | None = None) -> None:
        for key, value in member.pax_headers.items():
            if not key.startswith(XATTR_PAX_PREFIX):
                continue
            attr = key[len(XATTR_PAX_PREFIX):]
            data = value.encode("utf-8", "surrogateescape")
            try:
                if fd is not None:
                    os.setxattr(fd, attr, data)
                else:
                    os.setxattr(path, attr, data, follow_symlinks=False)
            except OSError as exc:
                # user.* xattrs exist only on files and directories; some filesystems
                # lack xattrs altogether: containerd skips these as well
                if exc.errno in (errno.ENOTSUP, errno.EPERM):
                    continue
                raise

    # -- end of archive -----------------------------------------------------------------

    def finish(self) -> None:
        for rel in self._opaque:
            self._clear_opaque(rel)
        for rel, atime, mtime in reversed(self._dirs):
            parent, _, base = rel.rpartition("/")
            try:
                pfd = self.dirfd(parent, create=False)
                os.utime(base, ns=(atime, mtime), dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed by a later whiteout

    def _clear_opaque(self, rel: str) -> None:
        """Delete what an opaque directory hid: everything this layer did not write."""
        try:
            fd = openat2(self.rootfd, rel or ".", os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return
        try:
            names = os.listdir(fd)
        finally:
            os.close(fd)
        pfd = self.dirfd(rel, create=False)
        for name in names:
            child = f"{rel}/{name}" if rel else name
            if child not in self._unpacked:
                self._remove(pfd, name, child)
                pfd = self.dirfd(rel, create=False)
            else:
                try:
                    is_dir = stat.S_ISDIR(os.lstat(name, dir_fd=pfd).st_mode)
                except FileNotFoundError:
                    continue
                if is_dir:
                    self._clear_opaque(child)

    def close(self) -> None:
        self._forget()
