"""Training examples: a conversation tokenized with labels on the assistant's tokens only.

The fine-tune trains on them and the quantize stage scores perplexity on the same labels, so both
count exactly the tokens a served model generates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from toolkit.errors import StageError
from toolkit.model_io.modeling import Messages, encode_text, render_text

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
Span = tuple[int, int]  # characters [start, end) of a rendered text


@dataclass(frozen=True)
class TokenizedExample:
    """One tokenized conversation; labels are IGNORE_INDEX everywhere but assistant tokens."""

    input_ids: list[int]
    labels: list[int]


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def assistant_char_spans(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> list[tuple[str, list[Span]]]:
    """Texts to train on and the character span of each assistant reply within them.

    A reply's span runs from the end of the prompt rendered up to it (with the generation prompt)
    to the end of the conversation rendered through it, so it covers the reply and the template's
    end-of-turn token: exactly what the model must generate when served the same prompt. Most
    templates render a conversation incrementally (each prefix of the conversation renders to a
    prefix of the whole), and the whole conversation is one text. Some do not: Gemma 4's
    generation prompt opens an empty thought channel that a finished reply in the history does not
    show, Qwen3's hides the reasoning of earlier turns. Then each reply is its own text: the prompt
    exactly as served (with the generation prompt), then the reply and what the template writes
    after it.
    """
    full = render_text(tokenizer, messages, add_generation_prompt=False)
    turns: list[tuple[str, str, str]] = []  # (prompt with generation prompt, conversation through it, reply)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            before = render_text(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
            turns.append((before, render_text(tokenizer, messages[: i + 1], add_generation_prompt=False),
                          str(message["content"])))
    if all(full.startswith(through) and through.startswith(before) for before, through, _ in turns):
        return [(full, [(len(before), len(through)) for before, through, _ in turns])]
    texts: list[tuple[str, list[Span]]] = []
    for before, through, reply in turns:
        tail = through[_common_prefix(before, through):]
        if reply.strip() and reply.strip() not in tail:
            raise StageError("the chat template does not render an assistant reply after its generation prompt; "
                             "cannot locate assistant replies for the loss mask")
        text = before + tail[tail.index(reply.strip()):] if reply.strip() else before + tail
        texts.append((text, [(len(before), len(text))]))
    return texts


def build_examples(
    tokenizer: PreTrainedTokenizerBase, messages: Messages, max_seq_len: int, *, train_eos: bool = True
) -> list[TokenizedExample]:
    """Tokenize a conversation with labels on assistant tokens only; none if no assistant token survives.

    One example per text of :func:`assistant_char_spans` (one for most templates). Tokens after the
    end-of-turn token inside a span (ChatML's trailing newline) are not trained on: serving stops
    at the end-of-turn token and never generates them. `train_eos=False` also leaves out the
    end-of-turn token itself, for replies that were cut short and must not teach stopping.
    """
    examples = []
    for text, spans in assistant_char_spans(tokenizer, messages):
        example = _tokenize(tokenizer, text, spans, max_seq_len, train_eos)
        if example is not None:
            examples.append(example)
    return examples


def _tokenize(tokenizer: PreTrainedTokenizerBase, full: str, spans: list[Span], max_seq_len: int,
              train_eos: bool) -> TokenizedExample | None:
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = list(enc["offset_mapping"])
    if ids != encode_text(tokenizer, full):
        raise StageError("tokenizer offsets disagree with its encoding; use a fast tokenizer")
    labels = [IGNORE_INDEX] * len(ids)
    eos = tokenizer.eos_token_id
    for start, end in spans:
        inside = [i for i, (a, _b) in enumerate(offsets) if start <= a < end]
        if eos is not None and any(ids[i] == eos for i in inside):
            last_eos = max(j for j, i in enumerate(inside) if ids[i] == eos)
            inside = inside[: last_eos + (1 if train_eos else 0)]
        for i in inside:
            labels[i] = ids[i]
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return TokenizedExample(ids, labels)


def collate(batch: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch for training; padding is masked out of attention and loss."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex.input_ids)
        ids[i, :n] = torch.tensor(ex.input_ids)
        labels[i, :n] = torch.tensor(ex.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
