"""Fidelity gates shared by the build stages: does an exported model answer like its source?

The pure part works on token lists and logits (numpy) and is unit-tested with tiny arrays. The
runners render the golden prompts with the model's own chat template and decode them greedily
with PyTorch (KV cache, left padding, like :class:`toolkit.runtime.onnx_lm.OnnxCausalLM.greedy`) and with
onnxruntime.

Batch sizes: "batch 1" decodes each golden prompt alone. "batch 8" decodes every golden prompt
inside a full, left-padded batch of 8: prompts are taken in order in chunks of 8 and the last
chunk is filled up by wrapping around to the first prompts, so with the 9 golden prompts the
batches are [0..7] and [8, 0..6]. The long prompt therefore sits in a full batch with the
shortest ones (the heaviest left padding), and repeated prompts count twice.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from toolkit.buildsys.report import GateResult
from toolkit.quality.golden import Messages, golden_conversations

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Tokens = Sequence[Sequence[int]]


# --------------------------------------------------------------------------- pure logic


def token_agreement(reference: Tokens, candidate: Tokens) -> tuple[int, int]:
    """(tokens matched, tokens total) of two sets of greedy completions, compared position by position.

    A row's total is the longer of its two completions, so stopping early or running on counts
    as a mismatch for every missing token.
    """
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference rows but {len(candidate)} candidate rows")
    matched = total = 0
    for ref, got in zip(reference, candidate, strict=True):
        total += max(len(ref), len(got))
        matched += sum(1 for a, b in zip(ref, got, strict=False) if a == b)
    return matched, total


def common_prefix(ref: Sequence[int], got: Sequence[int]) -> int:
    """Length of the longest common prefix: the step where two greedy decodes first diverge."""
    n = 0
    for a, b in zip(ref, got, strict=False):
        if a != b:
            break
        n += 1
    return n


def comparable_steps(ref: Sequence[int], got: Sequence[int], ref_steps: int, got_steps: int) -> int:
    """How many leading decode steps of one row saw identical inputs in both decodes.

    Step t's logits depend on the prompt and generated tokens 0..t-1, so steps 0..p are
    comparable where p is the common prefix length; a step past a row's stop token, or one the
    loop never ran, is not.
    """
    limit = min(common_prefix(ref, got), len(ref), len(got)) + 1
    return max(0, min(limit, ref_steps, got_steps))


def max_abs_logit_delta(
    reference: Tokens,
    candidate: Tokens,
    ref_logits: Sequence[np.ndarray],
    got_logits: Sequence[np.ndarray],
) -> tuple[float, int]:
    """(max |Δlogits|, positions compared) over the steps where both decodes had identical inputs.

    `*_logits[t]` is step t's last-position logits for the whole batch, [batch, vocab]. Comparing
    only agreeing steps keeps a divergence (a different token fed back) from inflating the delta;
    the step where the argmax first differs is still compared, since its inputs were the same.
    """
    worst = 0.0
    compared = 0
    for row, (ref, got) in enumerate(zip(reference, candidate, strict=True)):
        for step in range(comparable_steps(ref, got, len(ref_logits), len(got_logits))):
            a = np.asarray(ref_logits[step][row], dtype=np.float64)
            b = np.asarray(got_logits[step][row], dtype=np.float64)
            if a.shape != b.shape:
                raise ValueError(f"logits shapes differ at step {step}: {a.shape} vs {b.shape}")
            worst = max(worst, float(np.max(np.abs(a - b))))
            compared += 1
    return worst, compared


def full_batches(n_items: int, batch_size: int) -> list[list[int]]:
    """Indices in chunks of exactly `batch_size`, the last chunk wrapped around to the start."""
    if n_items <= 0 or batch_size <= 0:
        raise ValueError("need at least one item and a positive batch size")
    chunks = []
    for start in range(0, n_items, batch_size):
        chunks.append([(start + i) % n_items for i in range(batch_size)])
    return chunks


@dataclass
class ParityResult:
    """Reference vs candidate greedy decodes of the golden prompts at one batch size."""

    batch_size: int
    tokens_matched: int
    tokens_total: int
    max_abs_logit_delta: float | None  # None when the candidate's logits were not compared
    positions_compared: int
    diverged: list[dict[str, Any]] = field(default_factory=list)  # first divergence of each differing row

    @property
    def agreement(self) -> float:
        return self.tokens_matched / self.tokens_total if self.tokens_total else 1.0

    def to_metrics(self) -> dict[str, Any]:
        data = asdict(self)
        data["agreement"] = round(self.agreement, 6)
        return data


def compare_decodes(
    batch_size: int,
    reference: Tokens,
    candidate: Tokens,
    ref_logits: Sequence[Sequence[np.ndarray]] | None = None,
    got_logits: Sequence[Sequence[np.ndarray]] | None = None,
    batches: Sequence[Sequence[int]] | None = None,
) -> ParityResult:
    """Compare two decodes of the same prompts; logits are per batch run, each a list of steps."""
    matched, total = token_agreement(reference, candidate)
    diverged = [
        {"row": row, "step": step, "reference": list(ref[step: step + 4]), "candidate": list(got[step: step + 4])}
        for row, (ref, got) in enumerate(zip(reference, candidate, strict=True))
        if list(ref) != list(got)
        for step in [common_prefix(ref, got)]
    ]
    delta: float | None = None
    compared = 0
    if ref_logits is not None and got_logits is not None:
        groups = batches if batches is not None else [list(range(len(reference)))]
        delta = 0.0
        offset = 0
        for run, rows in enumerate(groups):
            part = range(offset, offset + len(rows))
            worst, n = max_abs_logit_delta(
                [reference[i] for i in part], [candidate[i] for i in part], ref_logits[run], got_logits[run]
            )
            delta, compared, offset = max(delta, worst), compared + n, offset + len(rows)
    return ParityResult(batch_size, matched, total, delta, compared, diverged)


def parity_gates(
    results: Sequence[ParityResult], *, min_agreement: float, max_logit_delta: float | None, prefix: str,
    blocking: bool = True,
) -> list[GateResult]:
    """One agreement gate (and one logits gate, when a threshold is given) per batch size."""
    gates = []
    for res in results:
        tag = f"{prefix}_batch{res.batch_size}"
        first = res.diverged[0] if res.diverged else None
        detail = f"{res.tokens_matched}/{res.tokens_total} greedy tokens match"
        if first is not None:
            detail += f"; {len(res.diverged)} row(s) differ, first at row {first['row']} step {first['step']}"
        gates.append(GateResult(
            name=f"{tag}_greedy_agreement", passed=res.agreement >= min_agreement,
            value=round(res.agreement, 6), threshold=min_agreement, detail=detail, blocking=blocking,
        ))
        if max_logit_delta is not None and res.max_abs_logit_delta is not None:
            gates.append(GateResult(
                name=f"{tag}_max_abs_logit_delta", passed=res.max_abs_logit_delta <= max_logit_delta,
                value=res.max_abs_logit_delta, threshold=max_logit_delta,
                detail=f"over {res.positions_compared} decode positions with identical inputs",
                blocking=blocking,
            ))
    return gates


# --------------------------------------------------------------------------- runners


def render_conversations(tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Messages]) -> list[list[int]]:
    """Prompt ids through the model's own chat template, with the generation prompt."""
    from toolkit.model_io.modeling import render_prompt_ids

    return [render_prompt_ids(tokenizer, c) for c in conversations]


def torch_greedy(
    model: Any, prompts: Tokens, max_new_tokens: int, stop_ids: Sequence[int], pad_id: int = 0,
) -> tuple[list[list[int]], list[np.ndarray]]:
    """PyTorch greedy decode with a KV cache, step for step like ``OnnxCausalLM.greedy``.

    Same left padding, same position ids (cumulative mask, pads at 0), finished rows keep
    being fed their argmax, so both decodes see the same inputs while their tokens agree.
    Returns completions (stop token excluded) and each step's last-position logits [batch, vocab].
    """
    import torch
    from transformers import DynamicCache

    from toolkit.runtime.onnx_lm import record_greedy_step

    batch = len(prompts)
    longest = max(len(p) for p in prompts)
    ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, longest - len(prompt):] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    cache = DynamicCache()
    stops = set(stop_ids)
    generated: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    step_logits: list[np.ndarray] = []
    step_ids, step_pos = ids, positions
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            # logits_to_keep: the head over the last position only (a prefill's full logits at a 150k vocabulary
            # are gigabytes at batch 8, and only the last row is compared)
            out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                        past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            last = out.logits[:, -1, :].float()
            step_logits.append(last.numpy().copy())
            next_ids = last.argmax(dim=-1)
            if record_greedy_step(next_ids.tolist(), stops, generated, done):
                break
            step_ids = next_ids[:, None]
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((batch, 1), dtype=torch.long)], dim=1)
    return generated, step_logits


def decode_batches(
    decode: Any, prompts: Tokens, batch_size: int,
) -> tuple[list[list[int]], list[list[np.ndarray]], list[list[int]]]:
    """Run `decode(prompts) -> (tokens, logits)` over full batches; rows flattened in batch order."""
    batches = full_batches(len(prompts), batch_size) if batch_size > 1 else [[i] for i in range(len(prompts))]
    tokens: list[list[int]] = []
    logits: list[list[np.ndarray]] = []
    for rows in batches:
        out, steps = decode([prompts[i] for i in rows])
        tokens.extend(out)
        logits.append(steps)
    return tokens, logits, batches


def onnx_parity(
    model_dir: Path,
    onnx_path: Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    max_new_tokens: int = 24,
    batch_sizes: Sequence[int] = (1, 8),
    conversations: Sequence[Messages] | None = None,
    threads: int | None = None,
) -> list[ParityResult]:
    """PyTorch (model_dir, FP32) vs ONNX (onnx_path) greedy decodes of the golden prompts.

    One :class:`ParityResult` per batch size: greedy-token agreement and max |Δlogits| over
    positions whose inputs were identical in both decodes.
    """
    from toolkit.model_io.modeling import load_model, load_tokenizer, pad_token_id, stop_token_ids
    from toolkit.runtime.onnx_lm import OnnxCausalLM

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir)
    model = load_model(model_dir)
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    pad = pad_token_id(tokenizer)
    prompts = render_conversations(tokenizer, conversations or golden_conversations())
    # PyTorch first, then onnxruntime: the two copies of the weights are never held at once
    reference = partial(torch_greedy, model, max_new_tokens=max_new_tokens, stop_ids=stops, pad_id=pad)
    references = {size: decode_batches(reference, prompts, size) for size in batch_sizes}
    del model, reference
    gc.collect()
    onnx_model = OnnxCausalLM(onnx_path, providers=["CPUExecutionProvider"], threads=threads)
    results = []
    for size, (ref, ref_logits, batches) in references.items():
        got, got_logits, _ = decode_batches(
            lambda rows: onnx_model.greedy(rows, max_new_tokens, stops, pad, return_logits=True), prompts, size)
        results.append(compare_decodes(size, ref, got, ref_logits, got_logits, batches))
    return results
