"""The task-quality gate of a quantized graph: does it answer the build's questions as well as FP32?

Both graphs answer the evaluate stage's prompts (:func:`toolkit.evaluation.evaluation_prompts`: the
held-out-phrasing test questions, then the 12 retention questions) greedily on onnxruntime, with the
same prompts, the same token budget and the same batches, and are scored as the evaluate stage
scores the fine-tuned model: an answer is right when it contains every fact string of its question
(:func:`toolkit.textmetrics.contains_facts`), per language (:func:`toolkit.dataset.language_of`),
and retention by :func:`toolkit.retention.score_retention`.

The gate is on the drop from FP32 to the variant, in percentage points: held-out fact accuracy per
language (56 questions a language in the default build: one question is 1.8 points) and retention
(12 questions: one question is 8.3 points, so the default 2-point allowance means the variant must
answer at least as many retention questions right as FP32). A variant that scores higher than FP32
passes: the gate is on what quantization loses.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from toolkit.buildsys.report import GateResult
from toolkit.datasets.records import Example, language_of
from toolkit.quality.retention import score_retention
from toolkit.quality.scoring import LANGUAGES
from toolkit.quality.textmetrics import contains_facts
from toolkit.runtime.onnx_lm import record_greedy_step

if TYPE_CHECKING:
    from toolkit.runtime.onnx_lm import OnnxCausalLM


@dataclass(frozen=True)
class TaskScores:
    """One graph's answers to the evaluation prompts, scored."""

    facts: dict[str, tuple[int, int]]  # language -> (right, asked); languages with no questions left out
    retention: tuple[int, int]  # (right, asked)
    generated: list[list[int]] = field(repr=False)  # token ids per prompt, prompt order
    generate_s: float = 0.0
    answers: list[str] = field(default_factory=list, repr=False)  # decoded, prompt order
    right: list[bool | None] = field(default_factory=list, repr=False)  # per prompt; None: a test row without facts

    def fact_points(self, language: str) -> float:
        right, asked = self.facts[language]
        return 100.0 * right / asked

    @property
    def retention_points(self) -> float:
        right, asked = self.retention
        return 100.0 * right / asked if asked else 0.0

    def as_metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for language, (right, asked) in self.facts.items():
            out[f"fact_accuracy_{language}"] = round(right / asked, 4)
            out[f"fact_right_{language}"] = f"{right}/{asked}"
        out["retention"] = round(self.retention[0] / self.retention[1], 4) if self.retention[1] else None
        out["retention_right"] = f"{self.retention[0]}/{self.retention[1]}"
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


def score_task(test: Sequence[Example], answers: Sequence[str], generated: list[list[int]],
               generate_s: float = 0.0) -> TaskScores:
    """Score answers to ``evaluation_prompts(test)`` (test questions, then retention questions)."""
    counts = {language: [0, 0] for language in LANGUAGES}
    right: list[bool | None] = []
    for example, answer in zip(test, answers, strict=False):
        right.append(contains_facts(answer, example.facts) if example.facts else None)
        if example.facts:
            tally = counts.setdefault(language_of(example), [0, 0])
            tally[0] += bool(right[-1])
            tally[1] += 1
    kept = score_retention(answers[len(test):])
    right += [bool(row["correct"]) for row in kept.per_question]
    facts = {language: (n, asked) for language, (n, asked) in counts.items() if asked}
    return TaskScores(facts=facts, retention=(kept.correct, kept.total), generated=generated, generate_s=generate_s,
                      answers=list(answers), right=right)


def answer_and_score(model: OnnxCausalLM, tokenizer: Any, test: Sequence[Example], prompt_ids: Sequence[Sequence[int]],
                     *, max_new_tokens: int, stop_ids: Sequence[int], pad_id: int, batch_size: int) -> TaskScores:
    """Greedy answers of one graph to the rendered evaluation prompts, decoded as the evaluate stage decodes."""
    from toolkit.model_io.modeling import decode_text

    started = time.perf_counter()
    generated = greedy_answers(model, prompt_ids, max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                               batch_size=batch_size)
    generate_s = time.perf_counter() - started
    answers = [decode_text(tokenizer, ids).strip() for ids in generated]
    return score_task(test, answers, generated, generate_s)


def answer_table(questions: Sequence[str], scores: dict[str, TaskScores]) -> list[dict[str, Any]]:
    """One row per evaluation prompt: each graph's answer and whether it was right (None: no facts to check)."""
    rows = []
    for i, question in enumerate(questions):
        row: dict[str, Any] = {"question": question}
        for name, score in scores.items():
            row[name] = score.answers[i]
            row[f"{name}_right"] = score.right[i]
        rows.append(row)
    return rows


def token_agreement(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]) -> tuple[int, int, int]:
    """(tokens equal at the same position, reference tokens, identical answers): free-running agreement."""
    same = sum(a == b for ref, got in zip(reference, candidate, strict=True) for a, b in zip(ref, got, strict=False))
    total = sum(len(ref) for ref in reference)
    identical = sum(list(ref) == list(got) for ref, got in zip(reference, candidate, strict=True))
    return same, total, identical


def task_gates(reference: TaskScores, candidate: TaskScores, *, prefix: str, label: str,
               max_fact_drop_points: float, max_retention_drop_points: float) -> list[GateResult]:
    """Non-blocking gates: per-language held-out fact accuracy and retention, candidate vs FP32, in points."""
    gates = []
    for language, (right, asked) in reference.facts.items():
        got, got_asked = candidate.facts.get(language, (0, asked))
        drop = reference.fact_points(language) - 100.0 * got / got_asked
        gates.append(GateResult(
            name=f"{prefix}_fact_accuracy_{language}_drop_points", passed=drop <= max_fact_drop_points,
            value=round(drop, 2), threshold=max_fact_drop_points, blocking=False,
            detail=f"held-out-phrasing facts ({language}): FP32 {right}/{asked}, {label} {got}/{got_asked} "
                   f"(one question = {100.0 / asked:.1f} points)",
        ))
    (right, asked), (got, _) = reference.retention, candidate.retention
    drop = reference.retention_points - candidate.retention_points
    gates.append(GateResult(
        name=f"{prefix}_retention_drop_points", passed=drop <= max_retention_drop_points, value=round(drop, 2),
        threshold=max_retention_drop_points, blocking=False,
        detail=f"general questions: FP32 {right}/{asked}, {label} {got}/{asked} (one question = "
               f"{100.0 / asked:.1f} points, so a {max_retention_drop_points:g}-point allowance lets "
               f"{int(max_retention_drop_points // (100.0 / asked))} question(s) go)",
    ))
    return gates
