"""The task-quality gate of a quantized graph: does it answer the build's questions as well as FP32?

The evaluate stage's FP32 graph answered every question (:func:`toolkit.quality.scoring.evaluation_questions`:
the held-out-phrasing test questions, the held-out fact questions, the 71 general questions) greedily
on onnxruntime; a variant answers the same prompts with the same token budget and the same batches,
and both are scored alike (facts: :func:`toolkit.quality.textmetrics.contains_facts`; general questions:
:func:`toolkit.quality.retention.is_accepted`).

Two gates per variant, each by the paired rule of :func:`toolkit.quality.significance.not_worse`: the fact
questions of both languages pooled (448 in the demo build), and the general questions (71). A variant
passes when the 95 % paired-bootstrap interval of its difference from FP32 stays above minus the
configured margin: one answer flipping in the last bits of a CPU's arithmetic moves the interval a
little, not the decision.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from toolkit.buildsys.report import GateResult
from toolkit.quality.scoring import Question, outcomes, set_accuracies
from toolkit.quality.significance import not_worse
from toolkit.runtime.onnx_lm import record_greedy_step

if TYPE_CHECKING:
    from toolkit.runtime.onnx_lm import OnnxCausalLM

FACT_SETS = ("test", "heldout")


@dataclass(frozen=True)
class GraphAnswers:
    """One graph's greedy answers to the evaluation questions, in question order."""

    answers: list[str]
    generated: list[list[int]] = field(repr=False)  # token ids per question
    generate_s: float = 0.0

    def as_metrics(self, questions: Sequence[Question]) -> dict[str, Any]:
        out: dict[str, Any] = {name: f"{acc.correct}/{acc.total}" for name, acc in
                               set_accuracies(questions, self.answers).items()}
        out["generated_tokens"] = sum(len(g) for g in self.generated)
        out["generate_s"] = round(self.generate_s, 1)
        return out


def _greedy_shrinking(model: OnnxCausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                      stop_ids: Sequence[int], pad_id: int) -> list[list[int]]:
    """Greedy decoding of one left-padded batch, as :meth:`OnnxCausalLM.greedy`, except that a row
    that has ended leaves the batch (its KV-cache rows are dropped), so the steps after the short
    answers cost only what the long ones still need."""
    from toolkit.runtime.kvcache import left_pad

    batch = len(prompts)
    ids, mask, positions = left_pad(prompts, pad_id)
    stops = set(stop_ids)
    generated: list[list[int]] = [[] for _ in range(batch)]
    live = list(range(batch))  # the original row of each row still in the batch
    last, past = model.prefill(ids, mask, positions)
    for step in range(max_new_tokens):
        if step:
            logits, past = model.forward(ids, mask, positions, past)
            last = logits[:, -1, :]
        next_ids = last.argmax(axis=-1)
        done = [False] * len(live)
        rows = [generated[row] for row in live]
        record_greedy_step(next_ids.tolist(), stops, rows, done)
        keep = [i for i, ended in enumerate(done) if not ended]
        if not keep:
            break
        if len(keep) < len(live):
            live = [live[i] for i in keep]
            past = [p[keep] for p in past]
            mask, positions, next_ids = mask[keep], positions[keep], next_ids[keep]
        ids = next_ids[:, None].astype(np.int64)
        positions = positions[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((len(live), 1), dtype=np.int64)], axis=1)
    return generated


def greedy_answers(model: OnnxCausalLM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                   stop_ids: Sequence[int], pad_id: int, batch_size: int) -> list[list[int]]:
    """Greedy token ids for every prompt, in the prompts' order; prompts of similar length share a batch."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        answers = _greedy_shrinking(model, [prompts[i] for i in chunk], max_new_tokens, stop_ids, pad_id)
        for i, answer in zip(chunk, answers, strict=True):
            out[i] = answer
    return out


def answer_questions(model: OnnxCausalLM, tokenizer: Any, questions: Sequence[Question], *, max_new_tokens: int,
                     batch_size: int) -> GraphAnswers:
    """Greedy answers of one graph to the questions, rendered with the model's chat template and decoded as the
    evaluate stage decodes."""
    from toolkit.model_io.modeling import decode_text, pad_token_id, render_prompt_ids, stop_token_ids

    prompts = [render_prompt_ids(tokenizer, q.prompt) for q in questions]
    started = time.perf_counter()
    generated = greedy_answers(model, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_token_ids(tokenizer),
                               pad_id=pad_token_id(tokenizer), batch_size=batch_size)
    generate_s = time.perf_counter() - started
    return GraphAnswers([decode_text(tokenizer, ids).strip() for ids in generated], generated, generate_s)


def answer_table(questions: Sequence[Question], graphs: dict[str, GraphAnswers]) -> list[dict[str, Any]]:
    """One row per question: each graph's answer and whether it was right (None: no facts to check)."""
    rows = []
    for i, q in enumerate(questions):
        row: dict[str, Any] = {"set": q.set, "question": q.text}
        for name, graph in graphs.items():
            row[name] = graph.answers[i]
            row[f"{name}_right"] = q.right(graph.answers[i])
        rows.append(row)
    return rows


def token_agreement(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]) -> tuple[int, int, int]:
    """(tokens equal at the same position, reference tokens, identical answers): free-running agreement."""
    same = sum(a == b for ref, got in zip(reference, candidate, strict=True) for a, b in zip(ref, got, strict=False))
    total = sum(len(ref) for ref in reference)
    identical = sum(list(ref) == list(got) for ref, got in zip(reference, candidate, strict=True))
    return same, total, identical


def task_gates(questions: Sequence[Question], reference: Sequence[str], candidate: Sequence[str], *, prefix: str,
               label: str, max_fact_drop_points: float, max_retention_drop_points: float, seed: int,
               resamples: int) -> list[GateResult]:
    """Non-blocking gates: pooled fact questions and general questions, candidate vs FP32, by the paired rule."""
    gates = []
    for name, sets, margin, what in (("facts", FACT_SETS, max_fact_drop_points, "fact questions (both languages)"),
                                     ("general", ("general",), max_retention_drop_points, "general questions")):
        ref, got = outcomes(questions, reference, sets), outcomes(questions, candidate, sets)
        if not ref:
            continue
        decision = not_worse(ref, got, margin, seed=seed, resamples=resamples)
        gates.append(GateResult(
            name=f"{prefix}_{name}_not_worse", passed=decision.passed, value=decision.low_points,
            threshold=-margin, blocking=False, detail=f"{what}, {label} vs FP32: {decision.text()}",
        ))
    return gates
