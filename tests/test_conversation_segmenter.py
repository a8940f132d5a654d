"""The segmenter: speakable pieces cut as tokens arrive, never inside numbers, abbreviations, URLs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.conversation.segmenter import Segmenter, speakable


def cut(text: str, *, step: int | None = None, **kw: int) -> list[str]:
    seg = Segmenter(**kw)
    pieces: list[str] = []
    if step is None:
        pieces += seg.push(text)
    else:
        for i in range(0, len(text), step):
            pieces += seg.push(text[i:i + step])
    return [speakable(p) for p in pieces + seg.flush() if speakable(p)]


def test_sentences_are_cut_as_soon_as_the_next_character_shows_the_end() -> None:
    seg = Segmenter()
    assert seg.push("Sure, one moment.") == []  # the period might be a decimal point: wait
    assert seg.push(" I") == ["Sure, one moment."]
    assert seg.push("'ll check! Ok") == [" I'll check!"]
    assert seg.flush() == [" Ok"]


@pytest.mark.parametrize("text", [
    "It costs 3.5 dollars today and nothing more than that.",
    "We sold 1,000 units and 2,500 more were returned by the stores.",
    "Dr. Smith will see you at 10:30 on Monday morning.",
    "Bring your ID, e.g. a passport or a driving licence from home.",
    "The U.S. office and Mr. J. Doe will call you back tomorrow.",
    "Visit https://example.com/a.b?x=1,2 for the full details please.",
    "Write to jane.doe@example.co.uk and we will answer within days.",
    "Version 2.0.1 ships on Jan. 5 with fixes for the login page.",
])
def test_never_cut_inside_numbers_abbreviations_urls_or_emails(text: str) -> None:
    assert cut(text, step=1) == [text]
    assert cut(text) == [text]


def test_clause_boundary_only_past_the_minimum_length() -> None:
    assert cut("Yes, sure, fine.", min_clause_chars=30) == ["Yes, sure, fine."]
    long = "Your appointment is confirmed for Thursday, and I have sent the details by text."
    assert cut(long, min_clause_chars=30) == ["Your appointment is confirmed for Thursday,",
                                              "and I have sent the details by text."]
    assert cut("Note: bring water; and snacks.", min_clause_chars=4) == ["Note:", "bring water;", "and snacks."]


def test_quotes_and_brackets_stay_with_their_sentence() -> None:
    assert cut('He said "no." Then he left (quickly!) Fine.') == ['He said "no."', "Then he left (quickly!)",
                                                                 "Fine."]
    assert cut("Wait... What?! Really?") == ["Wait...", "What?!", "Really?"]


def test_a_long_run_without_punctuation_is_cut_at_a_space() -> None:
    words = " ".join(["word"] * 40)
    pieces = cut(words, max_chars=50)
    assert all(len(p) <= 50 for p in pieces) and " ".join(pieces) == words


def test_reset_drops_the_uncut_rest() -> None:
    seg = Segmenter()
    seg.push("Half a sentence")
    seg.reset()
    assert seg.push("New. ") == ["New."] and seg.flush() == [" "]


TEXT = st.lists(st.sampled_from(list("ab1 .,;:!?'\"()@/-\n") + ["Dr.", "e.g.", "3.5", "word ", "U.S."]),
                max_size=120).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=TEXT, cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=20),
       min_clause=st.integers(1, 60), max_chars=st.integers(2, 120))
def test_pieces_do_not_depend_on_how_tokens_arrive(text: str, cuts: list[int], min_clause: int, max_chars: int) -> None:
    whole = Segmenter(min_clause_chars=min_clause, max_chars=max_chars)
    expected = whole.push(text) + whole.flush()
    seg = Segmenter(min_clause_chars=min_clause, max_chars=max_chars)
    got: list[str] = []
    last = 0
    for c in sorted({min(c, len(text)) for c in cuts}):
        got += seg.push(text[last:c])
        last = c
    got += seg.push(text[last:]) + seg.flush()
    assert got == expected
    assert "".join(got) == text  # nothing lost, nothing added


@settings(max_examples=200, deadline=None)
@given(a=st.integers(0, 10**6), b=st.integers(0, 999), words=st.lists(st.sampled_from(["cost", "is", "now", "ok"]),
                                                                       min_size=1, max_size=8))
def test_decimal_and_grouped_numbers_stay_whole(a: int, b: int, words: list[str]) -> None:
    number, grouped = f"{a}.{b}", f"{a:,}"
    text = f"{' '.join(words)} {number} and {grouped} {' '.join(words)}."
    pieces = cut(text, step=1, min_clause_chars=1)
    assert any(number in p for p in pieces) and any(grouped in p for p in pieces)


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="min_clause_chars"):
        Segmenter(min_clause_chars=0)
