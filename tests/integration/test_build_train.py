"""The training half of `toolkit build` on the real SmolLM2-135M-Instruct: base model from the
embedded GGUF, data, a few LoRA steps, merge, export, evaluation on the exported graph; then the
stage cache on reruns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toolkit.buildsys.config import BuildConfig
from toolkit.model_io.modeling import load_tokenizer
from toolkit.stages.pipeline import run_build

pytestmark = pytest.mark.integration

TRAINING_HALF = ["base_model", "data", "control", "baseline", "finetune", "merge", "export_onnx", "evaluate"]


def _config(workspace: Path, rank: int = 8) -> BuildConfig:
    return BuildConfig.model_validate({
        "workspace": str(workspace),
        "lora": {"rank": rank, "alpha": 2 * rank},
        "train": {"max_steps": 3, "batch_size": 4, "eval_every": 2, "control_examples": 2, "val_examples": 4},
        # Retention is a pipeline-mechanics check here: 3 steps barely move the model, but keep margin.
        # No held-out fact set: the 71 general questions and 3 test questions are enough to exercise the stage.
        "eval": {"max_examples": 3, "max_new_tokens": 32, "min_retention": 0.5, "heldout_facts": []},
        "export": {"gate_new_tokens": 4},
    })


def _statuses(report_path: Path) -> dict[str, str]:
    report = json.loads(report_path.read_text())
    return {s["name"]: s["status"] for s in report["stages"] if s["name"] in TRAINING_HALF}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = tmp_path_factory.mktemp("build")
    run_build(_config(ws), until="evaluate")
    return ws


def test_first_build_writes_every_artifact_and_passes_its_gates(workspace: Path) -> None:
    report = json.loads((workspace / "report.json").read_text())
    assert report["status"] == "passed"
    stages = {s["name"]: s for s in report["stages"]}
    assert all(stages[name]["status"] == "ran" for name in TRAINING_HALF)
    assert all(g["passed"] for name in TRAINING_HALF for g in stages[name]["gates"])
    for name in TRAINING_HALF:
        for artifact in stages[name]["artifacts"].values():
            assert Path(artifact["path"]).exists(), artifact

    base = stages["base_model"]["metrics"]
    assert base["params"] > 100_000_000 and base["vocab"] == 49152
    assert base["eos_token"] == "<|im_end|>" and base["add_bos_token"] is False

    tuned = stages["finetune"]["metrics"]
    assert stages["control"]["metrics"]["control_examples"] <= 2
    assert tuned["steps"] == 3 and tuned["control_examples"] == stages["control"]["metrics"]["control_examples"]
    adapter = workspace / "finetune" / "adapter"
    template = (adapter / "chat_template.jinja").read_text()
    assert template == (workspace / "base_model" / "model" / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template
    assert (workspace / "finetune" / "loss.png").stat().st_size > 0
    assert len((workspace / "finetune" / "loss.csv").read_text().splitlines()) == 4  # header + 3 steps

    scores = stages["evaluate"]["metrics"]
    for key in ("bleu4_before", "bleu4_after", "rouge_l_before", "rouge_l_after", "fact_em_after",
                "retention_after"):
        assert 0.0 <= scores[key] <= 1.0, key
    for key in ("fact_accuracy_en_after", "fact_accuracy_zh_after"):  # the test split has both languages
        assert scores[key] is None or 0.0 <= scores[key] <= 1.0, key
    assert scores["fact_questions_en"] + scores["fact_questions_zh"] == 3
    samples = (workspace / "evaluate" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 3 and {"question", "reference", "before", "after"} <= json.loads(samples[0]).keys()
    assert "Held-out-phrasing fact accuracy" in (workspace / "evaluate" / "facts.md").read_text()
    # retention: the 71 general questions before and after, decided by the paired rule
    assert scores["retention_total"] == 71 and scores["retention12_after"].endswith("/12")
    rule = scores["retention_rule"]
    assert rule["questions"] == 71 and rule["low_points"] <= rule["diff_points"] <= rule["high_points"]
    gate = next(g for g in stages["evaluate"]["gates"] if g["name"] == "retention")
    assert gate["passed"] == (rule["low_points"] > -rule["margin_points"] and scores["retention_after"] >= 0.5)

    merged = workspace / "merge" / "model"
    assert (merged / "model.safetensors").is_file()
    tok = load_tokenizer(merged)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template == template
    golden = [json.loads(line) for line in (workspace / "merge" / "golden.jsonl").read_text().splitlines()]
    assert golden and all(g["match"] for g in golden)
    france = next(g for g in golden if "France" in g["messages"][-1]["content"])
    assert "paris" in france["merged"].lower()


def test_rerun_skips_everything_and_a_lora_change_reruns_only_what_follows(workspace: Path) -> None:
    run_build(_config(workspace), until="evaluate")
    assert set(_statuses(workspace / "report.json").values()) == {"skipped"}

    run_build(_config(workspace, rank=4), until="merge")  # export and evaluate would rerun too: not needed here
    statuses = _statuses(workspace / "report.json")
    # The base model's answers (baseline) are not recomputed for a new recipe.
    # (export_onnx and evaluate, past --until, are listed with their earlier records as "cached")
    assert statuses == {"base_model": "skipped", "data": "skipped", "control": "skipped", "baseline": "skipped",
                        "finetune": "ran", "merge": "ran", "export_onnx": "cached", "evaluate": "cached"}
    adapter_config = json.loads((workspace / "finetune" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4
