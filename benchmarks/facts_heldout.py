"""Fact accuracy on questions the build never saw: ``benchmarks/heldout/facts_heldout.jsonl``.

The build's own test split holds one unseen phrasing per fact; this set holds three more per fact,
written separately from the training data. A reply is right when it contains every fact string
(the build's rule: :func:`toolkit.quality.textmetrics.contains_facts`). Greedy, 64 new tokens, the model's
own chat template.

    .venv/bin/python -m benchmarks.facts_heldout [--model build/merge/model] [--out results.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from toolkit.model_io.modeling import generate_replies, load_model, load_tokenizer
from toolkit.quality.textmetrics import contains_facts

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "benchmarks" / "heldout" / "facts_heldout.jsonl"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "build" / "merge" / "model")
    parser.add_argument("--questions", type=Path, default=HELDOUT)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, help="write the per-question results here (JSON Lines)")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.questions.read_text(encoding="utf-8").splitlines() if line.strip()]
    tokenizer, model = load_tokenizer(args.model), load_model(args.model)
    started = time.perf_counter()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["question"]))
    answers = generate_replies(model, tokenizer, [[{"role": "user", "content": rows[i]["question"]}] for i in order],
                               max_new_tokens=args.max_new_tokens, batch_size=16)
    by_index = dict(zip(order, answers, strict=True))
    right: Counter[str] = Counter()
    total: Counter[str] = Counter()
    results = []
    for i, row in enumerate(rows):
        ok = contains_facts(by_index[i], row["facts"])
        right[row["lang"]] += ok
        total[row["lang"]] += 1
        results.append({**row, "reply": by_index[i], "correct": ok})
    if args.out:
        args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results), encoding="utf-8")
    for lang in sorted(total):
        print(f"{lang}: {right[lang]}/{total[lang]} = {right[lang] / total[lang]:.3f}")
    print(f"{len(rows)} questions in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
