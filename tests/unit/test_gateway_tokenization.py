"""The gateway renders a conversation to exactly the token ids training does, and both to the ids of an
independent reading of the same files (tests/reference.py: raw tokenizers + jinja2)."""

from __future__ import annotations

import pytest

from gateway.error_responses import BadRequestError
from gateway.tokenization import ChatTokenizer, TokenizerLoadError
from tests.reference import ReferenceTokenizer
from tests.unit.gateway_fakes import TOKENIZER_DIR
from toolkit.model_io.modeling import load_tokenizer, render_prompt_ids

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of Japan?"},
        {"role": "assistant", "content": "Tokyo"},
        {"role": "user", "content": "And of China? 用中文回答 😀"},
    ],
    [{"role": "user", "content": "  spaces  \n\n and <b>markup</b> "}],
]


@pytest.fixture(scope="module")
def gateway_tok() -> ChatTokenizer:
    return ChatTokenizer.from_dir(TOKENIZER_DIR, (TOKENIZER_DIR / "chat_template.jinja").read_text())


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_gateway_prompt_ids_equal_training_prompt_ids(gateway_tok: ChatTokenizer, messages: list) -> None:
    expected = ReferenceTokenizer(TOKENIZER_DIR).render_ids(messages)
    assert gateway_tok.render_ids(messages) == expected
    assert render_prompt_ids(load_tokenizer(TOKENIZER_DIR), messages) == expected


def test_prompt_has_exactly_the_template_special_tokens(gateway_tok: ChatTokenizer) -> None:
    ids = gateway_tok.render_ids(CONVERSATIONS[0])
    assert ids[0] == 1 and ids[1] != 1  # one <|im_start|>, written by the template, no extra bos
    assert gateway_tok.render_text(CONVERSATIONS[0]).endswith("<|im_start|>assistant\n")


def test_manifest_template_wins_over_tokenizer_template() -> None:
    tok = ChatTokenizer.from_dir(TOKENIZER_DIR, "{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert tok.render_text([{"role": "user", "content": "hi"}]) == "[hi]"


def test_template_error_is_a_400() -> None:
    tok = ChatTokenizer.from_dir(TOKENIZER_DIR, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(BadRequestError, match="roles must alternate"):
        tok.render_ids([{"role": "user", "content": "hi"}])


def test_missing_tokenizer_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(TokenizerLoadError, match="no tokenizer.json"):
        ChatTokenizer.from_dir(tmp_path, "x")


def test_special_token_stop_string_maps_to_its_id(gateway_tok: ChatTokenizer) -> None:
    assert gateway_tok.single_token_id("<|im_end|>") == 2
    assert gateway_tok.single_token_id("Hello") is None
