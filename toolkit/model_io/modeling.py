"""Shared PyTorch helpers: load a model directory, render chats, greedy generation.

Training, evaluation, the merge gate and the serving tests all render conversations through
:func:`render_prompt_ids`, so the token ids a model is trained on are the ids it is served with.
Everything runs on CPU in float32: the build targets a small model on a CPU-only machine and its
fidelity gates compare outputs token for token.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolkit.errors import StageError
from toolkit.model_io.tokenizer_files import CHAT_TEMPLATE_FILE

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Messages = list[dict[str, str]]

__all__ = ["CHAT_TEMPLATE_FILE"]  # re-exported for the stages



def seed_everything(seed: int, threads: int | None = None) -> None:
    """Seed python and torch and pin torch's thread count, so runs repeat bit for bit on CPU."""
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    if threads is not None:
        torch.set_num_threads(threads)


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """Load the tokenizer saved in `model_dir` (offline; no hub access)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as err:
        raise StageError(f"cannot load a tokenizer from {model_dir}: {err}") from err


def load_model(model_dir: Path) -> PreTrainedModel:
    """Load a causal LM from `model_dir` on CPU in float32, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError) as err:
        raise StageError(f"cannot load a model from {model_dir}: {err}") from err
    model.eval()
    return model


def chat_template_of(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's own chat template string; a model without one cannot be trained as a chat model."""
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: the default one renders conversations
        template = template.get("default")
    if not isinstance(template, str) or not template.strip():
        raise StageError("the base model's tokenizer has no chat template; use a chat (instruct) model as base")
    return template


def render_text(tokenizer: PreTrainedTokenizerBase, messages: Messages, add_generation_prompt: bool) -> str:
    """The conversation as text, through the tokenizer's own chat template."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert isinstance(text, str)
    return text


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of already rendered text; the template supplies every special token itself."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, messages: Messages, add_generation_prompt: bool = True
) -> list[int]:
    """Render a conversation with the tokenizer's chat template and tokenize it.

    The one rendering used for training, evaluation, gates and serving tests.
    """
    return encode_text(tokenizer, render_text(tokenizer, messages, add_generation_prompt))


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, generation_config: Any | None = None) -> list[int]:
    """Every id that ends a reply: the tokenizer's eos plus the generation config's eos id(s)."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    for value in eos if isinstance(eos, list | tuple) else [eos]:
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    if not ids:
        raise StageError("the model defines no eos token; cannot tell where a reply ends")
    return ids


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The pad id; models without one pad with eos (padding is always masked out)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return stop_token_ids(tokenizer)[0]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows into (input_ids, attention_mask) so every row's last token is aligned."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


def greedy_generate(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
) -> list[list[int]]:
    """Greedy completions (token ids, stop token excluded) for already tokenized prompts.

    Prompts run in left-padded batches; the result keeps the prompts' order.
    """
    import torch

    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    pad = pad_token_id(tokenizer)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start: start + batch_size]
        ids, mask = left_pad(chunk, pad)
        device = next(model.parameters()).device  # a model still on its training GPU answers there
        ids, mask = ids.to(device), mask.to(device)
        with torch.inference_mode():
            generated = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=stops,
                pad_token_id=pad,
            )
        for row in generated[:, ids.shape[1]:].tolist():
            cut = next((i for i, tok in enumerate(row) if tok in stops), len(row))
            out.append(row[:cut])
    return out


def generate_replies(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Messages],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
) -> list[str]:
    """Greedy assistant replies (text) to conversations rendered with the chat template."""
    prompts = [render_prompt_ids(tokenizer, conv) for conv in conversations]
    ids = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [decode_text(tokenizer, row).strip() for row in ids]


def decode_text(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """Generated ids as text, special tokens left out."""
    text = tokenizer.decode(list(ids), skip_special_tokens=True)
    assert isinstance(text, str)
    return text
