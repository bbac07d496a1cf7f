"""Stage `data`: load the configured dataset files (or the demo dataset), clean, split, write JSONL.

Writes ``train.jsonl``, ``val.jsonl`` and ``test.jsonl`` (one Example per line:
``{"messages": [...], "facts": [...], "source": "file:line"}``) and ``malformed.jsonl`` (the
records skipped under ``data.on_malformed: skip``, with their ``file:line`` and reason).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

from toolkit.buildsys.config import BuildConfig
from toolkit.buildsys.report import GateResult
from toolkit.buildsys.stage_api import StageContext, StageResult
from toolkit.datasets.records import (
    dataset_paths,
    language_of,
    load_examples,
    resolve_split_by,
    split_dataset,
    write_jsonl,
)
from toolkit.files import sha256_file

log = logging.getLogger(__name__)


def cache_inputs(config: BuildConfig) -> dict[str, Any]:
    """Content hashes of the dataset files, for the stage's cache key.

    The config section names the files but not what is in them: editing a dataset must rerun this
    stage (the pipeline already keys on the loader's source, toolkit/data.py, which this imports).
    Missing files hash as None; the stage then fails with a clear DataError.
    """
    files = {display: sha256_file(path) if path.is_file() else None for path, display in dataset_paths(config.data)}
    return {"files": files}


def run(ctx: StageContext) -> StageResult:
    section = ctx.config.data
    examples, problems = load_examples(section)
    split_by = resolve_split_by(examples, section.split_by)
    splits = split_dataset(examples, split_by, section.split, section.seed)
    artifacts = {}
    for name in ("train", "val", "test"):
        write_jsonl(ctx.out_dir / f"{name}.jsonl", getattr(splits, name))
        artifacts[name] = f"{name}.jsonl"
    with (ctx.out_dir / "malformed.jsonl").open("w", encoding="utf-8") as fh:
        for problem in problems:
            fh.write(json.dumps({"source": problem.source, "problem": problem.message}, ensure_ascii=False) + "\n")
    artifacts["malformed"] = "malformed.jsonl"

    languages = Counter(language_of(ex) for ex in examples)
    counts = splits.counts()
    metrics: dict[str, Any] = {
        "files": [display for _, display in dataset_paths(section)],
        "examples": len(examples),
        **counts,
        "skipped_malformed": len(problems),
        "languages": {"en": languages.get("en", 0), "zh": languages.get("zh", 0)},
        "with_facts": sum(1 for ex in examples if ex.facts),
        "split_by": split_by,
        "fact_groups": len({ex.fact_key for ex in examples}),
        "test_languages": dict(Counter(language_of(ex) for ex in splits.test)),
        "multi_turn": sum(1 for ex in examples if sum(m["role"] == "user" for m in ex.messages) > 1),
    }
    log.info(
        "data: %d examples (%d en, %d zh) -> train %d / val %d / test %d; %d malformed skipped",
        len(examples), metrics["languages"]["en"], metrics["languages"]["zh"],
        counts["train"], counts["val"], counts["test"], len(problems),
    )
    gates = []
    if section.split[2] > 0:  # a test share of 0 means the user opted out of evaluation data
        gates.append(GateResult(
            name="test_split_not_empty", passed=counts["test"] > 0, value=counts["test"], threshold=1,
            detail=f"{counts['test']} test example(s), split by {split_by}" if counts["test"] else (
                "evaluation needs at least one test example; " + (
                    "no fact has two phrasings: add phrasings (or `group` keys), or set data.split_by: hash"
                    if split_by == "phrasing" else "add data or raise data.split's test share")),
        ))
    note = f"{len(problems)} malformed record(s) skipped, see malformed.jsonl" if problems else ""
    return StageResult(metrics=metrics, gates=gates, artifacts=artifacts, note=note)
