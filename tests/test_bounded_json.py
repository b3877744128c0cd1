"""Bounded JSON: the nesting scan agrees with the parser's own idea of depth on any document,
and what json would accept silently (deep nesting, NaN, repeated keys) is refused by name."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vmmpy.boundedjson as bj
from vmmpy.boundedjson import BoundedJsonError, nesting_depth, parse

# Strings full of the characters the scan must see through: quotes, backslashes, brackets.
TRICKY_TEXT = st.text(alphabet=st.sampled_from(list('ab"\\[]{}\u00e9\n')), max_size=12)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | TRICKY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TRICKY_TEXT, inner, max_size=4),
    max_leaves=40,
)


def depth(value) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    return 0


@pytest.fixture(params=["short", "long"])
def scanner(request, monkeypatch):
    """Each test below runs with both scans: documents up to SMALL_DOCUMENT bytes are scanned
    without numpy, longer ones vectorised."""
    monkeypatch.setattr(bj, "SMALL_DOCUMENT", 1 << 62 if request.param == "short" else -1)
    return request.param


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # one scan per test
@given(JSON_VALUES, st.booleans())
def test_the_scan_measures_the_depth_the_parser_sees(scanner, value, ascii_only):
    data = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert nesting_depth(data) == depth(value)
    assert parse(data, max_bytes=len(data), max_depth=depth(value)) == value
    if depth(value) > 0:
        with pytest.raises(BoundedJsonError, match=f"nest more than the {depth(value) - 1} levels allowed"):
            parse(data, max_bytes=len(data), max_depth=depth(value) - 1)


# Bytes that are anything but JSON: every escape, quote and bracket in any order.
RAW = st.binary(max_size=64) | st.lists(st.sampled_from([b"[", b"]", b"{", b"}", b'"', b"\\", b"a", b"\x00", b"\xff"]), max_size=80).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(RAW)
def test_the_two_scans_agree_on_any_bytes(raw):
    """The short scan (regex, translate, accumulate) and the vectorised one give the same depth
    on anything, valid JSON or not."""
    flat = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    assert bj._depth_short(flat) == bj._depth_long(flat, 1 << 62)


def test_brackets_far_apart_are_scanned_across_blocks(scanner):
    """The scan works in blocks: a string opened in one block and closed in the next must not
    let its brackets count, and depth must carry over."""
    data = b'[[[' + b'"' + b"[" * (3 << 20) + b'"' + b"]]]"
    assert nesting_depth(data) == 3
    assert parse(data, max_bytes=len(data), max_depth=3)[0][0][0] == "[" * (3 << 20)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"[" * 100_000, "nest more than the 16 levels allowed"),
        (b"{" * 100_000, "nest more than the 16 levels allowed"),
        (b"x" * 200_001, "200001 bytes is more than the 200000 allowed"),
        (b"[NaN]", "NaN is not a JSON number"),
        (b"[-Infinity]", "-Infinity is not a JSON number"),
        (b'{"a": 1, "a": 1}', "key 'a' appears twice in one object"),
        (b'"\xff"', r"not UTF-8 \(byte 1\)"),
        (b"[1,", "not valid JSON"),
    ],
)
def test_what_json_accepts_silently_is_refused(scanner, data, message):
    with pytest.raises(BoundedJsonError, match=message):
        parse(data, max_bytes=200_000, max_depth=16)
