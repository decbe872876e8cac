"""containerd's filter grammar, used by every List and by Subscribe.

    filters   := filter* (several filter strings OR together; none matches everything)
    filter    := selector ("," selector)*            all selectors must match
    selector  := fieldpath [operator value]          no operator: the field is present
    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z0-9_]+
    operator  := "==" | "!=" | "~="                  ~= is a regular expression search
    value     := quoted | [^\\s,]+
    quoted    := "..." (or /.../ and |...| after ~=), with Go string escapes

Objects are matched through a lookup function: `lookup(("labels", "a.b"))` returns the
field's value, or None when the object has no such field.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from runtimed.errors import InvalidArgument

Lookup = Callable[[tuple[str, ...]], "str | None"]

_QUOTES = {'"', "/", "|"}
_OPERATORS = ("==", "!=", "~=")
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}


@dataclass(frozen=True)
class Selector:
    fieldpath: tuple[str, ...]
    operator: str | None = None  # None: presence test
    value: str = ""
    pattern: re.Pattern | None = None

    def match(self, lookup: Lookup) -> bool:
        value = lookup(self.fieldpath)
        if self.operator is None:
            return value is not None
        if self.operator == "==":
            return value is not None and value == self.value
        if self.operator == "!=":
            return (value or "") != self.value
        return value is not None and self.pattern.search(value) is not None


@dataclass(frozen=True)
class Filter:
    """OR of ANDs of selectors; the empty filter matches everything."""

    alternatives: tuple[tuple[Selector, ...], ...] = ()

    def match(self, lookup: Lookup) -> bool:
        if not self.alternatives:
            return True
        return any(all(s.match(lookup) for s in selectors) for selectors in self.alternatives)

    def __bool__(self) -> bool:
        return bool(self.alternatives)


def parse(filters: Iterable[str] | str | None) -> Filter:
    """Parse filter strings (ORed) into a Filter; InvalidArgument points at the error."""
    if filters is None:
        return Filter()
    if isinstance(filters, str):
        filters = [filters]
    alternatives = [_Parser(text).selectors() for text in filters if text != ""]
    if any(text == "" for text in filters) and alternatives:
        return Filter()  # an empty filter string matches everything, so the OR does too
    return Filter(tuple(alternatives))


def labels_lookup(fields: Mapping[str, str | None], labels: Mapping[str, str]) -> Lookup:
    """A lookup for the common shape: top-level string fields plus `labels.<key>`."""

    def lookup(path: tuple[str, ...]) -> str | None:
        if len(path) == 2 and path[0] == "labels":
            return labels.get(path[1])
        if len(path) == 1:
            return fields.get(path[0])
        return None

    return lookup


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def error(self, message: str) -> InvalidArgument:
        marked = f"{self.text[:self.pos]} >|{self.text[self.pos:self.pos + 1]}|< {self.text[self.pos + 1:]}"
        return InvalidArgument(f"filters: parse error: [{marked.strip()}]: {message}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def selectors(self) -> tuple[Selector, ...]:
        result = [self.selector()]
        while True:
            ch = self.peek()
            if ch == "":
                return tuple(result)
            if ch != ",":
                raise self.error(f"unexpected input: {ch}")
            self.pos += 1
            result.append(self.selector())

    def selector(self) -> Selector:
        path = [self.field()]
        while self.peek() == ".":
            self.pos += 1
            path.append(self.field())
        if self.peek() in ("", ","):
            return Selector(tuple(path))
        operator = self.operator()
        value = self.value(alt_quotes=operator == "~=")
        pattern = None
        if operator == "~=":
            try:
                pattern = re.compile(value)
            except re.error as exc:
                raise self.error(f"invalid regular expression {value!r}: {exc}") from None
        return Selector(tuple(path), operator, value, pattern)

    def field(self) -> str:
        ch = self.peek()
        if ch == '"':
            return self.quoted()
        start = self.pos
        while self.pos < len(self.text) and _is_field_char(self.text[self.pos]):
            self.pos += 1
        if start == self.pos:
            raise self.error("expected field or quoted")
        return self.text[start:self.pos]

    def operator(self) -> str:
        self.skip_space()
        candidate = self.text[self.pos:self.pos + 2]
        if candidate not in _OPERATORS:
            raise self.error('expected an operator ("=="|"!="|"~=")')
        self.pos += 2
        return candidate

    def value(self, alt_quotes: bool) -> str:
        ch = self.peek()
        if ch == "":
            raise self.error("expected value or quoted")
        if ch in _QUOTES:
            if ch != '"' and not alt_quotes:
                raise self.error("invalid quote encountered")
            return self.quoted()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] != "," and not self.text[self.pos].isspace():
            self.pos += 1
        return self.text[start:self.pos]

    def quoted(self) -> str:
        quote = self.text[self.pos]
        self.pos += 1
        out = []
        while True:
            if self.pos >= len(self.text) or self.text[self.pos] == "\n":
                raise self.error("quoted literal not terminated")
            ch = self.text[self.pos]
            self.pos += 1
            if ch == quote:
                return "".join(out)
            if ch != "\\":
                out.append(ch)
                continue
            out.append(self.escape(quote))

    def escape(self, quote: str) -> str:
        if self.pos >= len(self.text):
            raise self.error("quoted literal not terminated")
        ch = self.text[self.pos]
        self.pos += 1
        if ch in _ESCAPES:
            return _ESCAPES[ch]
        if ch == quote:
            return quote
        widths = {"x": (16, 2), "u": (16, 4), "U": (16, 8)}
        if ch in widths or ch in "01234567":
            base, count = widths.get(ch, (8, 3))
            start = self.pos if ch in widths else self.pos - 1
            digits = self.text[start:start + count]
            try:
                if len(digits) != count:
                    raise ValueError
                code = int(digits, base)
            except ValueError:
                raise self.error("illegal numeric escape sequence") from None
            self.pos = start + count
            return chr(code)
        raise self.error("illegal escape sequence")


def _is_field_char(ch: str) -> bool:
    return ch == "_" or (ch.isascii() and ch.isalnum())
