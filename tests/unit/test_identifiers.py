import pytest

from runtimed.errors import InvalidArgument
from runtimed.identifiers import validate


@pytest.mark.parametrize("good", ["default", "a", "k8s.io", "my_ns-1", "A1.b2_c3", "x" * 76])
def test_valid(good):
    assert validate(good) == good


@pytest.mark.parametrize("bad", ["", "-a", "a-", "a..b", "a b", "a/b", "ü", "x" * 77, ".a",
                                 "default\n", "a\nb", "\na"])
def test_invalid(bad):
    with pytest.raises(InvalidArgument):
        validate(bad, "namespace")
