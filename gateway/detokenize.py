"""Token ids to streamed text without broken characters, and stop strings that never leak.

:class:`IncrementalDetokenizer` follows vLLM's ``detokenize_incrementally``: it keeps the token
strings of the sequence and two offsets. Text is decoded over a short window
``tokens[prefix_offset:]`` and only the part past ``tokens[prefix_offset:read_offset]`` is new.
A window that ends in U+FFFD is an incomplete UTF-8 sequence (a byte-level BPE splits a Chinese
character or an emoji over several tokens): nothing is emitted and the offsets stay, so the bytes
are decoded together once the character is complete. Decoding a window rather than a single token
keeps the spaces that tokenizers attach to the start of a word.

:class:`StopMatcher` holds back any tail of the text that could still become a stop string, so a
stop string split across tokens is matched and none of it is ever sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded before the first generated one, so it is decoded in context (as vLLM does).
PROMPT_CONTEXT_TOKENS = 5


class TokenizerLike(Protocol):
    """The two tokenizer methods incremental decoding needs (a transformers fast tokenizer has them)."""

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = ...) -> str | list[str]: ...

    def convert_tokens_to_string(self, tokens: list[str]) -> str: ...


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas that concatenate to the one-shot decode."""

    def __init__(
        self, tokenizer: TokenizerLike, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        context = list(prompt_ids)[-PROMPT_CONTEXT_TOKENS:]
        self._tokens: list[str] = self._tokens_of(context)
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)

    def push(self, token_ids: Sequence[int]) -> str:
        """Add generated ids; return the text they complete (possibly empty, never a partial character)."""
        for token_id in token_ids:
            self._tokens.extend(self._tokens_of([int(token_id)]))
        return self._advance(final=False)

    def _tokens_of(self, ids: list[int]) -> list[str]:
        tokens = self._tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=self._skip_special)
        return [tokens] if isinstance(tokens, str) else list(tokens)

    def flush(self) -> str:
        """At the end of the sequence: whatever is still held back.

        A character whose bytes were cut off (max_tokens ended the reply in the middle of a Chinese
        character or an emoji) decodes to U+FFFD; it is dropped rather than sent broken.
        """
        return self._advance(final=True).rstrip(REPLACEMENT_CHAR)

    def _advance(self, final: bool) -> str:
        if self._read_offset >= len(self._tokens):
            return ""
        prefix_text = self._tokenizer.convert_tokens_to_string(self._tokens[self._prefix_offset : self._read_offset])
        new_text = self._tokenizer.convert_tokens_to_string(self._tokens[self._prefix_offset :])
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR)):
            return ""
        # Cut by length, as vLLM does: decoding the longer window may rewrite the prefix's last
        # character (a U+FFFD that the new bytes complete), and that character belongs to the delta.
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        return delta


class StopMatcher:
    """Cuts text at the first stop string; text that may begin a stop string is held back until decided."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._stops = [s for s in stop if s]
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    def push(self, text: str) -> str:
        """Feed a text delta; return what can be sent now. After a match, nothing more is returned."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buffer = self._held + text
        hits = [(buffer.find(s), s) for s in self._stops if s in buffer]
        if hits:
            index, stop = min(hits)
            self.stopped, self.matched, self._held = True, stop, ""
            return buffer[:index]
        keep = self._longest_stop_prefix_suffix(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """At the end of generation: the held-back text was not a stop string after all."""
        if self.stopped:
            return ""
        held, self._held = self._held, ""
        return held

    def _longest_stop_prefix_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:size]):
                    best = size
                    break
        return best
