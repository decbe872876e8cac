"""Digest strings (`algorithm:hex`) as the OCI image spec defines them."""

from __future__ import annotations

import re

from runtimed.errors import InvalidArgument

_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}
_DIGEST = re.compile(r"^([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")


def validate(digest: str) -> str:
    """Return `digest` when well formed, else InvalidArgument naming the problem."""
    match = _DIGEST.fullmatch(digest or "")
    if not match:
        raise InvalidArgument(f"digest {digest!r}: not of the form sha256:<64 hex digits>")
    algorithm, encoded = match.groups()
    length = _LENGTHS.get(algorithm)
    if length is None:
        raise InvalidArgument(f"digest {digest!r}: unsupported algorithm {algorithm!r}")
    if len(encoded) != length or not re.fullmatch(r"[a-f0-9]+", encoded):
        raise InvalidArgument(
            f"digest {digest!r}: {algorithm} needs {length} lowercase hex digits"
        )
    return digest
