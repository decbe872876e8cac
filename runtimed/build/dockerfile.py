"""Dockerfile parsing, as Docker documents the syntax.

`parse(text)` checks the whole file up front (unknown instructions, missing arguments,
bad flags, bad directives) so a build fails before its first step, with the line number.
Variable substitution depends on the build's state (ARG and ENV values at that step), so
instructions keep their raw text and the builder expands them with `expand`/`words`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from runtimed.errors import InvalidArgument

INSTRUCTIONS = {
    "add", "arg", "cmd", "copy", "entrypoint", "env", "expose", "from", "healthcheck",
    "label", "maintainer", "onbuild", "run", "shell", "stopsignal", "user", "volume", "workdir",
}
# the flags each instruction accepts (values are parsed by the builder)
# (what BuildKit adds beyond these, e.g. RUN --mount, COPY --exclude, is refused, not ignored)
FLAGS = {
    "add": {"chown", "chmod", "link"},
    "copy": {"chown", "chmod", "from", "link"},
    "from": {"platform"},
    "run": {"network"},
    "healthcheck": {"interval", "timeout", "start-period", "start-interval", "retries"},
}
JSON_FORM = {"cmd", "entrypoint", "run", "shell", "add", "copy", "volume"}
_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9_-]*)\s*=\s*(.+?)\s*$")
_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_STAGE_NAME = re.compile(r"^[a-z][a-z0-9_.-]*$")


@dataclass
class Instruction:
    cmd: str  # lower case
    original: str  # the logical line, continuations joined
    line: int  # where it starts (1-based)
    rest: str  # everything after the instruction word and its flags
    flags: dict[str, list[str]] = field(default_factory=dict)
    json: list[str] | None = None  # the JSON (exec) form, when the arguments are one

    def flag(self, name: str, default: str = "") -> str:
        values = self.flags.get(name)
        return values[-1] if values else default

    def error(self, message: str) -> InvalidArgument:
        return InvalidArgument(f"Dockerfile line {self.line}: {self.cmd.upper()}: {message}")


@dataclass
class Stage:
    base: str  # raw (variables expanded by the builder)
    name: str
    index: int
    line: int
    platform: str = ""
    instructions: list[Instruction] = field(default_factory=list)


@dataclass
class Dockerfile:
    directives: dict[str, str]
    escape: str
    meta_args: list[Instruction]  # ARGs before the first FROM
    stages: list[Stage]

    def stage(self, ref: str) -> Stage | None:
        """A stage by name or by index (as `COPY --from=0`)."""
        for s in self.stages:
            if s.name and s.name == ref.lower():
                return s
        if ref.isdigit() and int(ref) < len(self.stages):
            return self.stages[int(ref)]
        return None


def _logical_lines(text: str) -> tuple[dict[str, str], str, list[tuple[int, str]]]:
    lines = text.replace("\r\n", "\n").split("\n")
    directives: dict[str, str] = {}
    i = 0
    while i < len(lines):
        m = _DIRECTIVE.match(lines[i])
        if not m:
            break
        key = m.group(1).lower()
        if key not in ("syntax", "escape", "check"):
            break
        if key in directives:
            raise InvalidArgument(f"Dockerfile line {i + 1}: only one {key} parser directive can be used")
        directives[key] = m.group(2)
        i += 1
    escape = directives.get("escape", "\\")
    if escape not in ("\\", "`"):
        raise InvalidArgument(f"Dockerfile: invalid escape token {escape!r} does not match ` or \\")
    out: list[tuple[int, str]] = []
    current: list[str] = []
    start = 0
    for number, raw in enumerate(lines[i:], start=i + 1):
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and (not stripped or stripped.startswith("#")):
            continue  # empty lines and comments inside a continuation are dropped
        if not current:
            start = number
        body = raw.rstrip()
        if body.endswith(escape):
            current.append(body[:-1])
            continue
        current.append(body)
        out.append((start, "".join(current).strip()))
        current = []
    if current:
        out.append((start, "".join(current).strip()))
    return directives, escape, out


def _split_flags(rest: str, line: int, cmd: str) -> tuple[dict[str, list[str]], str]:
    flags: dict[str, list[str]] = {}
    while rest.startswith("--"):
        word, _, after = rest.partition(" ")
        name, eq, value = word[2:].partition("=")
        if not name:
            break
        if name not in FLAGS.get(cmd, set()):
            raise InvalidArgument(f"Dockerfile line {line}: {cmd.upper()}: unknown flag: --{name}")
        if not eq and name != "link":
            raise InvalidArgument(f"Dockerfile line {line}: {cmd.upper()}: missing a value on flag: --{name}")
        flags.setdefault(name, []).append(value if eq else "true")
        rest = after.lstrip()
    return flags, rest


def _json_form(rest: str) -> list[str] | None:
    if not rest.startswith("["):
        return None
    try:
        value = json.loads(rest)
    except ValueError:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def parse(text: str) -> Dockerfile:
    """Parse a Dockerfile; InvalidArgument names the line of the first problem."""
    directives, escape, lines = _logical_lines(text)
    meta_args: list[Instruction] = []
    stages: list[Stage] = []
    for line, logical in lines:
        word, _, rest = logical.partition(" ") if " " in logical else logical.partition("\t")
        cmd = word.lower()
        rest = rest.strip()
        if cmd not in INSTRUCTIONS:
            raise InvalidArgument(f"Dockerfile line {line}: unknown instruction: {word}")
        flags, rest = _split_flags(rest, line, cmd)
        inst = Instruction(cmd, logical, line, rest, flags,
                           _json_form(rest) if cmd in JSON_FORM else None)
        _check(inst)
        if cmd == "from":
            words = rest.split()
            name = ""
            if len(words) == 3 and words[1].lower() == "as":
                name = words[2].lower()
                if not _STAGE_NAME.fullmatch(name):
                    raise inst.error(f"invalid name for build stage: {words[2]!r}, "
                                     "name can't start with a number or contain symbols")
                if any(s.name == name for s in stages):
                    raise inst.error(f"duplicate name {words[2]!r}")
            elif len(words) != 1:
                raise inst.error("FROM requires either one or three arguments (image [AS name])")
            stages.append(Stage(words[0], name, len(stages), line, inst.flag("platform")))
        elif not stages:
            if cmd != "arg":
                raise InvalidArgument(
                    f"Dockerfile line {line}: {cmd.upper()} before the first FROM: "
                    "only ARG may come before FROM")
            meta_args.append(inst)
        else:
            stages[-1].instructions.append(inst)
    if not stages:
        raise InvalidArgument("Dockerfile has no FROM instruction: nothing to build")
    return Dockerfile(directives, escape, meta_args, stages)


def _check(inst: Instruction) -> None:
    cmd, rest = inst.cmd, inst.rest
    if not rest and cmd not in ("run", "cmd", "entrypoint"):
        raise inst.error("requires at least one argument")
    if cmd in ("run",) and not rest:
        raise inst.error("requires at least one argument")
    if cmd == "shell" and inst.json is None:
        raise inst.error("requires the arguments to be in JSON form")
    if cmd in ("copy", "add"):
        count = len(inst.json) if inst.json is not None else len(rest.split())
        if count < 2:
            raise inst.error("requires at least two arguments, but only one was provided. "
                             "Destination could not be determined")
    if cmd in ("env", "label", "arg"):
        pairs(inst, {}, "\\", check_only=True)
    if cmd == "healthcheck":
        kind = rest.split()[0].upper()
        if kind not in ("CMD", "NONE"):
            raise inst.error(f"unknown type {kind!r}: must be CMD or NONE")
    if cmd == "stopsignal" and len(rest.split()) != 1:
        raise inst.error("requires exactly one argument")
    if cmd == "arg" and len(rest.split()) != 1 and "=" not in rest:
        raise inst.error("ARG requires exactly one argument")


# -- words and substitution -------------------------------------------------------------

def expand(text: str, env: dict[str, str], escape: str = "\\") -> str:
    """One word: quotes removed, variables substituted (whitespace kept)."""
    return _Lexer(text, env, escape).word(split=False)[0]


def words(text: str, env: dict[str, str], escape: str = "\\") -> list[str]:
    """Split on unquoted whitespace, removing quotes and substituting variables."""
    return _Lexer(text, env, escape).word(split=True)


class _Lexer:
    def __init__(self, text: str, env: dict[str, str], escape: str):
        self.text, self.env, self.escape, self.i = text, env, escape, 0

    def _peek(self) -> str:
        return self.text[self.i] if self.i < len(self.text) else ""

    def word(self, split: bool) -> list[str]:
        out: list[str] = []
        buf: list[str] = []
        started = False
        while self.i < len(self.text):
            c = self.text[self.i]
            if split and c in " \t\n":
                if started:
                    out.append("".join(buf))
                    buf, started = [], False
                self.i += 1
                continue
            started = True
            if c == self.escape:
                self.i += 1
                if self.i < len(self.text):
                    buf.append(self.text[self.i])
                    self.i += 1
                else:
                    buf.append(c)
            elif c == "'":
                end = self.text.find("'", self.i + 1)
                if end < 0:
                    raise InvalidArgument(f"unexpected end of statement while looking for matching single-quote in {self.text!r}")
                buf.append(self.text[self.i + 1:end])
                self.i = end + 1
            elif c == '"':
                self.i += 1
                buf.append(self._double())
            elif c == "$":
                buf.append(self._variable())
            else:
                buf.append(c)
                self.i += 1
        if started or not split:
            out.append("".join(buf))
        return out

    def _double(self) -> str:
        buf: list[str] = []
        while True:
            c = self._peek()
            if not c:
                raise InvalidArgument(f"unexpected end of statement while looking for matching double-quote in {self.text!r}")
            if c == '"':
                self.i += 1
                return "".join(buf)
            if c == self.escape and self.i + 1 < len(self.text) and self.text[self.i + 1] in '"$' + self.escape:
                buf.append(self.text[self.i + 1])
                self.i += 2
            elif c == "$":
                buf.append(self._variable())
            else:
                buf.append(c)
                self.i += 1

    def _variable(self) -> str:
        self.i += 1  # the $
        c = self._peek()
        if c == "{":
            end = self._closing(self.i)
            body = self.text[self.i + 1:end]
            self.i = end + 1
            return self._braced(body)
        m = re.match(r"[a-zA-Z_][a-zA-Z0-9_]*", self.text[self.i:])
        if not m:
            return "$"
        self.i += m.end()
        return self.env.get(m.group(0), "")

    def _closing(self, start: int) -> int:
        depth = 0
        for j in range(start, len(self.text)):
            if self.text[j] == "{":
                depth += 1
            elif self.text[j] == "}":
                depth -= 1
                if depth == 0:
                    return j
        raise InvalidArgument(f"missing '}}' in {self.text!r}")

    def _braced(self, body: str) -> str:
        m = re.match(r"([a-zA-Z_][a-zA-Z0-9_]*)(:?[-+?])?(.*)$", body, re.S)
        if not m:
            raise InvalidArgument(f"bad substitution: ${{{body}}}")
        name, op, word = m.group(1), m.group(2), m.group(3)
        if not op:
            if word:
                raise InvalidArgument(f"unsupported modifier in ${{{body}}}")
            return self.env.get(name, "")
        value = self.env.get(name)
        unset = value is None or (op.startswith(":") and value == "")
        sub = lambda: _Lexer(word, self.env, self.escape).word(split=False)[0]  # noqa: E731
        if op.endswith("-"):
            return sub() if unset else value
        if op.endswith("+"):
            return "" if unset else sub()
        if unset:
            raise InvalidArgument(f"{name}: {sub() or 'is not allowed to be empty'}")
        return value


def pairs(inst: Instruction, env: dict[str, str], escape: str,
          check_only: bool = False) -> list[tuple[str, str | None]]:
    """ENV/LABEL/ARG arguments as (name, value) pairs: `k=v k2="v 2"` or the legacy `k v`
    (value None: an ARG without default)."""
    rest = inst.rest
    first = rest.split(None, 1)[0] if rest.split() else ""
    if inst.cmd != "arg" and "=" not in first:
        name, _, value = rest.partition(" ") if " " in rest else rest.partition("\t")
        if not value.strip():
            raise inst.error(f"{inst.cmd.upper()} {name} requires a value (NAME=VALUE or NAME VALUE)")
        return [(name, None if check_only else expand(value.strip(), env, escape))]
    raw = words(rest, {}, escape) if check_only else words(rest, env, escape)
    out: list[tuple[str, str | None]] = []
    for w in raw:
        name, eq, value = w.partition("=")
        if not name:
            raise inst.error(f"{inst.cmd.upper()} names can not be blank")
        if not eq and inst.cmd != "arg":
            raise inst.error(f"Syntax error - can't find = in {w!r}. Must be of the form: name=value")
        if inst.cmd in ("env", "arg") and not _NAME.fullmatch(name):
            raise inst.error(f"invalid variable name {name!r}")
        out.append((name, value if eq else None))
    return out
