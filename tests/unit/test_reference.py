"""Docker reference parsing and normalisation (runtimed.images.reference)."""

import pytest

from runtimed.errors import InvalidArgument
from runtimed.images import reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    "text, expected",
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36"),
        ("user/app", "docker.io/user/app:latest"),
        ("index.docker.io/busybox", "docker.io/library/busybox:latest"),
        ("docker.io/library/busybox:latest", "docker.io/library/busybox:latest"),
        ("localhost/foo", "localhost/foo:latest"),
        ("localhost:5000/a/b:v1", "localhost:5000/a/b:v1"),
        ("127.0.0.1:5000/x", "127.0.0.1:5000/x:latest"),
        ("quay.io/org/img_a-b.c:v1.2-rc", "quay.io/org/img_a-b.c:v1.2-rc"),
        (f"busybox@{DIGEST}", f"docker.io/library/busybox@{DIGEST}"),
        (f"registry.example:443/a:t@{DIGEST}", f"registry.example:443/a:t@{DIGEST}"),
    ],
)
def test_normalize(text, expected):
    assert reference.normalize(text) == expected


def test_parts_and_familiar_name():
    ref = reference.parse("localhost:5000/team/app:v2")
    assert (ref.domain, ref.path, ref.tag, ref.digest) == ("localhost:5000", "team/app", "v2", None)
    assert ref.object == "v2"
    assert reference.parse("busybox").familiar == "busybox:latest"
    assert reference.parse("docker.io/user/app:1").familiar == "user/app:1"
    pinned = reference.parse(f"busybox:1@{DIGEST}")
    assert pinned.object == DIGEST  # the digest decides what is fetched
    assert reference.parse("busybox", default_tag=False).tag is None


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("Busybox", "lowercase"),
        ("localhost:5000/UPPER", "lowercase"),
        ("ab" * 32, "image id"),
        ("foo:", "expected"),
        ("a//b", "expected"),
        ("foo@sha256:abc", "expected"),
        ("foo:" + "t" * 129, "expected"),
        ("-foo", "expected"),
        ("x/" * 130 + "y", "longer than 255"),
    ],
)
def test_invalid_references_name_the_input(text, fragment):
    with pytest.raises(InvalidArgument) as info:
        reference.parse(text)
    assert fragment in str(info.value)
    if text:
        assert repr(text)[:40].rstrip("'") in str(info.value)


def test_parse_strict_requires_host():
    with pytest.raises(InvalidArgument, match="no registry host"):
        reference.parse_strict("busybox:latest")
    assert str(reference.parse_strict("docker.io/library/busybox")) == "docker.io/library/busybox"


def test_with_digest_validates():
    ref = reference.parse("busybox")
    assert ref.with_digest(DIGEST).digest == DIGEST
    with pytest.raises(InvalidArgument, match="invalid digest"):
        ref.with_digest("md5:00")


@pytest.mark.parametrize("text", ["docker.io/library/busybox:latest\n",
                                  "docker.io/library/busybox@sha256:" + "a" * 64 + "\n"])
def test_a_final_newline_is_not_part_of_a_valid_reference_or_digest(text):
    """Go's regexp `$` ends the text; Python's re.match lets it match before a final
    newline, which accepted these."""
    from runtimed.content import digests

    with pytest.raises(InvalidArgument):
        reference.parse_strict(text)
    with pytest.raises(InvalidArgument):
        digests.validate("sha256:" + "a" * 64 + "\n")
