"""Image references parsed and normalised the way docker does.

`busybox` → `docker.io/library/busybox:latest`; `localhost:5000/a/b@sha256:…` keeps its host
and port. The grammar is the distribution project's: lowercase path components separated by
`.`, `_`, `__` or dashes; a domain is recognised only when the first component contains a
`.` or `:` or is `localhost`; tags are up to 128 word characters; digests are
`algorithm:hex` with at least 32 hex digits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from runtimed.errors import InvalidArgument

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
NAME_TOTAL_LENGTH_MAX = 255

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]*)"
_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_NAME = rf"(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*"

_REFERENCE_RE = re.compile(rf"^({_NAME})(?::({_TAG}))?(?:@({_DIGEST}))?$")
_ANCHORED_NAME_RE = re.compile(rf"^(?:({_DOMAIN})/)?({_COMPONENT}(?:/{_COMPONENT})*)$")
_IDENTIFIER_RE = re.compile(r"^[a-f0-9]{64}$")
_SHA256_RE = re.compile(r"^sha256:[a-f0-9]{64}$")


@dataclass(frozen=True)
class Reference:
    """A fully qualified reference: `domain/path[:tag][@digest]`."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        return f"{self.domain}/{self.path}"

    @property
    def object(self) -> str:
        """What the registry resolves under /manifests/: the digest if pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def familiar(self) -> str:
        """The short form docker prints: `busybox:latest`, `user/app:1`."""
        name = self.name
        if self.domain == DEFAULT_DOMAIN:
            name = self.path
            if name.startswith(OFFICIAL_REPO_PREFIX) and name.count("/") == 1:
                name = name[len(OFFICIAL_REPO_PREFIX) :]
        return name + _suffix(self.tag, self.digest)

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.domain, self.path, self.tag, validate_digest(digest))

    def __str__(self) -> str:
        return self.name + _suffix(self.tag, self.digest)


def _suffix(tag: str | None, digest: str | None) -> str:
    return (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def validate_digest(digest: str) -> str:
    if not _SHA256_RE.fullmatch(digest):
        raise InvalidArgument(
            f"invalid digest {digest!r}: expected sha256: and 64 lowercase hex digits"
        )
    return digest


def _split_domain(name: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    if not sep or ("." not in first and ":" not in first and first != "localhost"):
        domain, remainder = DEFAULT_DOMAIN, name
    else:
        domain, remainder = first, rest
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in remainder:
        remainder = OFFICIAL_REPO_PREFIX + remainder
    return domain, remainder


def parse_strict(text: str, *, shown: str | None = None) -> Reference:
    """Parse an already qualified reference (`host/path[:tag][@digest]`), no defaults.

    `shown` is what the user typed, named in error messages instead of the expanded form.
    """
    shown = text if shown is None else shown
    match = _REFERENCE_RE.fullmatch(text)
    if not match:
        if _REFERENCE_RE.fullmatch(text.lower()):
            raise InvalidArgument(f"invalid reference {shown!r}: repository name must be lowercase")
        raise InvalidArgument(
            f"invalid reference {shown!r}: expected [host[:port]/]name[:tag][@sha256:digest] "
            "with a lowercase name"
        )
    name, tag, digest = match.groups()
    if len(name) > NAME_TOTAL_LENGTH_MAX:
        raise InvalidArgument(
            f"invalid reference {shown!r}: repository name longer than {NAME_TOTAL_LENGTH_MAX} characters"
        )
    if digest is not None:
        validate_digest(digest)
    name_match = _ANCHORED_NAME_RE.fullmatch(name)
    domain, path = name_match.groups() if name_match else (None, name)
    if not domain:
        raise InvalidArgument(f"invalid reference {shown!r}: no registry host (e.g. docker.io/)")
    return Reference(domain, path, tag, digest)


def parse(text: str, *, default_tag: bool = True) -> Reference:
    """Parse a reference as docker does: add `docker.io/`, `library/` and `:latest` as needed.

    A reference with both a tag and a digest keeps both (the digest decides what is fetched).
    """
    text = text.strip()
    if not text:
        raise InvalidArgument("invalid reference: empty")
    if _IDENTIFIER_RE.fullmatch(text):
        raise InvalidArgument(
            f"invalid reference {text!r}: a 64-character hex string is an image id, not a name"
        )
    domain, remainder = _split_domain(text)
    repo = remainder.split("@", 1)[0]
    repo = repo.rsplit(":", 1)[0] if ":" in repo else repo
    if repo.lower() != repo:
        raise InvalidArgument(f"invalid reference {text!r}: repository name must be lowercase")
    ref = parse_strict(f"{domain}/{remainder}", shown=text)
    if default_tag and ref.tag is None and ref.digest is None:
        ref = Reference(ref.domain, ref.path, DEFAULT_TAG, None)
    return ref


def normalize(text: str) -> str:
    """The canonical string of a reference: `busybox` → `docker.io/library/busybox:latest`."""
    return str(parse(text))
