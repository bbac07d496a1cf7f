"""The frozen prefix of a LoRA model, computed once per training example.

With ``lora.layers_fraction`` < 1 only the top decoder layers get adapters. The layers below have no
trainable weight and no dropout, so what they output for an example never changes while LoRA trains:
their hidden states are computed once, and every training step starts from them at the lowest
adapted layer. A step then costs the top layers' forward and backward plus the output head instead
of a forward through the whole model (measured on SmolLM2-135M with the top 15 of 30 layers adapted:
see README, "A recipe that learns").

It relies only on what Hugging Face decoder models share: a decoder module (``get_decoder()``) with a
``layers`` ModuleList and a final ``norm``, whose forward takes ``inputs_embeds``. The layer list is
swapped for the duration of a call, never edited.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MAX_CACHE_BYTES = 2 << 30  # beyond this the cache would cost more memory than the time it saves is worth


def first_adapted_layer(model: Any) -> int | None:
    """Index of the lowest decoder layer holding a trainable weight; None when the model has no such layout."""
    decoder = _decoder(model)
    if decoder is None:
        return None
    for index, layer in enumerate(decoder.layers):
        if any(p.requires_grad for p in layer.parameters()):
            return index
    return None


def _decoder(model: Any) -> Any | None:
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = core.get_decoder() if hasattr(core, "get_decoder") else None
    if decoder is None or not hasattr(decoder, "layers") or not hasattr(decoder, "norm"):
        return None
    return decoder


@contextlib.contextmanager
def _only_layers(decoder: Any, layers: slice, norm: bool) -> Iterator[None]:
    import torch

    saved_layers, saved_norm = decoder.layers, decoder.norm
    decoder.layers = torch.nn.ModuleList(list(saved_layers)[layers])
    if not norm:
        decoder.norm = torch.nn.Identity()
    try:
        yield
    finally:
        decoder.layers, decoder.norm = saved_layers, saved_norm


class FrozenPrefix:
    """Cached hidden states at the first adapted layer, one tensor [tokens, hidden] per example."""

    def __init__(self, model: Any, first: int, states: list[torch.Tensor]) -> None:
        self.model = model
        self.first = first
        self.states = states

    @classmethod
    def build(cls, model: Any, inputs: Sequence[Sequence[int]], batch_size: int, autocast: Any) -> FrozenPrefix | None:
        """Run the frozen layers once over every example; None when the model's layout does not allow it,
        nothing below the adapters is frozen, or the cache would be too large."""
        import torch

        decoder = _decoder(model)
        first = first_adapted_layer(model)
        if decoder is None or not first:
            return None
        hidden_size = int(getattr(decoder.config, "hidden_size", 0) or 0)
        size = sum(len(ids) for ids in inputs) * hidden_size * 4
        if size > MAX_CACHE_BYTES:
            log.info("frozen-prefix cache skipped: it would take %.1f GiB", size / 2**30)
            return None
        device = next(model.parameters()).device
        states: list[torch.Tensor | None] = [None] * len(inputs)
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))  # similar lengths: little padding
        with _only_layers(decoder, slice(0, first), norm=False), torch.no_grad(), autocast:
            for start in range(0, len(order), batch_size):
                chunk = order[start: start + batch_size]
                width = max(len(inputs[i]) for i in chunk)
                ids = torch.zeros((len(chunk), width), dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, i in enumerate(chunk):
                    ids[row, : len(inputs[i])] = torch.tensor(list(inputs[i]))
                    mask[row, : len(inputs[i])] = 1
                out = decoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
                for row, i in enumerate(chunk):
                    states[i] = out[row, : len(inputs[i])].float().clone()
        return cls(model, first, [state for state in states if state is not None])

    def hidden(self, indices: Sequence[int], attention_mask: torch.Tensor) -> torch.Tensor:
        """The top layers (and the final norm) run from the cache for a right-padded batch of examples."""
        import torch

        decoder = _decoder(self.model)
        assert decoder is not None  # build() checked the layout
        width = attention_mask.shape[1]
        device = attention_mask.device
        cached = torch.zeros((len(indices), width, self.states[0].shape[-1]), device=device)
        for row, index in enumerate(indices):
            state = self.states[index]
            cached[row, : state.shape[0]] = state.to(device)
        with _only_layers(decoder, slice(self.first, None), norm=True):
            out: torch.Tensor = decoder(inputs_embeds=cached, attention_mask=attention_mask).last_hidden_state
            return out
