"""INT8 graphs against FP32 on more questions than the quantize gate asks (README: "INT8 recipes against
a wider question set").

Each graph (an ONNX file with the build's KV-cache interface) answers, greedily on onnxruntime with
the model's chat template and 64 new tokens: the test split's fact questions (what the gate asks),
the 336 questions of ``heldout/facts_heldout.jsonl``, the 12 retention questions and the 59 of
``heldout/general_heldout.json``. Facts are scored by :func:`toolkit.quality.textmetrics.contains_facts`,
general answers by :func:`toolkit.quality.retention.is_accepted`.

    .venv/bin/python -m benchmarks.quantize_wide --workspace build build/export_onnx/model.onnx \\
        build/quantize/model_qdq.onnx [more.onnx ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from toolkit.datasets.records import language_of, read_split
from toolkit.model_io.modeling import decode_text, load_tokenizer, pad_token_id, render_prompt_ids, stop_token_ids
from toolkit.quality.retention import RETENTION_SET, is_accepted
from toolkit.quality.task_gate import greedy_answers
from toolkit.quality.textmetrics import contains_facts
from toolkit.runtime.onnx_lm import OnnxCausalLM

HERE = Path(__file__).resolve().parent / "heldout"


def questions(workspace: Path) -> list[tuple[str, list[dict[str, str]], list[str], str]]:
    """(part, prompt messages, facts or accepted answers, language) in a fixed order."""
    out = [("test", ex.prompt, ex.facts, language_of(ex)) for ex in read_split(workspace / "data", "test") if ex.facts]
    for line in (HERE / "facts_heldout.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out.append(("heldout", [{"role": "user", "content": row["question"]}], row["facts"], row["lang"]))
    general = json.loads((HERE / "general_heldout.json").read_text(encoding="utf-8"))["questions"]
    out += [("retention", [{"role": "user", "content": item.question}], list(item.accepted), "")
            for item in RETENTION_SET]
    out += [("general", [{"role": "user", "content": g["question"]}], g["accepted"], "") for g in general]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=Path("build"), help="the build (tokenizer, test split)")
    parser.add_argument("graphs", type=Path, nargs="+")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.workspace / "merge" / "model")
    asked = questions(args.workspace)
    prompts = [render_prompt_ids(tokenizer, messages) for _, messages, _, _ in asked]
    print("| graph | test en | test zh | retention | held-out en | held-out zh | general |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for path in args.graphs:
        model = OnnxCausalLM(path, providers=["CPUExecutionProvider"], threads=args.threads,
                             session_config={"session.disable_quant_qdq": "1"})
        generated = greedy_answers(model, prompts, max_new_tokens=64, stop_ids=stop_token_ids(tokenizer),
                                   pad_id=pad_token_id(tokenizer), batch_size=16)
        counts: dict[tuple[str, str], list[int]] = {}
        for (part, _, wanted, lang), ids in zip(asked, generated, strict=True):
            answer = decode_text(tokenizer, ids).strip()
            right = contains_facts(answer, wanted) if part in ("test", "heldout") else is_accepted(answer, wanted)
            tally = counts.setdefault((part, lang), [0, 0])
            tally[0] += int(right)
            tally[1] += 1
        cells = [counts.get(key, [0, 0]) for key in (("test", "en"), ("test", "zh"), ("retention", ""),
                                                      ("heldout", "en"), ("heldout", "zh"), ("general", ""))]
        print(f"| {path} | " + " | ".join(f"{r}/{n}" for r, n in cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
