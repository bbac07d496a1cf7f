"""`make bench`: the toolkit (FP32, INT8) against vLLM CPU, llama.cpp, the seed pattern and the bare onnxruntime loop.

Each system is set up (installed or built once under ``.bench/``, see ``thirdparty.py``), started
alone on the machine, asked the held-out questions greedily (answers compared across systems),
loaded by a third-party client, ``vllm bench serve --backend openai-chat``, at each concurrency
(closed loop, the same demo-dataset prompts, greedy, exactly ``--max-tokens`` new tokens with
``ignore_eos``), and stopped. The bare onnxruntime loop (the toolkit's runner, batch 1, no server)
is timed in-process as the single-stream floor. Writes ``benchmarks/results/<date>-<machine>.{md,json,png}``.

    .venv/bin/python -m benchmarks.bench [--quick] [--systems toolkit,toolkit-int8,vllm,llama.cpp,seed,onnxruntime]
        [--workspace build] [--repository model_repository] [--concurrency 1,4,16,32] [--max-tokens 128]

Run it on an otherwise idle machine: every number is CPU time shared with nothing else. A full run
takes about 20 minutes on 2 cores (vLLM alone needs 2 to start); ``--quick`` about 5.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import bench_report
from benchmarks.bench_structured import measure_structured
from benchmarks.bench_systems import SYSTEMS, Build, OnnxLoop, System, make_system, server_answers
from benchmarks.thirdparty import BENCH_DIR, ROOT, ForeignLoad, ensure_vllm, vllm_env

DEMO = ROOT / "toolkit" / "datasets" / "demo_customer_service.json"
FULL: dict[str, Any] = {"concurrency": (1, 4, 16, 32), "prompts": {1: 8, 4: 16, 16: 48, 32: 64}, "answers": 24}
QUICK: dict[str, Any] = {"concurrency": (1, 16), "prompts": {1: 4, 16: 32}, "answers": 6}
ANSWER_TOKENS = 64


def demo_prompts(count: int) -> tuple[list[str], str]:
    """`count` questions of the demo customer-service dataset, spread over it (English and Chinese)."""
    items = json.loads(DEMO.read_text(encoding="utf-8"))
    questions = [item["instruction"] + (f"\n\n{item['input']}" if item.get("input") else "") for item in items]
    step = max(1, len(questions) // count)
    return questions[::step][:count], f"every {step}th question of `{DEMO.relative_to(ROOT)}` ({count} prompts)"


def heldout_questions(workspace: Path, limit: int) -> tuple[list[str], str]:
    """The build's test-split questions (new phrasings of taught facts), else the repository's held-out set."""
    test = workspace / "data" / "test.jsonl"
    if test.is_file():
        rows = [json.loads(line) for line in test.read_text(encoding="utf-8").splitlines() if line.strip()]
        questions, source = [r["messages"][-2]["content"] for r in rows], f"`{test}`"
    else:
        path = ROOT / "toolkit" / "datasets" / "demo_facts_heldout.jsonl"
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        questions, source = [r.get("question") or r["messages"][0]["content"] for r in rows], f"`{path}`"
    return (questions[:limit] if limit else questions), source


def client_command(system: System, model: str, tokenizer: Path, prompts: Path, concurrency: int, count: int,
                   max_tokens: int, result_dir: Path) -> list[str]:
    """One `vllm bench serve` argument list (without the `vllm bench serve` itself)."""
    return ["--backend", "openai-chat", "--base-url", system.url, "--endpoint", "/v1/chat/completions",
            "--model", model, "--tokenizer", str(tokenizer), "--dataset-name", "custom",
            "--dataset-path", str(prompts), "--disable-shuffle", "--skip-chat-template",
            "--custom-output-len", str(max_tokens), "--ignore-eos", "--temperature", "0",
            "--num-prompts", str(count), "--max-concurrency", str(concurrency), "--request-rate", "inf",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99", "--seed", "0",
            "--disable-tqdm", "--save-result", "--save-detailed", "--result-dir", str(result_dir),
            "--result-filename", f"{system.name}-c{concurrency}.json"]


def level_metrics(raw: dict[str, Any]) -> dict[str, Any]:
    """The numbers the report keeps from one `vllm bench serve` result file."""
    out: dict[str, Any] = {k: raw.get(k) for k in ("completed", "failed", "duration", "total_output_tokens",
                                                    "output_throughput", "request_throughput")}
    for metric in ("ttft", "itl", "e2el", "tpot"):
        out[f"{metric}_ms"] = {p: raw[f"{p}_{metric}_ms"] for p in ("p50", "p90", "p99") if f"{p}_{metric}_ms" in raw}
        if f"mean_{metric}_ms" in raw:
            out[f"{metric}_ms"]["mean"] = raw[f"mean_{metric}_ms"]
    errors = [e for e in raw.get("errors", []) if e]
    out["errors"] = sorted({e.strip().splitlines()[-1][:200] for e in errors})
    lens = raw.get("output_lens") or []
    out["output_lens"] = {"min": min(lens), "max": max(lens)} if lens else {}
    return out


def run_client(vllm: Path, commands: list[list[str]], log: Path) -> None:
    driver = Path(__file__).with_name("vllm_bench_driver.py")
    with log.open("ab") as sink:
        subprocess.run([str(vllm.parent / "python"), str(driver), json.dumps(commands)], check=True, stdout=sink,
                       stderr=subprocess.STDOUT, env=vllm_env())


def measure_server(system: System, build: Build, plan: dict[str, Any], questions: list[str], run_dir: Path,
                   vllm: Path, prompts_file: Path) -> dict[str, Any]:
    record: dict[str, Any] = {"version": system.version, "notes": system.notes, "command": system.command}
    record["ready_s"] = system.server.start(timeout_s=900)
    try:
        record["answers"] = server_answers(system.url, build.model_name, questions, ANSWER_TOKENS)
        counts = plan["seed_prompts"] if system.name == "seed" else plan["prompts"]
        commands = [client_command(system, build.model_name, build.merged, prompts_file, c, counts[c],
                                   plan["max_tokens"], run_dir) for c in plan["concurrency"]]
        record["client_commands"] = commands
        print(f"{system.name}: vllm bench serve at concurrency {', '.join(map(str, plan['concurrency']))}", flush=True)
        foreign = ForeignLoad()
        run_client(vllm, commands, run_dir / f"{system.name}-client.log")
        record["foreign_cores"] = foreign.cores()
        record["levels"] = {}
        for c in plan["concurrency"]:
            raw = json.loads((run_dir / f"{system.name}-c{c}.json").read_text())
            record["levels"][str(c)] = level_metrics(raw)
            m = record["levels"][str(c)]
            print(f"  c={c}: {m['output_throughput']:.1f} tok/s, TTFT p50 {m['ttft_ms'].get('p50', 0):.0f} ms, "
                  f"ITL p50 {m['itl_ms'].get('p50', 0):.1f} ms, {m['failed']} failed", flush=True)
    finally:
        system.server.stop()
    return record


def measure_onnxruntime(build: Build, plan: dict[str, Any], questions: list[str], prompts: list[str]) -> dict[str, Any]:
    loop = OnnxLoop(build)
    record: dict[str, Any] = {"version": f"onnxruntime {__import__('onnxruntime').__version__}",
                              "notes": f"`{build.onnx}`, batch 1, toolkit.runtime.runners.OnnxRunner", "command": []}
    record["answers"] = loop.answers(questions, ANSWER_TOKENS)
    loop.measure(prompts[:1], 8)  # warm-up
    foreign = ForeignLoad()
    m = loop.measure(prompts[: plan["prompts"][1]], plan["max_tokens"])
    record["foreign_cores"] = foreign.cores()
    record["levels"] = {"1": m}
    print(f"onnxruntime loop: {m['output_throughput']:.1f} tok/s, ITL p50 {m['itl_ms']['p50']:.1f} ms", flush=True)
    return record


def compare_answers(systems: dict[str, Any], questions: list[str], source: str) -> dict[str, Any]:
    answered = {name: s["answers"] for name, s in systems.items() if s.get("answers")}
    reference = "toolkit" if "toolkit" in answered else next(iter(answered), None)
    out: dict[str, Any] = {"questions": questions, "source": source, "max_tokens": ANSWER_TOKENS,
                           "reference": reference, "agreement": {}}
    if reference is None:
        return out
    for name, answers in answered.items():
        if name == reference:
            continue
        diffs = [{"question": q, "reference": r, "answer": a}
                 for q, r, a in zip(questions, answered[reference], answers, strict=True) if r != a]
        out["agreement"][name] = {"same": len(questions) - len(diffs), "total": len(questions), "differences": diffs}
    return out


def machine_description() -> tuple[str, str]:
    """A sentence for the report and a short slug for the file name."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "cpu")
    cores = len(os.sched_getaffinity(0))
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    text = f"{cpu}, {cores} cores, {memory_gib:.0f} GiB, {platform.system()} {platform.release()}"
    words = [w for w in re.sub(r"\(.*?\)|CPU|Processor|@.*", " ", cpu).lower().split() if w not in {"intel", "amd"}]
    slug = re.sub(r"[^a-z0-9]+", "-", f"{cores}cpu-{'-'.join(words[:3])}").strip("-")
    return text, slug


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=ROOT / "build", help="the build (its merge/model)")
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("--quick", action="store_true", help="concurrency 1 and 16, fewer prompts (about 5 min)")
    parser.add_argument("--concurrency", help="comma-separated levels (default 1,4,16,32; quick 1,16)")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per request (ignore_eos)")
    parser.add_argument("--answers", type=int,
                        help="held-out questions whose greedy answers are compared (0: all; default 24, quick 6)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads for llama.cpp (the others use their defaults: every core)")
    args = parser.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    preset = QUICK if args.quick else FULL
    levels = tuple(int(c) for c in args.concurrency.split(",")) if args.concurrency else preset["concurrency"]
    counts = {c: preset["prompts"].get(c, max(2 * c, 8)) for c in levels}
    plan = {"concurrency": levels, "max_tokens": args.max_tokens, "prompts": counts,
            # One request at a time: the seed server's throughput is flat, so fewer prompts measure it as well.
            "seed_prompts": {c: max(c, 2 if args.quick else 4) for c in levels}}
    started = time.monotonic()
    build = Build.find(args.workspace.resolve(), args.repository.resolve())
    prompts, prompt_source = demo_prompts(max(counts.values()))
    questions, source = heldout_questions(build.workspace, preset["answers"] if args.answers is None else args.answers)
    stamp = datetime.now(UTC)
    machine, slug = machine_description()
    run_dir = BENCH_DIR / "runs" / f"{stamp:%Y%m%d-%H%M%S}"
    run_dir.mkdir(parents=True, exist_ok=True)
    prompts_file = run_dir / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts))
    # The client of every server row is `vllm bench serve`; the structured row and the bare loop need no vLLM.
    vllm = ensure_vllm() if set(systems) - {"onnxruntime", "structured"} else None
    results: dict[str, Any] = {}
    structured: dict[str, Any] | None = None
    for name in systems:
        print(f"== {name}", flush=True)
        if name == "structured":  # its own client and section: constrained against unconstrained decoding
            try:
                structured = measure_structured(build.repository, build.model_name, prompts, levels, counts,
                                                args.max_tokens, run_dir)
            except Exception as err:  # one system failing must not lose the others' numbers
                print(f"structured FAILED: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
                structured = {"error": f"{type(err).__name__}: {err}", "levels": {}}
            continue
        try:
            if name == "onnxruntime":
                results[name] = measure_onnxruntime(build, plan, questions, prompts)
            else:
                assert vllm is not None
                system = make_system(name, build, max(levels), args.threads, run_dir)
                results[name] = measure_server(system, build, plan, questions, run_dir, vllm, prompts_file)
        except Exception as err:  # one system failing must not lose the others' numbers
            print(f"{name} FAILED: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            results[name] = {"error": f"{type(err).__name__}: {err}", "levels": {}}
    manifest = build.manifest
    client_commands: list[list[str]] = next(
        (r["client_commands"] for r in results.values() if r.get("client_commands")), [])
    data: dict[str, Any] = {
        "date": stamp.isoformat(timespec="seconds"), "machine": machine,
        "command": shlex.join([Path(sys.executable).name, *map(str, sys.argv)]),
        "client_version": subprocess.run([str(vllm.parent / "python"), "-c", "import vllm; print(vllm.__version__)"],
                                         capture_output=True, text=True, env=vllm_env()).stdout.strip()
        if vllm is not None else "not used",
        "build": {"workspace": str(build.workspace), "repository": str(build.repository),
                  "model_name": build.model_name, "core_model": manifest.get("serving_core_model"),
                  "built_at": manifest.get("built_at"), "onnx": str(build.onnx), "merged": str(build.merged)},
        "settings": {"quick": args.quick, "max_tokens": args.max_tokens, "concurrency": list(levels),
                     "prompts_per_level": {str(c): n for c, n in counts.items()},
                     "seed_prompts_per_level": {str(c): n for c, n in plan["seed_prompts"].items()},
                     "prompt_source": prompt_source},
        "systems": results, "client_commands": client_commands, "prompts": prompts,
        "answers": compare_answers(results, questions, source) if questions else {},
        "total_s": time.monotonic() - started,
    }
    if structured is not None:
        data["structured"] = structured
    data["targets"] = bench_report.targets(data)
    md = bench_report.write(data, args.out, f"{stamp:%Y%m%d}-{slug}{'-quick' if args.quick else ''}")
    print(md.read_text())
    print(f"wrote {md} (and .json, .png)")
    failed = any("error" in r for r in results.values()) or (structured is not None and "error" in structured)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
