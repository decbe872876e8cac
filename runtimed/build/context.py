"""The build context: the client's tar unpacked in a private directory, `.dockerignore`
applied, and the source lookups COPY and ADD make (globs, content hashes for the cache)."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from pathlib import Path

from runtimed.errors import InvalidArgument, NotFound
from runtimed.tarsafe import tarfile


def extract(archive: str | os.PathLike, target: Path) -> None:
    """Unpack the context tar (no absolute names, no links out of `target`)."""
    target.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise InvalidArgument(f"build context is not a valid tar archive: {exc}") from None


def _pattern_regex(pattern: str) -> re.Pattern:
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            if pattern.startswith("/", i):
                i += 1
                out[-1] = "(.*/)?"
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i)
            if end < 0:
                raise InvalidArgument(f".dockerignore: bad pattern {pattern!r}")
            cls = pattern[i + 1:end].replace("\\", "\\\\")
            out.append("[" + ("^" + cls[1:] if cls.startswith("!") else cls) + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("^" + "".join(out) + "$")


class Ignore:
    """`.dockerignore` rules: Go filepath.Match patterns, `**`, `!` exceptions; the last
    matching rule wins, and a rule matching a directory covers everything below it."""

    def __init__(self, text: str = ""):
        self.rules: list[tuple[bool, re.Pattern]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            line = line[1:].strip() if negate else line
            line = os.path.normpath(line.lstrip("/")) if line.lstrip("/") else "."
            self.rules.append((negate, _pattern_regex(line)))

    def ignored(self, rel: str) -> bool:
        parts = rel.split("/")
        result = False
        for negate, rx in self.rules:
            for n in range(1, len(parts) + 1):
                if rx.fullmatch("/".join(parts[:n])):
                    result = not negate
                    break
        return result


class Context:
    def __init__(self, root: Path):
        self.root = root
        path = root / ".dockerignore"
        self.ignore = Ignore(path.read_text(errors="replace") if path.is_file() else "")

    def sources(self, pattern: str, what: str) -> list[Path]:
        """The context paths `pattern` names (a path or a glob), minus ignored ones."""
        clean = os.path.normpath("/" + pattern).lstrip("/")
        if clean in ("", "."):
            return [self.root]
        if any(c in clean for c in "*?["):
            found = []
            for dirpath, dirnames, filenames in os.walk(self.root):
                rel_dir = os.path.relpath(dirpath, self.root)
                for name in sorted(dirnames + filenames):
                    rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                    if fnmatch.fnmatchcase(rel, clean) and not self.ignore.ignored(rel):
                        found.append(self.root / rel)
            if not found:
                raise NotFound(f"{what}: no source files were specified by {pattern!r}")
            return sorted(found)
        path = self.root / clean
        if not os.path.lexists(path) or self.ignore.ignored(clean):
            raise NotFound(f"{what}: {pattern!r} not found in the build context "
                           "(or excluded by .dockerignore)")
        return [path]

    def included(self, path: Path) -> bool:
        rel = os.path.relpath(path, self.root)
        return rel == "." or not self.ignore.ignored(rel)


def content_hash(paths: list[Path], base: Path, included=lambda p: True) -> str:
    """A digest of names, modes and bytes under `paths`: the cache key of a COPY/ADD."""
    h = hashlib.sha256()
    for top in paths:
        entries = [top]
        if top.is_dir() and not top.is_symlink():
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames.sort()
                for name in sorted(dirnames + filenames):
                    entries.append(Path(dirpath) / name)
        for p in entries:
            if not included(p):
                continue
            st = os.lstat(p)
            h.update(f"{os.path.relpath(p, base)}\0{st.st_mode:o}\0".encode())
            if p.is_symlink():
                h.update(os.readlink(p).encode())
            elif p.is_file():
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
            h.update(b"\0")
    return "sha256:" + h.hexdigest()
