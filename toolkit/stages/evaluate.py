"""Stage ``evaluate``: did fine-tuning teach the facts, and did the model keep what it knew?

"Before" is the base model's answers from the ``baseline`` stage; "after" is the exported FP32 ONNX
graph of the merged model (what the repository serves; the merge and export gates prove it decodes as
the adapter model does) answering the same prompts and the held-out fact questions
(:func:`toolkit.quality.scoring.evaluation_questions`) greedily on onnxruntime, in batches whose finished
rows leave the batch. The ``quantize`` stage compares its INT8 graphs with these very answers.
Reported: fact accuracy per set and language with 95 % intervals, BLEU-4, ROUGE-L and fact exact
match over the test split, and general-knowledge retention on 71 questions, which gates the build
by a paired rule (:func:`toolkit.quality.significance.not_worse`): an adapter that makes the model forget
what it knew fails here rather than in production. ``facts.md``/``facts.jsonl`` list every test
question with both answers; ``heldout.jsonl`` the held-out questions with the tuned answers.
"""

from __future__ import annotations

import json
import os
from typing import Any

from toolkit.buildsys.config import BuildConfig
from toolkit.buildsys.report import GateResult
from toolkit.buildsys.stage_api import StageContext, StageResult
from toolkit.datasets.records import read_records, read_split
from toolkit.errors import StageError
from toolkit.files import sha256_file
from toolkit.model_io.modeling import load_tokenizer
from toolkit.quality.scoring import (
    LANGUAGES,
    evaluation_questions,
    fact_accuracy,
    fact_rows,
    heldout_paths,
    outcomes,
    set_accuracies,
    write_fact_table,
)
from toolkit.quality.significance import not_worse
from toolkit.quality.task_gate import answer_questions
from toolkit.quality.textmetrics import score_answers

ANSWERS_FILE = "answers.jsonl"  # every question, the FP32 graph's answer and token ids (the quantize gates' reference)
SAMPLES_FILE = "samples.jsonl"
RETENTION_FILE = "retention.jsonl"
HELDOUT_FILE = "heldout.jsonl"
FACTS_JSONL = "facts.jsonl"
FACTS_MD = "facts.md"


def cache_inputs(config: BuildConfig) -> dict[str, Any]:
    """The held-out questions' content (their paths are config; what they hold is not)."""
    return {"heldout_facts": [sha256_file(p) for p in heldout_paths(config.eval, not config.data.paths)]}


def run(ctx: StageContext) -> StageResult:
    """Score the fine-tuned model against the base model's answers; gate on retention."""
    from toolkit.runtime.onnx_lm import OnnxCausalLM

    cfg = ctx.config.eval
    tokenizer = load_tokenizer(ctx.inputs["merge"].path("model"))
    test = read_split(ctx.inputs["data"].dir, "test")[: cfg.max_examples]
    questions = evaluation_questions(test, heldout_paths(cfg, not ctx.config.data.paths))
    asked_before = [q for q in questions if q.set != "heldout"]  # the baseline stage's questions, in its order
    before_rows = read_records(ctx.inputs["baseline"].path("answers"))
    if [r.get("set", "test") for r in before_rows] != [q.set for q in asked_before]:
        raise StageError(f"the baseline stage answered {len(before_rows)} questions, not these "
                         f"{len(asked_before)}; rerun with --force --stages baseline")
    before = [row["answer"] for row in before_rows]

    fp32 = OnnxCausalLM(ctx.inputs["export_onnx"].path("model"), providers=["CPUExecutionProvider"],
                        threads=os.cpu_count() or 1)
    graph = answer_questions(fp32, tokenizer, questions, max_new_tokens=cfg.max_new_tokens,
                             batch_size=cfg.batch_size)
    answers, generate_s = graph.answers, graph.generate_s
    with (ctx.out_dir / ANSWERS_FILE).open("w", encoding="utf-8") as fh:
        for q, answer, ids in zip(questions, answers, graph.generated, strict=True):
            fh.write(json.dumps({"set": q.set, "question": q.text, "answer": answer, "ids": ids},
                                ensure_ascii=False) + "\n")
    after = [a for q, a in zip(questions, answers, strict=True) if q.set != "heldout"]

    n = len(test)
    references, facts = [ex.answer for ex in test], [ex.facts for ex in test]
    scores_before = score_answers(before[:n], references, facts)
    scores_after = score_answers(after[:n], references, facts)
    rows = fact_rows(test, before[:n], after[:n])
    write_fact_table(rows, ctx.out_dir / FACTS_JSONL, ctx.out_dir / FACTS_MD)
    with (ctx.out_dir / SAMPLES_FILE).open("w", encoding="utf-8") as fh:
        for ex, b, a in zip(test, before, after, strict=False):
            fh.write(json.dumps({"question": ex.prompt[-1]["content"], "reference": ex.answer, "facts": ex.facts,
                                 "before": b, "after": a, "source": ex.source}, ensure_ascii=False) + "\n")
    with (ctx.out_dir / HELDOUT_FILE).open("w", encoding="utf-8") as fh:
        for q, a in zip(questions, answers, strict=True):
            if q.set == "heldout":
                fh.write(json.dumps({"group": q.group, "lang": q.language, "question": q.text, "facts": q.facts,
                                     "answer": a, "right": q.right(a)}, ensure_ascii=False) + "\n")
    general = [(q, b, a) for q, b, a in zip(asked_before, before, after, strict=True) if q.set == "general"]
    with (ctx.out_dir / RETENTION_FILE).open("w", encoding="utf-8") as fh:
        for q, b, a in general:
            fh.write(json.dumps({"question": q.text, "group": q.group, "before": b, "before_correct": q.right(b),
                                 "after": a, "after_correct": q.right(a)}, ensure_ascii=False) + "\n")

    acc_before = set_accuracies(asked_before, before)
    acc_after = set_accuracies(questions, answers)
    kept = not_worse(outcomes(asked_before, before, ["general"]), outcomes(asked_before, after, ["general"]),
                     cfg.max_retention_drop_points, seed=cfg.bootstrap_seed, resamples=cfg.bootstrap_resamples)
    floor_ok = acc_after["general"].value >= cfg.min_retention
    gate = GateResult(
        name="retention", passed=kept.passed and floor_ok, value=kept.low_points,
        threshold=-cfg.max_retention_drop_points,
        detail=f"general questions after vs before fine-tuning: {kept.text()}"
               + ("" if floor_ok else f"; {acc_after['general'].value:.2f} right is under eval.min_retention "
                                      f"{cfg.min_retention}") + f"; see {RETENTION_FILE}",
    )
    metrics: dict[str, Any] = {"test_examples": n, "test_examples_with_facts": scores_after.examples_with_facts}
    for language in LANGUAGES:  # the test split's scores under their established names (manifest, page)
        acc = fact_accuracy(rows, language)
        metrics[f"fact_accuracy_{language}_before"] = acc["before_accuracy"]
        metrics[f"fact_accuracy_{language}_after"] = acc["after_accuracy"]
        metrics[f"fact_questions_{language}"] = acc["total"]
    for name, scores in (("before", scores_before), ("after", scores_after)):
        for key in ("bleu4", "rouge_l", "fact_em"):
            metrics[f"{key}_{name}"] = scores.as_dict()[key]
    metrics["accuracy"] = {name: {"after": [a.correct, a.total, a.low, a.high],
                                  **({"before": [b.correct, b.total, b.low, b.high]}
                                     if (b := acc_before.get(name)) else {})}
                           for name, a in acc_after.items()}
    metrics.update({
        "retention_before": round(acc_before["general"].value, 4),
        "retention_after": round(acc_after["general"].value, 4),
        "retention_correct_after": acc_after["general"].correct, "retention_total": acc_after["general"].total,
        "retention12_after": f"{acc_after['retention12'].correct}/{acc_after['retention12'].total}",
        "retention_rule": kept.as_dict(),
        "generate_s": round(generate_s, 1),
    })
    summary = "; ".join(f"{name} {acc.correct}/{acc.total}" for name, acc in acc_after.items())
    return StageResult(
        metrics=metrics, gates=[gate],
        artifacts={"samples": SAMPLES_FILE, "retention": RETENTION_FILE, "facts": FACTS_MD, "facts_jsonl": FACTS_JSONL,
                   "heldout": HELDOUT_FILE, "answers": ANSWERS_FILE},
        note=f"after fine-tuning: {summary}; BLEU-4 {scores_before.bleu4:.3f} -> {scores_after.bleu4:.3f} "
             f"(time: {len(questions)} answers on onnxruntime {generate_s:.0f} s)",
    )
