"""Incremental detokenization and stop strings, with the real SmolLM2 tokenizer (byte-level BPE)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.detokenize import IncrementalDetokenizer, StopMatcher
from gateway.tokenization import ChatTokenizer
from tests.unit.gateway_fakes import TOKENIZER_DIR

PROMPT = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer.from_dir(TOKENIZER_DIR, (TOKENIZER_DIR / "chat_template.jinja").read_text())


def stream(tok: ChatTokenizer, ids: list[int], chunk: int = 1, prompt: bool = True) -> list[str]:
    detok = tok.detokenizer(tok.render_ids(PROMPT) if prompt else [])
    parts = [detok.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    parts.append(detok.flush())
    return parts


@pytest.mark.parametrize(
    "text",
    [
        "你好，世界！今天天气很好。",
        "Emoji: 😀👍🏽🇫🇷👨‍👩‍👧 done",
        "naïve café résumé Ωμέγα",
        "unbelievably antidisestablishmentarianism",
        "  leading spaces,   runs   of spaces\tand\n\nnew lines ",
        "def f(x):\n    return x  # code\n",
    ],
)
def test_stream_concatenates_to_one_shot_decode(tok: ChatTokenizer, text: str) -> None:
    ids = tok.encode(text)
    parts = stream(tok, ids)
    assert "".join(parts) == text == tok.decode(ids)
    # No delta ever carries half a character (the U+FFFD a partial UTF-8 sequence decodes to).
    assert all("\ufffd" not in part for part in parts)


def test_multibyte_characters_split_over_tokens_are_held_until_complete(tok: ChatTokenizer) -> None:
    ids = tok.encode("你好😀")
    assert len(ids) > 3, "the test needs characters that span several byte-level tokens"
    parts = stream(tok, ids)
    assert "" in parts[:-1]  # some tokens completed no character and produced nothing
    assert [p for p in parts if p] == ["你", "好", "😀"]


def test_spaces_between_words_are_kept(tok: ChatTokenizer) -> None:
    ids = tok.encode("The quick brown fox")
    parts = stream(tok, ids, prompt=False)
    assert "".join(parts) == "The quick brown fox"
    assert " quick" in parts


def test_character_cut_by_the_length_limit_is_dropped_not_sent_broken(tok: ChatTokenizer) -> None:
    ids = tok.encode("好😀")
    cut = ids[:-1]  # the emoji's last byte never arrives
    assert tok.tokenizer.decode(cut).endswith("\ufffd")
    parts = stream(tok, cut)
    assert "".join(parts) == "好" and all("\ufffd" not in p for p in parts)


def test_special_tokens_are_not_in_the_text(tok: ChatTokenizer) -> None:
    ids = [*tok.encode("Hi there"), 2]  # <|im_end|>
    assert "".join(stream(tok, ids)) == "Hi there"


TEXT = st.text(
    alphabet=st.sampled_from(list("abcxyz ABC.,!?\n\t-'0123") + list("你好世界中文日本語") + list("😀👍🏽🎉éüñ")),
    max_size=40,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, chunk=st.integers(min_value=1, max_value=4), prompt=st.booleans(), cut=st.integers(0, 64))
def test_property_stream_equals_one_shot_decode(
    tok: ChatTokenizer, text: str, chunk: int, prompt: bool, cut: int
) -> None:
    ids = tok.encode(text)
    assert "".join(stream(tok, ids, chunk=chunk, prompt=prompt)) == one_shot(tok, ids) == text
    # A reply cut by max_tokens anywhere, even inside a character: still the one-shot decode, never broken.
    parts = stream(tok, ids[:cut], chunk=chunk, prompt=prompt)
    assert "".join(parts) == one_shot(tok, ids[:cut])
    assert all("\ufffd" not in part for part in parts)


def one_shot(tok: ChatTokenizer, ids: list[int]) -> str:
    """transformers' own decode; an incomplete character at the very end is the one thing the stream drops."""
    text = tok.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert isinstance(text, str)
    return text.rstrip("\ufffd")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(min_value=17, max_value=49151), max_size=24))
def test_property_any_token_ids_stream_equals_one_shot_decode(tok: ChatTokenizer, ids: list[int]) -> None:
    # Arbitrary ids may form invalid UTF-8: whatever the one-shot decode shows, the stream shows too.
    assert "".join(stream(tok, ids, prompt=False)) == one_shot(tok, ids)


class TwoCharTokenizer:
    """A tokenizer whose tokens are literal strings (for stop-string tests independent of BPE)."""

    def convert_ids_to_tokens(self, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
        return [chr(i) for i in ids]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens)


def run_stops(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = [matcher.push(p) for p in pieces]
    out.append(matcher.flush())
    return "".join(out), matcher.stopped


@pytest.mark.parametrize(
    ("pieces", "stops", "expected", "stopped"),
    [
        (["Hello wor", "ld. STO", "P here"], ["STOP"], "Hello world. ", True),
        (["Hello ", "S", "T", "O", "P"], ["STOP"], "Hello ", True),
        (["no stop here"], ["STOP"], "no stop here", False),
        (["ends with ST"], ["STOP"], "ends with ST", False),  # held back, then released at the end
        (["a</", "s>b"], ["</s>", "\n\n"], "a", True),
        (["line\n", "\nnext"], ["</s>", "\n\n"], "line", True),
        (["abcabd"], ["abd"], "abc", True),
        (["x", "y"], [], "xy", False),
    ],
)
def test_stop_strings_across_boundaries(pieces: list[str], stops: list[str], expected: str, stopped: bool) -> None:
    assert run_stops(pieces, stops) == (expected, stopped)


def test_text_that_may_start_a_stop_string_is_held_back() -> None:
    matcher = StopMatcher(["<END>"])
    assert matcher.push("answer <E") == "answer "
    assert matcher.push("N") == ""
    assert matcher.push("X") == "<ENX"  # not a stop string after all: released


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abc <>/", max_size=30),
    stop=st.text(alphabet="abc<>/", min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=6),
)
def test_property_stop_output_is_text_before_first_stop(text: str, stop: str, cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    out, stopped = run_stops(pieces, [stop])
    index = text.find(stop)
    assert (out, stopped) == ((text[:index], True) if index >= 0 else (text, False))


def test_detokenizer_with_literal_tokenizer() -> None:
    detok = IncrementalDetokenizer(TwoCharTokenizer(), prompt_ids=[ord("p")])
    assert detok.push([ord("h"), ord("i")]) == "hi"
    assert detok.flush() == ""
