"""The filter grammar, against containerd's documented semantics and by properties."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtimed.errors import InvalidArgument
from runtimed.filters import parse

OBJECT = {
    ("name",): "docker.io/library/busybox:latest",
    ("target", "digest"): "sha256:abc",
    ("labels", "a.b"): "c",
    ("labels", "empty"): "",
}


def lookup(path):
    return OBJECT.get(path)


@pytest.mark.parametrize(
    "filters, expected",
    [
        ([], True),
        ([""], True),
        (["name==docker.io/library/busybox:latest"], True),
        (["name!=docker.io/library/busybox:latest"], False),
        (["name~=busybox"], True),
        (["name~=/^busybox/"], False),
        (["name~=|library/[a-z]+|"], True),
        (['labels."a.b"==c'], True),
        (['labels."a.b"==d'], False),
        (["labels.empty"], True),  # presence, even with an empty value
        (["labels.missing"], False),
        (["labels.missing!=x"], True),  # absent counts as empty for !=
        (["target.digest==sha256:abc,name~=busy"], True),  # comma is AND
        (["target.digest==sha256:abc,name~=nope"], False),
        (["name==nope", "labels.empty"], True),  # several strings OR
        (['name=="docker.io/library/busybox:latest"'], True),
        ([" name == docker.io/library/busybox:latest "], True),
        (['labels."a.b"=="c\\x00"'], False),
    ],
)
def test_semantics(filters, expected):
    assert parse(filters).match(lookup) is expected


@pytest.mark.parametrize(
    "text",
    ["name=foo", "name==", "==foo", "name==a,", "name~=(", 'labels."a', "name==/x/", "name==a b"],
)
def test_invalid_filters_raise_invalid_argument(text):
    with pytest.raises(InvalidArgument, match="filters: parse error"):
        parse([text])


fields = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,8}", fullmatch=True)
values = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=12)


def quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@given(fields, values)
def test_quoted_equality_roundtrips_any_value(field, value):
    assert parse([f"{field}=={quote(value)}"]).match(lambda p: value if p == (field,) else None)
    assert not parse([f"{field}!={quote(value)}"]).match(lambda p: value if p == (field,) else None)


@given(st.lists(st.tuples(fields, values), min_size=1, max_size=4), values)
def test_conjunction_matches_iff_every_selector_matches(pairs, other):
    obj = dict(pairs)
    text = ",".join(f"{k}=={quote(v)}" for k, v in obj.items())
    assert parse([text]).match(lambda p: obj.get(p[0]) if len(p) == 1 else None)
    first = next(iter(obj))
    if obj[first] != other:
        changed = {**obj, first: other}
        assert not parse([text]).match(lambda p: changed.get(p[0]) if len(p) == 1 else None)


@given(st.lists(st.booleans(), min_size=1, max_size=5))
def test_disjunction_of_filter_strings(truths):
    filters = ["present" if t else "absent" for t in truths]
    assert parse(filters).match(lambda p: "x" if p == ("present",) else None) is any(truths)
