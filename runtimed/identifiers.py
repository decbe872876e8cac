"""Identifier validation, as containerd validates namespaces, container and lease ids.

An identifier is 1..76 characters of letters, digits, `.`, `_` and `-`, starting and ending
with a letter or digit, with no two separators in a row.
"""

from __future__ import annotations

import re

from runtimed.errors import InvalidArgument

MAX_LENGTH = 76
_ALNUM = r"[A-Za-z0-9]+"
_IDENTIFIER = re.compile(rf"{_ALNUM}(?:[._-]{_ALNUM})*")


def validate(identifier: str, kind: str = "identifier") -> str:
    """Return `identifier` when valid, else raise InvalidArgument saying what is wrong."""
    if not identifier:
        raise InvalidArgument(f"{kind} must not be empty")
    if len(identifier) > MAX_LENGTH:
        raise InvalidArgument(
            f"{kind} {identifier[:MAX_LENGTH]}...: longer than {MAX_LENGTH} characters"
        )
    if not _IDENTIFIER.fullmatch(identifier):  # match's `$` lets a final newline in
        raise InvalidArgument(
            f"{kind} {identifier!r}: must be letters, digits, '.', '_' or '-', starting and "
            "ending with a letter or digit, with no two separators in a row"
        )
    return identifier
