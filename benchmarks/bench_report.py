"""The benchmark's outputs: the JSON of everything measured, a Markdown table, the targets, PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks import bench_structured
from benchmarks.bench_systems import LABELS

# Issue 14's targets, checked on every run (speed goals live in the benchmark output, not in tests).
TARGETS = (
    ("toolkit c=16 output tok/s ≥ 1.5 × vLLM c=16", "vllm", 16, 1.5),
    ("toolkit c=16 output tok/s ≥ 1.2 × llama.cpp c=16", "llama.cpp", 16, 1.2),
    ("toolkit c=16 output tok/s ≥ 6 × toolkit c=1", "toolkit", 1, 6.0),
)
TARGET_LEVEL = 16


def _level(data: dict[str, Any], system: str, concurrency: int) -> dict[str, Any] | None:
    levels = data["systems"].get(system, {}).get("levels", {})
    return levels.get(str(concurrency))


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with the measured ratio (None where a system or level was not measured)."""
    out = []
    ours = _level(data, "toolkit", TARGET_LEVEL)
    for text, other, level, want in TARGETS:
        theirs = _level(data, other, level)
        ratio = (ours["output_throughput"] / theirs["output_throughput"]
                 if ours and theirs and theirs["output_throughput"] else None)
        out.append({"target": text, "ratio": ratio, "want": want, "met": ratio is not None and ratio >= want})
    ours1, bare = _level(data, "toolkit", 1), _level(data, "onnxruntime", 1)
    if ours1 and bare and bare["itl_ms"].get("p50"):
        ratio = ours1["itl_ms"]["p50"] / bare["itl_ms"]["p50"]
        out.append({"target": "toolkit c=1 ITL p50 ≤ 1.1 × the bare onnxruntime loop's", "ratio": ratio,
                    "want": 1.1, "met": ratio <= 1.1})
    else:
        out.append({"target": "toolkit c=1 ITL p50 ≤ 1.1 × the bare onnxruntime loop's", "ratio": None,
                    "want": 1.1, "met": False})
    llama1 = _level(data, "llama.cpp", 1)
    if ours1 and llama1 and llama1["itl_ms"].get("p50"):
        ratio = ours1["itl_ms"]["p50"] / llama1["itl_ms"]["p50"]
        out.append({"target": "toolkit c=1 ITL p50 ≤ llama.cpp's (both FP32)", "ratio": ratio, "want": 1.0,
                    "met": ratio <= 1.0})
    return out


def _ms(stats: dict[str, float], key: str) -> str:
    return f"{stats[key]:.0f}" if key in stats else "–"


def markdown(data: dict[str, Any]) -> str:
    s = data["settings"]
    lines = [f"# Serving benchmark {data['date']} ({'quick' if s['quick'] else 'full'})", "",
             f"Machine: {data['machine']}.", "",
             f"Build: workspace `{data['build']['workspace']}`, repository `{data['build']['repository']}` "
             f"({data['build']['model_name']}, core model {data['build']['core_model']}, built "
             f"{data['build']['built_at']}). Every system runs alone on the machine, one after another.", "",
             f"Load: {s['prompt_source']}; greedy (temperature 0), exactly {s['max_tokens']} new tokens a request "
             "(`ignore_eos`), streamed; client `vllm bench serve --backend openai-chat` "
             f"(vLLM {data['client_version']}), closed loop at each concurrency. Prompts a level: "
             + ", ".join(f"c={c}: {n}" for c, n in s["prompts_per_level"].items())
             + (f" (seed server: {', '.join(f'c={c}: {n}' for c, n in s['seed_prompts_per_level'].items())}, "
                "since it serves one request at a time)" if "seed" in data["systems"] else "") + ".", "",
             "| system | c | output tok/s | req/s | TTFT p50/p90/p99 ms | ITL p50/p90/p99 ms | "
             "E2E p50/p90/p99 ms | errors |", "|---|---:|---:|---:|---|---|---|---:|"]
    for name, system in data["systems"].items():
        if "error" in system:
            lines.append(f"| {LABELS[name]} | – | failed: {system['error'][:80]} | | | | | |")
            continue
        for level, m in system["levels"].items():
            tri = [" / ".join(_ms(m[k], p) for p in ("p50", "p90", "p99")) for k in ("ttft_ms", "itl_ms", "e2el_ms")]
            lines.append(f"| {LABELS[name]} | {level} | {m['output_throughput']:.1f} | {m['request_throughput']:.2f} | "
                         f"{tri[0]} | {tri[1]} | {tri[2]} | {m['failed']} |")
    disturbed = {name: s["foreign_cores"] for name, s in data["systems"].items() if s.get("foreign_cores", 0) > 0.1}
    if disturbed:
        lines += ["", "**Disturbed:** other processes used CPU while these systems were measured (average cores): "
                  + ", ".join(f"{LABELS[n]} {c:.2f}" for n, c in disturbed.items()) + "; their numbers are low."]
    if "structured" in data:
        lines += bench_structured.markdown(data["structured"])
    lines += ["", "## Targets (issue 14)", "", "| target | measured | met |", "|---|---:|---|"]
    for t in data["targets"]:
        measured = f"{t['ratio']:.2f}×" if t["ratio"] is not None else "not measured"
        lines.append(f"| {t['target']} | {measured} | {'yes' if t['met'] else 'no'} |")
    answers = data.get("answers", {})
    if answers.get("reference"):
        lines += ["", "## Greedy answers", "",
                  f"{len(answers['questions'])} held-out questions ({answers['source']}), temperature 0, at most "
                  f"{answers['max_tokens']} tokens, ending at the end-of-turn token; each system against "
                  f"{LABELS[answers['reference']]}:", ""]
        for name, row in answers["agreement"].items():
            lines.append(f"- {LABELS[name]}: {row['same']}/{row['total']} identical")
            for diff in row["differences"][:3]:
                lines.append(f"  - {diff['question'][:60]!r}: {diff['reference'][:70]!r} vs {diff['answer'][:70]!r}")
    lines += ["", "## Systems and exact commands", ""]
    for name, system in data["systems"].items():
        lines.append(f"- **{LABELS[name]}** ({system.get('version', '')}; {system.get('notes', '')}"
                     + (f"; ready in {system['ready_s']:.0f} s" if system.get("ready_s") else "")
                     + (f"; other processes used {system['foreign_cores']:.2f} cores meanwhile"
                        if "foreign_cores" in system else "") + ")")
        if system.get("command"):
            lines += ["", "  ```", "  " + " ".join(system["command"]), "  ```"]
    lines += ["", "Client, one line a concurrency level (run in one process by `benchmarks/vllm_bench_driver.py`, "
              "which calls `vllm bench serve`'s own parser and `main`):", "", "```"]
    lines += [f"vllm bench serve {' '.join(data['client_commands'][0])}"] if data["client_commands"] else []
    lines += ["```", "", f"Whole run: `{data['command']}`, {data['total_s'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def plots(data: dict[str, Any], png: Path) -> None:
    """Output tok/s and latency (TTFT, ITL, E2E p50) against concurrency, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.6))
    panels = (("output_throughput", None, "output tok/s"), ("ttft_ms", "p50", "TTFT p50 (ms)"),
              ("itl_ms", "p50", "ITL p50 (ms)"), ("e2el_ms", "p50", "end-to-end p50 (ms)"))
    for axis, (key, pct, title) in zip(axes, panels, strict=True):
        for name, system in data["systems"].items():
            levels = sorted((int(c), m) for c, m in system.get("levels", {}).items())
            if not levels:
                continue
            xs = [c for c, _ in levels]
            ys = [m[key] if pct is None else m[key].get(pct, float("nan")) for _, m in levels]
            axis.plot(xs, ys, marker="o", label=LABELS[name])
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrency")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
        if key != "output_throughput":
            axis.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{data['machine']}; {data['settings']['max_tokens']} new tokens, greedy", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write(data: dict[str, Any], out_dir: Path, stem: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / stem
    base.with_suffix(".json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    plots(data, base.with_suffix(".png"))
    text = markdown(data) + f"\n![throughput and latency]({base.with_suffix('.png').name})\n"
    base.with_suffix(".md").write_text(text)
    return base.with_suffix(".md")
