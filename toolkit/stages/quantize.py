"""Stage ``quantize``: an INT8 ONNX variant to serve and a Q/DQ graph for TensorRT, each shipped only
when it answers as well as FP32.

Both graphs are gated the same way (:mod:`toolkit.quality.task_gate`): FP32 and the candidate answer
the evaluate stage's prompts greedily on onnxruntime, and the candidate ships when its held-out-phrasing
fact accuracy (per language) and its retention are each within ``quantize.max_*_drop_points``
percentage points of FP32's and its test-split perplexity rises less than
``quantize.max_perplexity_delta_pct``. Free-running greedy agreement with FP32 (on those answers) and
teacher-forced agreement (golden prompts) are reported; ``quantize.min_greedy_agreement`` adds them as
a gate when set.

The gates are not blocking: a variant that fails is reported with ``int8_shipped: False`` and the
repository leaves it out; a Q/DQ graph that fails (``qdq_shipped: False``) gets no INT8 plan script
and no ``NAME_trt_int8`` entry. ``model_qdq.onnx`` is weight-only by default (INT8 weights with a
per-channel DequantizeLinear, float activations: :func:`toolkit.export.int8_methods.quantize_weight_only_qdq`);
its INT8 values are rounded by GPTQ on calibration inputs from the training split and the control
examples (``quantize.qdq_method: weight_only_gptq``); ``weight_only`` rounds to nearest, and the
static Q/DQ recipes remain selectable.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.buildsys.config import EvalSection, QuantizeSection
from toolkit.buildsys.report import GateResult
from toolkit.buildsys.stage_api import StageContext, StageResult
from toolkit.datasets.records import read_records
from toolkit.errors import StageError
from toolkit.export.int8_methods import (
    GPTQ_METHODS,
    INT8_FILE,
    QDQ_FILE,
    decode_tokens_per_s,
    perplexity,
    quantize_int8,
    teacher_forced_agreement,
)
from toolkit.model_io.onnx_files import onnx_bytes
from toolkit.quality.fidelity import render_conversations
from toolkit.quality.golden import Messages, golden_conversations
from toolkit.quality.scoring import Question, evaluation_questions, heldout_paths
from toolkit.quality.task_gate import GraphAnswers, answer_questions, answer_table, task_gates, token_agreement
from toolkit.training.control_examples import read_control

ANSWERS_FILE = "task_answers.jsonl"  # every evaluation prompt: FP32's, INT8's and the Q/DQ graph's answers


def read_conversations(path: Path) -> list[Messages]:
    """The `messages` of every record in a data-stage jsonl split."""
    if not path.is_file():
        raise StageError(f"the data stage left no split at {path}; rerun with --force --stages data")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                out.append(list(json.loads(line)["messages"]))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise StageError(f"{path}:{number}: not a data-stage record ({err})") from None
    return out


def calibration_ids(tokenizer: Any, conversations: Sequence[Messages], count: int) -> list[list[int]]:
    """`count` training conversations, evenly spread over the split, rendered whole (prompt and reply)."""
    from toolkit.model_io.modeling import render_prompt_ids

    if not conversations:
        return []
    step = max(1, len(conversations) // count)
    chosen = list(conversations[::step])[:count]
    return [render_prompt_ids(tokenizer, conv, add_generation_prompt=False) for conv in chosen]


def _gate_perplexity(prefix: str, label: str, fp32_ppl: float, ppl: float, max_delta_pct: float) -> GateResult:
    delta = (ppl / fp32_ppl - 1.0) * 100.0
    return GateResult(
        name=f"{prefix}_perplexity_delta_pct", passed=delta < max_delta_pct, value=round(delta, 3),
        threshold=max_delta_pct, blocking=False,
        detail=f"test-split assistant tokens: perplexity {fp32_ppl:.3f} (FP32) -> {ppl:.3f} ({label})",
    )


@dataclass
class Candidate:
    """One quantized graph under test: the served INT8 variant, or the Q/DQ graph handed to TensorRT."""

    key: str  # "int8" or "qdq": metric prefix and artifact name
    label: str
    path: Path
    qdq: bool = False  # a Q/DQ graph: its DequantizeLinears are folded at load
    metrics: dict[str, Any] = field(default_factory=dict)
    gates: list[GateResult] = field(default_factory=list)
    answers: GraphAnswers | None = None

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)


def _open(path: Path, threads: int, qdq: bool = False) -> Any:
    from toolkit.runtime.onnx_lm import OnnxCausalLM

    # A Q/DQ graph: let onnxruntime fold DequantizeLinear on the constant weights once at load time
    # (same products, FP32 speed) instead of dequantizing every weight at every step.
    config = {"session.disable_quant_qdq": "1"} if qdq else None
    return OnnxCausalLM(path, providers=["CPUExecutionProvider"], threads=threads, session_config=config)


def read_reference(path: Path, questions: Sequence[Question]) -> GraphAnswers:
    """The evaluate stage's FP32 answers (and token ids) to `questions`, checked to be those questions."""
    rows = read_records(path)
    if [(r["set"], r["question"]) for r in rows] != [(q.set, q.text) for q in questions]:
        raise StageError(f"{path} does not answer the questions this stage asks; rerun with --force --stages evaluate")
    return GraphAnswers([r["answer"] for r in rows], [list(r["ids"]) for r in rows])


def evaluate_candidates(
    fp32: Any, reference: GraphAnswers, candidates: list[Candidate], tokenizer: Any, questions: Sequence[Question],
    scored: Sequence[tuple[Sequence[int], Sequence[int]]], cfg: QuantizeSection, eval_cfg: EvalSection,
    threads: int,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score every candidate on the task (facts, general questions) against FP32's answers, perplexity and
    agreement; gate each.

    Candidates are opened one at a time beside FP32 (a Q/DQ graph folds back to FP32-sized weights), so the
    stage holds at most two copies of the weights. Returns the metrics the candidates share (FP32's scores)
    and the answer table (a row per question).
    """
    from toolkit.model_io.modeling import pad_token_id, stop_token_ids

    stops, pad = stop_token_ids(tokenizer), pad_token_id(tokenizer)
    fp32_ppl = perplexity(fp32, scored) if scored else float("nan")
    golden = render_conversations(tokenizer, golden_conversations())
    golden_ref = [fp32.greedy([p], cfg.gate_new_tokens, stops, pad)[0][0] for p in golden]
    shared: dict[str, Any] = {"task_questions": len(questions), "fp32_task": reference.as_metrics(questions),
                              "fp32_perplexity": round(fp32_ppl, 4) if scored else None,
                              "perplexity_examples": len(scored)}
    for cand in candidates:
        model = _open(cand.path, threads, qdq=cand.qdq)
        graph = cand.answers = answer_questions(model, tokenizer, questions, max_new_tokens=eval_cfg.max_new_tokens,
                                                batch_size=eval_cfg.batch_size)
        same, total, identical = token_agreement(reference.generated, graph.generated)
        hits, positions = teacher_forced_agreement(model, golden, golden_ref)
        cand.metrics.update({
            "task": graph.as_metrics(questions),
            "greedy_agreement": round(same / total, 6) if total else 1.0,
            "greedy_tokens": f"{same}/{total}", "identical_answers": f"{identical}/{len(questions)}",
            "teacher_forced_agreement": round(hits / positions, 6) if positions else 1.0,
            "teacher_forced_tokens": f"{hits}/{positions}",
        })
        cand.gates = task_gates(questions, reference.answers, graph.answers, prefix=f"onnx_{cand.key}",
                                label=cand.label, max_fact_drop_points=cfg.max_fact_accuracy_drop_points,
                                max_retention_drop_points=cfg.max_retention_drop_points,
                                seed=eval_cfg.bootstrap_seed, resamples=eval_cfg.bootstrap_resamples)
        cand.metrics["rules"] = {g.name: g.detail for g in cand.gates}
        if scored:
            ppl = perplexity(model, scored)
            cand.metrics.update(perplexity=round(ppl, 4), perplexity_delta_pct=round((ppl / fp32_ppl - 1) * 100, 3))
            cand.gates.append(_gate_perplexity(f"onnx_{cand.key}", cand.label, fp32_ppl, ppl,
                                               cfg.max_perplexity_delta_pct))
        else:  # nothing held out: the variant cannot be shown to keep its answers, so it is not shipped
            cand.metrics.update(perplexity=None, perplexity_delta_pct=None)
            cand.gates.append(GateResult(name=f"onnx_{cand.key}_perplexity_delta_pct", passed=False, blocking=False,
                                         threshold=cfg.max_perplexity_delta_pct,
                                         detail="no test or val examples to score"))
        if cfg.min_greedy_agreement is not None:
            forced = cfg.agreement == "teacher_forced"
            value = cand.metrics["teacher_forced_agreement" if forced else "greedy_agreement"]
            cand.gates.append(GateResult(
                name=f"onnx_{cand.key}_{'teacher_forced' if forced else 'greedy'}_agreement",
                passed=value >= cfg.min_greedy_agreement, value=value, threshold=cfg.min_greedy_agreement,
                blocking=False,
                detail=(f"{hits}/{positions} FP32 greedy tokens on the golden prompts are {cand.label}'s top-1 when "
                        "fed the same prefix") if forced else
                       f"{same}/{total} greedy tokens on the evaluation prompts match FP32's; {identical} answers "
                       "identical"))
        del model
    graphs = {"fp32": reference, **{c.key: c.answers for c in candidates if c.answers}}
    return shared, answer_table(questions, graphs)


def _bench(fp32: Any, int8: Any, cfg: QuantizeSection, tokenizer: Any, threads: int) -> dict[str, Any]:
    """Decode tokens/s of FP32 and INT8 at batch 1 and 8 (fixed length, golden prompts)."""
    prompts = render_conversations(tokenizer, golden_conversations())
    metrics: dict[str, Any] = {"bench_threads": threads, "bench_new_tokens": cfg.bench_new_tokens}
    for batch in (1, 8):
        rows = [prompts[i % len(prompts)] for i in range(batch)]
        for name, model in (("fp32", fp32), ("int8", int8)):
            tokens_per_s = decode_tokens_per_s(model, rows, cfg.bench_new_tokens)
            metrics[f"{name}_batch{batch}_tokens_per_s"] = round(tokens_per_s, 2)
        metrics[f"speedup_batch{batch}"] = round(
            metrics[f"int8_batch{batch}_tokens_per_s"] / metrics[f"fp32_batch{batch}_tokens_per_s"], 3)
    return metrics


def _summary(cand: Candidate, method: str) -> str:
    task = cand.metrics["task"]
    sets = ", ".join(f"{name} {task[name]}" for name in ("test_en", "test_zh", "heldout_en", "heldout_zh", "general")
                     if name in task)
    ppl = cand.metrics["perplexity_delta_pct"]
    return (f"{method}: {sets}, perplexity {'not scored' if ppl is None else f'{ppl:+.2f}%'}, "
            f"greedy agreement {cand.metrics['greedy_tokens']}")


def run(ctx: StageContext) -> StageResult:
    """Quantize the FP32 graph (served INT8 variant and TensorRT's Q/DQ graph); gate both on the task; time INT8."""
    from toolkit.datasets.records import read_split
    from toolkit.model_io.modeling import load_tokenizer
    from toolkit.training.examples import build_examples

    cfg = ctx.config.quantize
    if not cfg.enabled:
        return StageResult(metrics={"int8_shipped": False, "qdq_shipped": False},
                           note="quantize.enabled is false: no INT8 variant")
    fp32_path = ctx.inputs["export_onnx"].path("model")
    tokenizer = load_tokenizer(ctx.inputs["merge"].path("model"))
    data = ctx.inputs["data"]
    train = read_conversations(data.dir / data.artifacts.get("train", "train.jsonl"))
    test = read_conversations(data.dir / data.artifacts.get("test", "test.jsonl"))
    if not test and (data.dir / data.artifacts.get("val", "val.jsonl")).is_file():
        test = read_conversations(data.dir / data.artifacts.get("val", "val.jsonl"))  # tiny datasets: no test rows
    test = test[: cfg.max_eval_examples]
    questions = evaluation_questions(read_split(data.dir, "test")[: ctx.config.eval.max_examples],
                                     heldout_paths(ctx.config.eval, not ctx.config.data.paths))
    reference = read_reference(ctx.inputs["evaluate"].path("answers"), questions)  # FP32's, same graph, same batches
    qdq_method = {"weight_only": "weight_only_qdq", "weight_only_gptq": "weight_only_gptq_qdq"}.get(
        cfg.qdq_method, cfg.qdq_method)  # quantize_int8's name for the recipe
    methods = {cfg.method, qdq_method if cfg.emit_qdq else ""}
    static = ("static_qdq", "static_qdq_percentile")
    train_calibration = (calibration_ids(tokenizer, train, cfg.calibration_samples)
                         if methods & {*static, *GPTQ_METHODS} else [])
    gptq_calibration: list[list[int]] = []
    if methods & set(GPTQ_METHODS):  # GPTQ weighs the dataset's conversations and as many general ones
        control = [ex.messages for ex in read_control(ctx.inputs["control"].path("control"))]
        gptq_calibration = train_calibration + calibration_ids(tokenizer, control, cfg.calibration_samples)

    def calibration(method: str) -> list[list[int]]:
        """What `method` calibrates on: nothing for the round-to-nearest recipes."""
        return gptq_calibration if method in GPTQ_METHODS else train_calibration if method in static else []

    started = time.perf_counter()
    int8_path = quantize_int8(fp32_path, ctx.out_dir / INT8_FILE, cfg.method, calibration(cfg.method),
                              exclude=cfg.exclude_nodes)
    metrics: dict[str, Any] = {"method": cfg.method, "exclude_nodes": cfg.exclude_nodes,
                               "quantize_s": round(time.perf_counter() - started, 2),
                               "calibration_samples": len(calibration(cfg.method))}
    artifacts = {"int8": INT8_FILE}
    if cfg.emit_qdq:
        started = time.perf_counter()
        quantize_int8(fp32_path, ctx.out_dir / QDQ_FILE, qdq_method, calibration(qdq_method),
                      exclude=cfg.qdq_exclude_nodes)
        artifacts["qdq"] = QDQ_FILE
        metrics.update(qdq_method=cfg.qdq_method, qdq_exclude_nodes=cfg.qdq_exclude_nodes,
                       qdq_calibration_samples=len(calibration(qdq_method)),
                       qdq_s=round(time.perf_counter() - started, 2),
                       qdq_bytes=onnx_bytes(ctx.out_dir / QDQ_FILE))

    threads = cfg.bench_threads or os.cpu_count() or 1
    scored = [(ex.input_ids, ex.labels) for conv in test
              for ex in build_examples(tokenizer, conv, ctx.config.data.max_seq_len)]
    started = time.perf_counter()
    fp32 = _open(fp32_path, threads)
    int8 = Candidate("int8", "INT8", int8_path)
    candidates = [int8]
    if cfg.emit_qdq:
        candidates.append(Candidate("qdq", "Q/DQ", ctx.out_dir / QDQ_FILE, qdq=True))
    shared, answers = evaluate_candidates(fp32, reference, candidates, tokenizer, questions, scored, cfg,
                                          ctx.config.eval, threads)
    with (ctx.out_dir / ANSWERS_FILE).open("w", encoding="utf-8") as fh:
        for row in answers:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    artifacts["answers"] = ANSWERS_FILE
    metrics.update(shared)
    metrics["evaluate_s"] = round(time.perf_counter() - started, 1)
    metrics.update(int8.metrics, int8_shipped=int8.passed,
                   **_bench(fp32, _open(int8_path, threads), cfg, tokenizer, threads))
    if "perplexity" in int8.metrics:
        metrics["int8_perplexity"] = metrics.pop("perplexity")
    fp32_bytes, int8_bytes = onnx_bytes(fp32_path), onnx_bytes(int8_path)
    metrics.update(fp32_bytes=fp32_bytes, int8_bytes=int8_bytes, size_ratio=round(int8_bytes / fp32_bytes, 3))
    gates = list(int8.gates)
    summary = (f"{_summary(int8, cfg.method)}, {metrics['speedup_batch1']:.2f}x/{metrics['speedup_batch8']:.2f}x "
               f"FP32 speed at batch 1/8, {int8_bytes / 2**20:.0f} MiB")
    failed = ", ".join(g.name for g in int8.gates if not g.passed)
    note = (f"INT8 shipped ({summary})" if int8.passed
            else f"INT8 NOT shipped: failed {failed} ({summary}); the repository leaves it out")
    if cfg.emit_qdq:
        qdq = candidates[1]
        metrics["qdq"] = qdq.metrics
        metrics["qdq_shipped"] = qdq.passed
        metrics["qdq_failed_gates"] = [g.name for g in qdq.gates if not g.passed]
        gates += qdq.gates
        qdq_summary = _summary(qdq, f"{cfg.qdq_method} Q/DQ")
        note += (f"; TensorRT INT8 source passed ({qdq_summary})" if qdq.passed else
                 f"; TensorRT INT8 source NOT passed: failed {', '.join(metrics['qdq_failed_gates'])} ({qdq_summary}), "
                 "no INT8 plan script")
    else:
        metrics["qdq_shipped"] = False
    note += (f" (time: INT8 {metrics['quantize_s']:.0f} s, Q/DQ graph {metrics.get('qdq_s', 0):.0f} s, "
             f"answers, perplexity and agreement {metrics['evaluate_s']:.0f} s)")
    return StageResult(metrics=metrics, gates=gates, artifacts=artifacts, note=note)
