"""The cheap depth gate on the media hot path gives the full scan's verdict on every input."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from media.untrusted import MAX_DEPTH, nesting_depth, too_deep


@given(st.text(alphabet='[]{}"\\ a:,', max_size=120), st.integers(min_value=0, max_value=40))
def test_too_deep_is_the_scan_verdict(text: str, limit: int) -> None:
    assert too_deep(text, limit) == (nesting_depth(text) > limit)
    assert too_deep(text.encode(), limit) == (nesting_depth(text) > limit)


def test_brackets_in_strings_do_not_count_and_deep_frames_do() -> None:
    many_in_a_string = '{"event":"mark","mark":{"name":"' + "[" * (MAX_DEPTH * 3) + '"}}'
    assert not too_deep(many_in_a_string)
    assert too_deep("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    assert not too_deep("[" * MAX_DEPTH + "]" * MAX_DEPTH)
