"""Token log-probabilities in OpenAI's shapes: chat's ``logprobs.content`` and completions' ``logprobs``.

The generation model sends ids and numbers (:class:`gateway.triton.TokenLogprobs`); this module turns
ids into each token's text and exact bytes. For a byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2) the
bytes come from the token string through the byte-to-unicode table, so a token that holds part of a
UTF-8 character has its real bytes (its text shows U+FFFD, as OpenAI's does); other tokenizers give
the UTF-8 of the token decoded alone. An alternative the grammar forbade has probability 0 and is
left out (-inf has no JSON form).
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from typing import Any

from gateway.chat.protocol import TokenLogprob, TopLogprob
from gateway.triton import TokenLogprobs


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: the printable stand-in character -> the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes, strict=True)}


class TokenTexts:
    """Each token id's text and bytes for one tokenizer (cached: the same ids come back every step)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = json.loads(backend.to_str()).get("decoder") if backend is not None else None
        self.byte_level = "ByteLevel" in json.dumps(decoder)
        self.special = {int(i) for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def of(self, token_id: int) -> tuple[str, list[int]]:
        cached = self._cache.get(token_id)
        if cached is not None:
            return cached
        raw = self.tokenizer.convert_ids_to_tokens(token_id)
        table = _byte_decoder()
        if raw is None:
            data = b""
        elif self.byte_level and token_id not in self.special and all(c in table for c in raw):
            data = bytes(table[c] for c in raw)
        elif token_id in self.special:
            data = raw.encode()
        else:
            data = self.tokenizer.decode([token_id], clean_up_tokenization_spaces=False).encode()
        result = (data.decode("utf-8", errors="replace"), list(data))
        if len(self._cache) < 500_000:
            self._cache[token_id] = result
        return result

    def text(self, token_id: int) -> str:
        return self.of(token_id)[0]


def _finite(value: float) -> bool:
    return math.isfinite(float(value))


def chat_logprobs(texts: TokenTexts, ids: list[int], values: TokenLogprobs) -> list[TokenLogprob]:
    """``choices[].logprobs.content`` entries of `ids` (the tokens of one step)."""
    out = []
    for row, token_id in enumerate(ids):
        text, data = texts.of(token_id)
        top = [TopLogprob(token=texts.text(int(alt)), logprob=float(lp), bytes=texts.of(int(alt))[1])
               for alt, lp in zip(values.top_ids[row], values.top[row], strict=True) if _finite(lp) and alt >= 0]
        out.append(TokenLogprob(token=text, logprob=float(values.token[row]), bytes=data, top_logprobs=top))
    return out


def completion_logprobs(texts: TokenTexts, ids: list[int], values: TokenLogprobs, with_top: bool,
                        offset: int) -> dict[str, Any]:
    """Completions' ``logprobs`` lists for `ids`, their text starting at character `offset` of the choice's text.

    The first prompt token of an ``echo`` has no log-probability: null, as in OpenAI's API.
    """
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for row, token_id in enumerate(ids):
        text = texts.text(token_id)
        value = float(values.token[row])
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        token_logprobs.append(value if _finite(value) else None)
        if with_top:
            alternatives = {texts.text(int(alt)): float(lp) for alt, lp in
                            zip(values.top_ids[row], values.top[row], strict=True) if _finite(lp) and alt >= 0}
            top_logprobs.append(alternatives if _finite(value) else None)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs if with_top else None,
            "text_offset": offsets}
