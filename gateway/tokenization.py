"""The model's own tokenizer and chat template, loaded from the repository.

The prompt is rendered exactly as training renders it (``toolkit.model_io.modeling.render_prompt_ids``):
the chat template turns the conversation into text, and that text is tokenized without adding
special tokens, because the template writes every special token itself. The template comes from
the manifest (what the model was fine-tuned with), not from whatever the tokenizer files carry.

transformers is imported lazily and only its tokenizer part is used; start the gateway with
``USE_TORCH=0`` (``python -m gateway`` does) so it does not import torch when torch is installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.detokenize import REPLACEMENT_CHAR, IncrementalDetokenizer
from gateway.error_responses import BadRequestError, GatewayError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Message = dict[str, Any]


class TokenizerLoadError(GatewayError):
    """The tokenizer of a repository model cannot be loaded (a start-up or admin-load failure)."""


def load_tokenizer(tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    """Load the fast tokenizer saved beside a model version (offline; no hub access)."""
    from transformers import AutoTokenizer

    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise TokenizerLoadError(f"{tokenizer_dir} has no tokenizer.json: rebuild the repository with `toolkit build`")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True, use_fast=True)
    except (OSError, ValueError) as err:
        raise TokenizerLoadError(f"cannot load the tokenizer in {tokenizer_dir}: {err}") from err
    if not tokenizer.is_fast:
        raise TokenizerLoadError(f"the tokenizer in {tokenizer_dir} is not a fast (tokenizer.json) tokenizer")
    return tokenizer


class ChatTokenizer:
    """Renders conversations to prompt ids and turns generated ids back into text for one model."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, chat_template: str) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template

    @classmethod
    def from_dir(cls, tokenizer_dir: Path, chat_template: str) -> ChatTokenizer:
        """The tokenizer in `tokenizer_dir` with the manifest's chat template."""
        return cls(load_tokenizer(tokenizer_dir), chat_template)

    def render_text(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                    tools: Sequence[dict[str, Any]] | None = None) -> str:
        """The conversation as prompt text, through the model's chat template (with `tools` where it takes them)."""
        try:
            text = self.tokenizer.apply_chat_template(
                list(messages),
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                tools=list(tools) if tools else None,
            )
        except Exception as err:  # jinja raise_exception() in templates: e.g. roles out of order
            raise BadRequestError(
                f"the model's chat template rejected the conversation: {err}", param="messages"
            ) from err
        assert isinstance(text, str)
        return text

    def encode(self, text: str) -> list[int]:
        """Token ids of rendered text; no special tokens are added (the template wrote them)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render_ids(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                   tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        """Prompt ids of a conversation, identical to training's ``render_prompt_ids``."""
        return self.encode(self.render_text(messages, add_generation_prompt, tools))

    def decode(self, ids: Sequence[int]) -> str:
        """One-shot decode of generated ids: the text a stream of them concatenates to.

        No cleanup that would change spacing; an incomplete character at the end (a reply cut by
        max_tokens) is dropped, as the incremental detokenizer drops it.
        """
        text = self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert isinstance(text, str)
        return text.rstrip(REPLACEMENT_CHAR)

    def detokenizer(self, prompt_ids: Sequence[int] = ()) -> IncrementalDetokenizer:
        """A fresh incremental detokenizer for one generated sequence after `prompt_ids`."""
        return IncrementalDetokenizer(self.tokenizer, prompt_ids)

    def single_token_id(self, text: str) -> int | None:
        """The id when `text` is exactly one special token (a stop string like ``<|im_end|>``), else None."""
        ids = self.encode(text)
        if len(ids) == 1 and ids[0] in set(self.tokenizer.all_special_ids) | self._added_special_ids():
            return int(ids[0])
        return None

    def _added_special_ids(self) -> set[int]:
        return {int(i) for i, tok in self.tokenizer.added_tokens_decoder.items() if tok.special}
