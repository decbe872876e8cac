"""The Dockerfile parser, word expansion and .dockerignore rules (no daemon needed)."""

from __future__ import annotations

import pytest

from runtimed.build import dockerfile as df
from runtimed.build.context import Ignore
from runtimed.errors import InvalidArgument


def _one(text: str) -> df.Instruction:
    return df.parse("FROM scratch\n" + text).stages[0].instructions[0]


def _error(text: str) -> str:
    with pytest.raises(InvalidArgument) as info:
        df.parse(text)
    return str(info.value)


# -- structure ---------------------------------------------------------------------------

def test_instructions_are_case_insensitive():
    d = df.parse("from busybox\nrun echo hi\nCopy a b\n")
    assert [i.cmd for i in d.stages[0].instructions] == ["run", "copy"]
    assert d.stages[0].base == "busybox"


def test_comments_and_blank_lines_are_skipped():
    d = df.parse("# a comment\n\nFROM busybox\n   # indented comment\nRUN true\n")
    assert len(d.stages[0].instructions) == 1


def test_line_continuation_joins_lines_and_drops_inner_comments():
    inst = _one("RUN echo a \\\n  # inside\n\n  && echo b\n")
    assert inst.rest == "echo a   && echo b"
    assert inst.line == 2


def test_line_numbers_follow_continuations():
    d = df.parse("FROM scratch\nRUN a \\\n b\nRUN c\n")
    assert [i.line for i in d.stages[0].instructions] == [2, 4]


def test_escape_directive_backtick():
    d = df.parse("# escape=`\nFROM scratch\nRUN echo a `\n b\n")
    assert d.escape == "`"
    assert d.stages[0].instructions[0].rest == "echo a  b"


def test_syntax_directive_recorded():
    d = df.parse("# syntax=docker/dockerfile:1\nFROM scratch\n")
    assert d.directives == {"syntax": "docker/dockerfile:1"}


def test_directive_after_comment_is_a_comment():
    d = df.parse("# hello\n# escape=`\nFROM scratch\nRUN a \\\n b\n")
    assert d.escape == "\\"


def test_duplicate_directive_refused():
    assert "line 2" in _error("# escape=`\n# escape=\\\nFROM scratch\n")


def test_bad_escape_refused():
    assert "escape" in _error("# escape=x\nFROM scratch\n")


def test_json_and_shell_forms():
    assert _one('CMD ["a", "b c"]').json == ["a", "b c"]
    assert _one("CMD a b").json is None
    assert _one('CMD ["a", 1]').json is None  # not a string array: shell form, as docker


def test_flags_split_from_arguments():
    inst = _one("COPY --from=build --chown=1:2 /a /b")
    assert inst.flags == {"from": ["build"], "chown": ["1:2"]}
    assert inst.rest == "/a /b"


def test_multi_stage_names_and_index_lookup():
    d = df.parse("FROM busybox AS Build\nRUN x\nFROM scratch\nCOPY --from=build /x /x\n")
    assert d.stages[0].name == "build"
    assert d.stage("build") is d.stages[0]
    assert d.stage("0") is d.stages[0]
    assert d.stage("1") is d.stages[1]
    assert d.stage("nope") is None


def test_from_platform_flag():
    assert df.parse("FROM --platform=linux/amd64 busybox\n").stages[0].platform == "linux/amd64"


def test_args_before_from_are_meta_args():
    d = df.parse("ARG V=1\nARG W\nFROM busybox:${V}\n")
    assert [i.rest for i in d.meta_args] == ["V=1", "W"]


# -- errors with line numbers -----------------------------------------------------------

@pytest.mark.parametrize("text, line, words", [
    ("FROM scratch\nFOO bar\n", 2, "unknown instruction: FOO"),
    ("RUN true\n", 1, "before the first FROM"),
    ("FROM scratch\nRUN\n", 2, "at least one argument"),
    ("FROM scratch\n\nCOPY onlyone\n", 3, "at least two arguments"),
    ("FROM scratch\nCOPY --bogus=1 a b\n", 2, "unknown flag: --bogus"),
    ("FROM scratch\nCOPY --from a b\n", 2, "missing a value"),
    ("FROM scratch\nRUN --mount=type=cache,target=/x true\n", 2, "unknown flag: --mount"),
    ("FROM scratch\nSHELL /bin/bash -c\n", 2, "JSON form"),
    ("FROM scratch\nENV a=1 b\n", 2, "can't find ="),
    ("FROM scratch\nENV =1\n", 2, "names can not be blank"),
    ("FROM scratch\nENV onlyname\n", 2, "requires a value"),
    ("FROM scratch\nARG a b\n", 2, "exactly one argument"),
    ("FROM scratch\nHEALTHCHECK FOO x\n", 2, "CMD or NONE"),
    ("FROM scratch\nSTOPSIGNAL A B\n", 2, "exactly one argument"),
    ("FROM a b\n", 1, "one or three arguments"),
    ("FROM a AS 1x\n", 1, "invalid name"),
    ("FROM a AS x\nFROM b AS x\n", 2, "duplicate name"),
])
def test_errors_name_the_line(text, line, words):
    message = _error(text)
    assert f"line {line}" in message and words in message


def test_no_from_at_all():
    assert "no FROM" in _error("# just a comment\n")


# -- words and substitution -------------------------------------------------------------

ENV = {"A": "x", "EMPTY": "", "SP": "a b"}


@pytest.mark.parametrize("text, expected", [
    ("$A", "x"),
    ("${A}", "x"),
    ("pre-${A}-post", "pre-x-post"),
    ("$UNSET", ""),
    ("${UNSET:-def}", "def"),
    ("${EMPTY:-def}", "def"),
    ("${EMPTY-def}", ""),
    ("${A:-def}", "x"),
    ("${A:+alt}", "alt"),
    ("${UNSET:+alt}", ""),
    ("${EMPTY+alt}", "alt"),
    ("${UNSET:-${A}}", "x"),
    ("'$A'", "$A"),
    ('"$A"', "x"),
    ("\\$A", "$A"),
    ('"a\\"b"', 'a"b'),
    ("$", "$"),
])
def test_expand(text, expected):
    assert df.expand(text, ENV) == expected


def test_words_split_on_unquoted_space_only():
    assert df.words('a "b c" d\\ e \'f g\'', {}) == ["a", "b c", "d e", "f g"]


def test_substituted_value_is_not_split():
    assert df.words("$SP z", ENV) == ["a b", "z"]


def test_required_variable_error():
    with pytest.raises(InvalidArgument, match="must be set"):
        df.expand("${UNSET:?must be set}", {})


def test_unterminated_quote():
    with pytest.raises(InvalidArgument, match="double-quote"):
        df.words('"abc', {})


def test_backtick_escape_in_words():
    assert df.words("a` b", {}, "`") == ["a b"]


def test_env_pairs_both_forms():
    assert df.pairs(_one('ENV a=1 b="two words" c=$A'), {"A": "z"}, "\\") == [
        ("a", "1"), ("b", "two words"), ("c", "z")]
    assert df.pairs(_one("ENV name the whole  rest"), {}, "\\") == [("name", "the whole  rest")]


def test_label_keys_may_be_dotted_and_quoted():
    assert df.pairs(_one('LABEL "org.x.y"="v 1" plain=2'), {}, "\\") == [
        ("org.x.y", "v 1"), ("plain", "2")]


def test_arg_without_default():
    assert df.pairs(_one("ARG NAME"), {}, "\\") == [("NAME", None)]


# -- .dockerignore -----------------------------------------------------------------------

@pytest.mark.parametrize("rules, path, ignored", [
    ("secret.txt", "secret.txt", True),
    ("secret.txt", "dir/secret.txt", False),
    ("*.log", "a.log", True),
    ("*.log", "dir/a.log", False),
    ("**/*.log", "dir/sub/a.log", True),
    ("**/*.log", "a.log", True),
    ("build", "build/out/x", True),
    ("/build", "build/x", True),
    ("*.md\n!README.md", "README.md", False),
    ("*.md\n!README.md", "NOTES.md", True),
    ("# comment\n\nx", "x", True),
    ("dir/?.txt", "dir/a.txt", True),
    ("dir/?.txt", "dir/ab.txt", False),
    ("[ab].c", "a.c", True),
    ("[!ab].c", "a.c", False),
])
def test_dockerignore(rules, path, ignored):
    assert Ignore(rules).ignored(path) is ignored
