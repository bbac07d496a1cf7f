"""Fine-tune recipes side by side: facts learned against general answers kept, on the build's question sets.

Each recipe is the build's own ``finetune`` stage with some ``train``/``lora`` settings changed, run on
an existing workspace's ``base_model``, ``data`` and ``control`` stages; the tuned model (merged in
memory) then answers every question the ``evaluate`` stage asks: the test split (56 + 56 in the demo
build), the held-out fact questions (168 + 168) and the 71 general questions. The base model's answers
to the general questions are computed once; each recipe's general answers are compared with them by
the gates' paired rule (:func:`toolkit.quality.significance.not_worse`). Usage::

    .venv/bin/python benchmarks/finetune_recipes.py --workspace build --out benchmarks/results/recipes.json \\
        --recipe 'kl1={"train": {"learning_rate": 0.002, "max_steps": 400, "kl_weight": 1.0}}' ...

Results are appended per recipe (a run that stops keeps what it measured); ``--table`` prints them.
``--answers NAME=build/evaluate/answers.jsonl`` scores a build's own answers (its FP32 graph on
onnxruntime) the same way, and ``--plot FILE.png`` draws facts right against general answers kept.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from toolkit.buildsys.config import BuildConfig
from toolkit.buildsys.stage_api import StageContext, StageRecord
from toolkit.datasets.records import read_split
from toolkit.model_io.modeling import CHAT_TEMPLATE_FILE, load_model, load_tokenizer, seed_everything
from toolkit.quality.scoring import answer_prompts, evaluation_questions, heldout_paths, outcomes, set_accuracies
from toolkit.quality.significance import not_worse
from toolkit.stages import finetune as finetune_stage

COLUMNS = ("test_en", "test_zh", "heldout_en", "heldout_zh", "retention12", "general")


def _record(workspace: Path, name: str) -> StageRecord:
    data = json.loads((workspace / name / ".stage.json").read_text())
    return StageRecord(name, workspace / name, data["key"], data["digest"], data.get("metrics", {}),
                       data.get("artifacts", {}), data)


def _answers(model: Any, tokenizer: Any, questions: list[Any], config: BuildConfig) -> list[str]:
    return answer_prompts(model, tokenizer, [q.prompt for q in questions], config.eval)


def run_recipe(name: str, overrides: dict[str, Any], workspace: Path, scratch: Path,
               base_general: list[bool], sets: tuple[str, ...] = ("test", "heldout", "general")) -> dict[str, Any]:
    from peft import PeftModel

    config = BuildConfig.model_validate({**overrides, "workspace": str(workspace),
                                         "eval": {"batch_size": 32, **overrides.get("eval", {})}})
    out = scratch / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    inputs = {stage: _record(workspace, stage) for stage in ("base_model", "data", "control")}
    started = time.perf_counter()
    result = finetune_stage.run(StageContext(config=config, out_dir=out, inputs=inputs, workspace=workspace))
    finetune_s = time.perf_counter() - started
    adapter = out / result.artifacts["adapter"]
    tokenizer = load_tokenizer(adapter)
    tokenizer.chat_template = (adapter / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    model = PeftModel.from_pretrained(load_model(inputs["base_model"].path("model")), str(adapter)).merge_and_unload()
    model.eval()
    test = read_split(inputs["data"].dir, "test")
    questions = [q for q in evaluation_questions(test, heldout_paths(config.eval, demo_dataset=True)) if q.set in sets]
    started = time.perf_counter()
    answers = _answers(model, tokenizer, questions, config)
    answer_s = time.perf_counter() - started
    (out / "answers.jsonl").write_text("".join(
        json.dumps({"set": q.set, "question": q.text, "answer": a, "right": q.right(a)}, ensure_ascii=False) + "\n"
        for q, a in zip(questions, answers, strict=True)), encoding="utf-8")
    return {
        "recipe": name, "overrides": overrides,
        **_scored(questions, answers, base_general, config),
        "finetune": {k: result.metrics.get(k) for k in ("steps", "train_s", "s_per_step", "train_loss_last",
                                                         "val_loss_last", "kept_step", "kl_last",
                                                         "val_fact_accuracy")},
        "finetune_s": round(finetune_s, 1), "answer_s": round(answer_s, 1),
    }


def _scored(questions: list[Any], answers: list[str], base_general: list[bool], config: BuildConfig) -> dict[str, Any]:
    scores = set_accuracies(questions, answers)
    kept = not_worse(base_general, outcomes(questions, answers, ["general"]), config.eval.max_retention_drop_points)
    return {"scores": {k: [v.correct, v.total, v.low, v.high] for k, v in scores.items()},
            "retention_rule": kept.as_dict()}


def score_build_answers(name: str, answers_file: Path, overrides: dict[str, Any], workspace: Path,
                        base_general: list[bool]) -> dict[str, Any]:
    """A build's own ``evaluate/answers.jsonl`` (the FP32 graph on onnxruntime) scored as a recipe's answers are."""
    config = BuildConfig.model_validate({**overrides, "workspace": str(workspace)})
    rows = [json.loads(line) for line in answers_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    given = {(r["set"], r["question"]): r["answer"] for r in rows}
    test = read_split(_record(workspace, "data").dir, "test")
    questions = evaluation_questions(test, heldout_paths(config.eval, demo_dataset=True))
    missing = [q.text for q in questions if (q.set, q.text) not in given]
    if missing:
        raise SystemExit(f"{answers_file}: {len(missing)} of the {len(questions)} questions have no answer, "
                         f"e.g. {missing[0]!r}")
    answers = [given[(q.set, q.text)] for q in questions]
    return {"recipe": name, "overrides": overrides, "source": f"build answers {answers_file}",
            **_scored(questions, answers, base_general, config), "finetune_s": None, "answer_s": None}


def base_general_outcomes(workspace: Path, scratch: Path) -> list[bool]:
    """The base model's right/wrong on the general questions (cached in `scratch`)."""
    path = scratch / "base_general.json"
    if path.is_file():
        return list(json.loads(path.read_text()))
    base_dir = workspace / "base_model" / "model"
    questions = [q for q in evaluation_questions([]) if q.set == "general"]
    answers = _answers(load_model(base_dir), load_tokenizer(base_dir), questions, BuildConfig())
    right = outcomes(questions, answers, ["general"])
    scratch.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(right))
    return right


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| recipe | " + " | ".join(COLUMNS) + " | general vs base (95% CI, points) | fine-tune s |",
             "|---|" + "---:|" * (len(COLUMNS) + 2)]
    for r in results:
        cells = []
        for column in COLUMNS:
            if column not in r["scores"]:
                cells.append("–")
                continue
            k, n, low, high = r["scores"][column]
            cells.append(f"{k}/{n} ({k / n:.2f}, {low:.2f}-{high:.2f})")
        rule = r["retention_rule"]
        seconds = f"{r['finetune_s']:.0f}" if r.get("finetune_s") is not None else "(build)"
        lines.append(f"| {r['recipe']} | " + " | ".join(cells) +
                     f" | {rule['diff_points']:+.1f} ({rule['low_points']:+.1f} to {rule['high_points']:+.1f}) | "
                     f"{seconds} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Facts right (every fact question) against general answers kept, one point per recipe, 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from toolkit.quality.significance import accuracy

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for r in results:
        scores = r["scores"]
        facts = [k for k in ("test_en", "test_zh", "heldout_en", "heldout_zh") if k in scores]
        right, total = sum(scores[k][0] for k in facts), sum(scores[k][1] for k in facts)
        kept, asked = scores["general"][0], scores["general"][1]
        fy = accuracy([True] * right + [False] * (total - right))
        gx = accuracy([True] * kept + [False] * (asked - kept))
        ax.errorbar(gx.value, fy.value, xerr=[[gx.value - gx.low], [gx.high - gx.value]],
                    yerr=[[fy.value - fy.low], [fy.high - fy.value]], fmt="o", capsize=3)
        ax.annotate(f"{r['recipe']} ({right}/{total})", (gx.value, fy.value), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    ax.set_xlabel("general questions answered right (share of 71; the base model: 71/71)")
    ax.set_ylabel("fact questions answered right (share)")
    ax.set_title("Fine-tune recipes: facts learned against general answers kept (95 % intervals)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path("build"))
    parser.add_argument("--out", type=Path, required=True, help="JSON file the results are appended to")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/finetune-recipes"))
    parser.add_argument("--recipe", action="append", default=[], help="NAME=JSON config overrides")
    parser.add_argument("--answers", action="append", default=[],
                        help="NAME=ANSWERS_JSONL[=JSON overrides]: score a build's evaluate/answers.jsonl as a recipe")
    parser.add_argument("--plot", type=Path, help="also draw facts against general answers kept (PNG)")
    parser.add_argument("--table", action="store_true", help="print the table of --out and stop")
    parser.add_argument("--sets", default="test,heldout,general", help="question sets to answer (comma-separated)")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else []
    if not args.table:
        seed_everything(42, None)
        base_general = base_general_outcomes(args.workspace, args.scratch)
        for spec in args.recipe:
            name, _, text = spec.partition("=")
            result = run_recipe(name, json.loads(text), args.workspace, args.scratch, base_general,
                                tuple(args.sets.split(",")))
            results = [r for r in results if r["recipe"] != name] + [result]
            args.out.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
            print(table([result]).splitlines()[-1], flush=True)
        for spec in args.answers:
            name, _, rest = spec.partition("=")
            file, _, text = rest.partition("=")
            result = score_build_answers(name, Path(file), json.loads(text or "{}"), args.workspace, base_general)
            results = [r for r in results if r["recipe"] != name] + [result]
            args.out.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    print(table(results))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
