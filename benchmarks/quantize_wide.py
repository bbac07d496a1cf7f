"""Any number of graphs side by side on the build's questions (README: "INT8 recipes against a wider
question set").

Each graph (an ONNX file with the build's KV-cache interface) answers what the ``evaluate`` and
``quantize`` stages ask (:func:`toolkit.quality.scoring.evaluation_questions`: the test split, the held-out
fact questions, the 71 general questions), greedily on onnxruntime with the model's chat template and
the build's token budget; the first graph is the reference every other is compared with by the gates'
paired rule (:func:`toolkit.quality.significance.not_worse`).

    .venv/bin/python benchmarks/quantize_wide.py --workspace build build/export_onnx/model.onnx \\
        build/quantize/model_qdq.onnx [more.onnx ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from toolkit.buildsys.config import EvalSection
from toolkit.datasets.records import read_split
from toolkit.model_io.modeling import load_tokenizer
from toolkit.quality.scoring import evaluation_questions, heldout_paths, outcomes, set_accuracies
from toolkit.quality.significance import not_worse
from toolkit.quality.task_gate import FACT_SETS, answer_questions
from toolkit.runtime.onnx_lm import OnnxCausalLM

COLUMNS = ("test_en", "test_zh", "heldout_en", "heldout_zh", "retention12", "general")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=Path("build"), help="the build (tokenizer, test split)")
    parser.add_argument("graphs", type=Path, nargs="+")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    cfg = EvalSection()
    tokenizer = load_tokenizer(args.workspace / "merge" / "model")
    questions = evaluation_questions(read_split(args.workspace / "data", "test"), heldout_paths(cfg, True))
    print("| graph | " + " | ".join(COLUMNS) + " | facts vs first (points, 95% CI) | general vs first |")
    print("|---|" + "---:|" * (len(COLUMNS) + 2))
    reference: list[str] | None = None
    for path in args.graphs:
        model = OnnxCausalLM(path, providers=["CPUExecutionProvider"], threads=args.threads,
                             session_config={"session.disable_quant_qdq": "1"})
        answers = answer_questions(model, tokenizer, questions, max_new_tokens=cfg.max_new_tokens,
                                   batch_size=cfg.batch_size).answers
        scores = set_accuracies(questions, answers)
        cells = [f"{scores[c].correct}/{scores[c].total}" if c in scores else "–" for c in COLUMNS]
        reference = reference if reference is not None else answers
        for sets in (FACT_SETS, ("general",)):
            d = not_worse(outcomes(questions, reference, sets), outcomes(questions, answers, sets), 0.0)
            cells.append(f"{d.diff_points:+.1f} ({d.low_points:+.1f} to {d.high_points:+.1f})")
        print(f"| {path} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
