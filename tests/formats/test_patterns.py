"""lora_tools.patterns gives re's answers, refuses what it cannot bound, and never backtracks."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_tools import patterns
from lora_tools.patterns import PatternError

ATOMS = ["a", "b", "q", "_", ".", r"\.", r"\d", r"\w", "[ab]", "[^a.]", "[0-9]", "proj", "q_proj"]
QUANTS = ["", "*", "+", "?", "*?", "+?", "??", "{2}", "{1,3}", "{0,2}?", "{2,}"]


@st.composite
def regexes(draw, depth=0):
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        if depth < 2 and draw(st.integers(0, 4)) == 0:
            alts = draw(st.lists(regexes(depth + 1), min_size=1, max_size=3))
            atom = "(" + "|".join(alts) + ")"
        else:
            atom = draw(st.sampled_from(ATOMS))
        parts.append(atom + draw(st.sampled_from(QUANTS)))
    body = "".join(parts)
    if draw(st.booleans()):
        body = "^" + body
    if draw(st.booleans()):
        body += draw(st.sampled_from(["$", r"\Z", r"\b"]))
    return body


names = st.lists(
    st.sampled_from(["a", "b", "q", "_", ".", "0", "7", "proj", "q_proj", "layers", "\n"]),
    max_size=8,
).map("".join)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(regexes(), names)
def test_match_and_fullmatch_agree_with_re(pattern, name):
    assert patterns.match(pattern, name) == (re.match(pattern, name) is not None)
    assert patterns.fullmatch(pattern, name) == (re.fullmatch(pattern, name) is not None)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(regexes(), names)
def test_peft_pattern_matches_agrees_with_peft_rule(key, name):
    expected = re.match(rf"(.*\.)?({key})$", name) is not None
    assert patterns.peft_pattern_matches(key, name) == expected


@pytest.mark.parametrize(
    ("pattern", "name"),
    [
        ("q_proj", "model.layers.0.self_attn.q_proj"),
        ("q_proj", "model.layers.0.self_attn.q_projx"),
        ("layers.1.mlp", "model.layers.1.mlp"),
        ("layers.1.mlp", "model.layersX1.mlp"),
        ("(?i:Q_PROJ)", "a.q_proj"),
        ("a.c", "xa\nc"),
        ("(?s:a.c)", "xa\nc"),
        ("q_proj", "x.q_proj\n"),
        ("[a-z]+_proj", "model.q_proj"),
    ],
)
def test_fixed_cases_agree_with_peft_rule(pattern, name):
    expected = re.match(rf"(.*\.)?({pattern})$", name) is not None
    assert patterns.peft_pattern_matches(pattern, name) == expected


@pytest.mark.parametrize(
    "pattern",
    [
        r"(a)\1",
        r"(?P<x>a)(?P=x)",
        r"a(?=b)",
        r"a(?!b)",
        r"(?<=a)b",
        r"(?<!a)b",
        r"(a)?(?(1)b|c)",
        "(?>a+)b",
        "a++",
        "a*+",
        "(",
        "a{2,1}",
        "[z-a]",
        "*a",
        "a{100000}",
        "(a{1000}){1000}",
    ],
)
def test_refused_constructs_raise_pattern_error(pattern):
    if pattern in ("(?>a+)b", "a++", "a*+") and sys.version_info < (3, 11):
        pytest.skip("re before 3.11 has no atomic groups or possessive repeats")
    with pytest.raises(PatternError):
        patterns.check(pattern)
    with pytest.raises(PatternError):
        patterns.match(pattern, "ab")
    with pytest.raises(PatternError):
        patterns.peft_pattern_matches(pattern, "model.ab")


def test_the_limit_is_the_documented_one():
    patterns.check(f"a{{{patterns.MAX_STATES // 4}}}")
    with pytest.raises(PatternError, match=str(patterns.MAX_STATES)):
        patterns.check(f"a{{{patterns.MAX_STATES + 1}}}")


def test_catastrophic_pattern_completes_with_re_semantics():
    # re backtracks for ~2**5000 steps on these; a regression hangs, and the subprocess
    # timeout turns that into a failure instead of a stuck suite.
    code = (
        "from lora_tools import patterns\n"
        "n = 'a' * 5000\n"
        "print(patterns.match('(a+)+$', n + '!'), patterns.fullmatch('(a+)+', n + '!'),\n"
        "      patterns.fullmatch('(a+)+', n), patterns.match('(a|aa)*b', n),\n"
        "      patterns.peft_pattern_matches('(a+)+', 'x.' + n + '!'),\n"
        "      patterns.peft_pattern_matches('(a+)+', 'x.' + n))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["False", "False", "True", "False", "False", "True"]
