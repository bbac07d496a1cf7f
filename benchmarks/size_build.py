"""The whole build at real size: a Qwen2.5-0.5B- or 1.5B-shaped model, then served and asked through the gateway.

The model has Qwen2.5's exact shape (layers, widths, heads, tied embeddings, 151,936-token vocabulary) and
Qwen2's real tokenizer and chat template (``tests/family_models.py``), with random weights: everything but the
answers' quality is what a user's fine-tuned Qwen2.5 meets. The build runs every stage with a few training
steps and a small evaluation (the stages' memory and time depend on the model's size, not on how long it
trains), the Triton gate included; then ``toolkit serve`` serves the repository and the `openai` client asks
two conversations through the gateway. Each stage's time and peak memory (the build process's high-water
mark, reset before each stage; Triton's processes apart) go to
``benchmarks/results/size-<shape>-<date>.{json,md}``. A build the memory guard refuses is a result too: its
one-line refusal is recorded.

    .venv/bin/python -m benchmarks.size_build --shape 0.5b [--workdir .bench/size]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from benchmarks.thirdparty import Server, free_port, toolkit_serve_command
from tests import family_models as families

ROOT = Path(__file__).resolve().parents[1]

# Qwen2.5's published configs (hidden, MLP, layers, heads, KV heads); both tie their embeddings.
SHAPES: dict[str, dict[str, Any]] = {
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2},
    "1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2},
}
CONVERSATIONS = [
    [{"role": "user", "content": "When is Bluepeak customer service open?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "蓝峰耳机的保修期是多久？"}],
]


def build_config(path: Path, base: Path, workspace: Path, repository: Path, name: str, shape: str) -> Path:
    config: dict[str, Any] = {
        "workspace": str(workspace),
        "model": {"base": str(base), "name": name, "context_length": 2048},
        "train": {"max_steps": 4, "batch_size": 2, "eval_every": 4, "val_examples": 4, "probe_fractions": [],
                  "control_examples": 8},
        # random weights know nothing: the retention gate could only fail, and measures nothing here
        "eval": {"max_examples": 8, "batch_size": 8, "min_retention": 0.0},
        "quantize": {"calibration_samples": 8, "max_eval_examples": 8},
        "repository": {"output": str(repository), "keep_versions": 1},
    }
    if shape != "0.5b":
        # Random weights never end a turn, so every answer runs to max_new_tokens: 16 instead of 64 keeps the
        # model-sized generation stages (control, baseline, evaluate) to minutes. GPTQ's Q/DQ rounding (11 min at
        # 0.5B here, its Hessians held at most 1 GiB at a time) gives way to round-to-nearest: same memory shape.
        config["eval"]["max_new_tokens"] = 16
        config["quantize"]["qdq_method"] = "weight_only"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def ask_gateway(repository: Path, name: str, log_dir: Path) -> list[dict[str, Any]]:
    import openai

    port, base_port = free_port(), free_port()
    command = toolkit_serve_command(repository, port, base_port)
    answers = []
    with Server("toolkit", command, f"http://127.0.0.1:{port}/health/ready", log_dir / "serve.log") as server:
        ready_s = server.start(timeout_s=1200)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=600, max_retries=0)
        for messages in CONVERSATIONS:
            started = time.perf_counter()
            reply = client.chat.completions.create(model=name, messages=messages, max_tokens=16, temperature=0)
            answers.append({"messages": messages, "content": reply.choices[0].message.content,
                            "finish_reason": reply.choices[0].finish_reason,
                            "usage": reply.usage.model_dump() if reply.usage else None,
                            "seconds": round(time.perf_counter() - started, 2), "server_ready_s": round(ready_s, 1)})
    return answers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".bench" / "size")
    parser.add_argument("--no-serve", action="store_true", help="stop after the build")
    parser.add_argument("--resume", action="store_true",
                        help="keep the model and workspace of an earlier run (its finished stages are cached)")
    args = parser.parse_args()
    work = args.workdir / args.shape
    name = f"qwen2-5-{args.shape.replace('.', '-')}"
    started = time.perf_counter()
    if args.resume and (work / "base" / "config.json").is_file():
        base = work / "base"
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        base = families.make_model(families.FAMILIES["qwen2.5"], work / "base", initializer_range=0.02,
                                   **SHAPES[args.shape])
    fixture_s = time.perf_counter() - started
    config = build_config(work / "build.yaml", base, work / "ws", work / "repository", name, args.shape)
    started = time.perf_counter()
    build = subprocess.run([sys.executable, "-m", "toolkit", "build", "-c", str(config)], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    build_s = time.perf_counter() - started
    report_path = work / "ws" / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    # the build resets its high-water mark before each stage, so its own peak is the largest stage's
    build_peak_mib = max([s.get("peak_rss_mib") or 0 for s in report.get("stages", [])]
                         + [resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024])
    result: dict[str, Any] = {
        "shape": args.shape, "params": None,  # from the base_model stage, below
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "fixture_s": round(fixture_s, 1), "build_s": round(build_s, 1),
        "build_exit": build.returncode, "build_peak_rss_mib": build_peak_mib,
        "build_tail": build.stdout.strip().splitlines()[-3:],
        "stages": [{"name": s["name"], "status": s["status"], "seconds": s.get("duration_s"),
                    "peak_rss_mib": s.get("peak_rss_mib"), "note": s.get("note", "")[:300]}
                   for s in report.get("stages", [])],
    }
    base_stage = next((s for s in report.get("stages", []) if s["name"] == "base_model"), None)
    result["params"] = base_stage["metrics"].get("params") if base_stage else None
    gate = next((s for s in report.get("stages", []) if s["name"] == "triton_gate"), None)
    result["triton_peak_rss_mib"] = gate["metrics"].get("triton_peak_rss_mib") if gate else None
    if build.returncode == 0 and not args.no_serve:
        result["answers"] = ask_gateway(work / "repository", name, work / "serve")
    out = ROOT / "benchmarks" / "results" / f"size-{args.shape}-{datetime.now(UTC):%Y%m%d}"
    out.with_name(out.name + ".json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")
    lines = [f"# Build at real size: Qwen2.5-{args.shape}-shaped ({result['params']} parameters)", "",
             f"{result['date']}, {result['cpus']} cores; build exit {build.returncode} in {result['build_s']} s, "
             f"peak resident memory {build_peak_mib} MiB (build process)"
             + (f", Triton {result['triton_peak_rss_mib']} MiB" if result["triton_peak_rss_mib"] else ""), "",
             "A skipped stage's time and peak are those of the earlier run whose cached result it reused.", "",
             "| stage | status | seconds | peak MiB |", "|---|---|---:|---:|"]
    lines += [f"| {s['name']} | {s['status']} | {round(s['seconds'] or 0)} | {s['peak_rss_mib'] or ''} |"
              for s in result["stages"]]
    lines += ["", "Last lines of the build: " + " / ".join(result["build_tail"])]
    for answer in result.get("answers", []):
        lines.append(f"- {answer['messages'][-1]['content']!r} -> {answer['content']!r} ({answer['finish_reason']}, "
                     f"{answer['seconds']} s)")
    out.with_name(out.name + ".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0 if build.returncode == 0 else build.returncode


if __name__ == "__main__":
    sys.exit(main())
