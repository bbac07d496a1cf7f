"""Interoperability check: other software reads the toolkit's build the way the toolkit does.

On a finished default build (``build/merge/model`` and ``model_repository/``):

1. Tokenizer files under several transformers versions: the toolkit's own (current 5.x), vLLM's
   (5.19 with vLLM 0.32) and 4.57, each in its own environment. ``AutoTokenizer`` on ``build/merge/model`` and on every
   ``model_repository/*/N/tokenizer`` must encode a probe sentence to the expected ids, decode it
   back exactly and log no warning.
2. vLLM serving ``build/merge/model`` answers every golden prompt and every test-split question of
   the build (greedy, 64 tokens) with the same text as the toolkit's gateway serving
   ``model_repository`` (``toolkit serve``).
3. vLLM's benchmark client, ``vllm bench serve --backend openai-chat``, against the gateway:
   every request must complete.

Writes ``benchmarks/results/interop-vllm-<date>.{json,md}``. Not part of the test suite: the first
run installs vLLM (about 3.5 GB, see benchmarks/thirdparty.py) and vLLM takes about 100 s to start
here.

    .venv/bin/python -m benchmarks.interop_vllm [--build build] [--repository model_repository]

``--families qwen2.5,llama3.2,...`` (or ``all``) does the same for every model family of
``tests/family_models.py`` instead of the default build: each family's tiny random-weight model (its real
tokenizer and chat template, head size 64 as vLLM's CPU attention wants) is built like the family tests
build it into one repository; then for each, vLLM serving its merged model and the gateway answer the same
conversations greedily, past the end of turn (``ignore_eos``), and must give the same text; and the
repository's tokenizer files must give llama.cpp's token test vectors under vLLM's transformers and 4.57.
Writes ``benchmarks/results/interop-families-<date>.{json,md}``. ``--model-dir DIR --repository R --model
NAME`` compares one merged model directory with its repository the same way.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from benchmarks.thirdparty import (
    BENCH_DIR,
    ROOT,
    Server,
    ensure_transformers,
    ensure_vllm,
    free_port,
    toolkit_serve_command,
    vllm_env,
)
from toolkit.quality.golden import golden_conversations

PROBE = "Hello world, how are you?"
PROBE_IDS = [19556, 905, 28, 638, 359, 346, 47]  # SmolLM2's published tokenizer
MAX_TOKENS = 64

# Run inside another environment: load each directory with AutoTokenizer and report what it saw.
_TOKENIZER_CHECK = r"""
import json, logging, sys, warnings
import transformers
from transformers import AutoTokenizer
seen = []
class Collect(logging.Handler):
    def emit(self, record): seen.append(record.getMessage().splitlines()[0])
logging.getLogger("transformers").addHandler(Collect(level=logging.WARNING))
warnings.simplefilter("always")
results = []
for path in sys.argv[2:]:
    seen.clear()
    with warnings.catch_warnings(record=True) as caught:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        ids = tok(sys.argv[1], add_special_tokens=False)["input_ids"]
        text = tok.decode(ids, skip_special_tokens=True)
    results.append({"path": path, "class": type(tok).__name__, "ids": list(ids), "decoded": text,
                    "warnings": seen + [str(w.message).splitlines()[0] for w in caught]})
print(json.dumps({"transformers": transformers.__version__, "results": results}))
"""


# Run inside another environment: each directory's tokenizer on its (text, ids) test vectors.
_VECTOR_CHECK = r"""
import json, sys
import transformers
from transformers import AutoTokenizer
cases = json.load(open(sys.argv[1]))
results = []
for path, vectors in cases.items():
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    wrong = [text for text, ids in vectors if tok(text, add_special_tokens=False)["input_ids"] != ids]
    results.append({"path": path, "class": type(tok).__name__, "vectors": len(vectors), "wrong": wrong[:5],
                    "ok": not wrong})
print(json.dumps({"transformers": transformers.__version__, "results": results}))
"""


def tokenizer_dirs(build: Path, repository: Path) -> list[Path]:
    dirs = [build / "merge" / "model"]
    dirs += sorted(p.parent for p in repository.glob("*/[0-9]*/tokenizer/tokenizer.json"))
    return dirs


def check_tokenizers(python: Path, dirs: list[Path]) -> dict[str, Any]:
    out = subprocess.run([str(python), "-c", _TOKENIZER_CHECK, PROBE, *map(str, dirs)], check=True,
                         capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for item in report["results"]:
        item["ok"] = item["ids"] == PROBE_IDS and item["decoded"] == PROBE and not item["warnings"]
    report["ok"] = all(item["ok"] for item in report["results"])
    return report


def chat(url: str, model: str, messages: list[dict[str, str]]) -> str:
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    response.raise_for_status()
    return str(response.json()["choices"][0]["message"]["content"])


def prompts_to_compare(build: Path) -> list[list[dict[str, str]]]:
    """The golden prompts, then the build's held-out test questions (new phrasings of taught facts)."""
    conversations = golden_conversations()
    test = build / "data" / "test.jsonl"
    if test.is_file():
        for line in test.read_text(encoding="utf-8").splitlines():
            messages = json.loads(line)["messages"]
            conversations.append(messages[:-1])
    return conversations


def compare_answers(vllm_url: str, gateway_url: str, model: str, build: Path) -> list[dict[str, Any]]:
    rows = []
    for conversation in prompts_to_compare(build):
        ours, theirs = chat(gateway_url, model, conversation), chat(vllm_url, model, conversation)
        rows.append({"prompt": conversation[-1]["content"], "gateway": ours, "vllm": theirs, "same": ours == theirs})
        print(f"  {'same' if ours == theirs else 'DIFFERENT'}: {conversation[-1]['content'][:50]!r}", flush=True)
    return rows


def bench_gateway(vllm: Path, gateway_url: str, model: str, tokenizer: Path, prompts: int) -> dict[str, Any]:
    """vLLM's own benchmark client against the gateway's OpenAI-compatible streaming endpoint."""
    result_dir = BENCH_DIR / "interop"
    result_dir.mkdir(parents=True, exist_ok=True)
    command = [str(vllm), "bench", "serve", "--backend", "openai-chat", "--base-url", gateway_url,
               "--endpoint", "/v1/chat/completions", "--model", model, "--tokenizer", str(tokenizer),
               "--dataset-name", "random", "--random-input-len", "64", "--random-output-len", "32",
               "--num-prompts", str(prompts), "--max-concurrency", "4", "--seed", "0",
               "--save-result", "--result-dir", str(result_dir), "--result-filename", "gateway.json"]
    print("$", " ".join(command), flush=True)
    run = subprocess.run(command, env=vllm_env(), capture_output=True, text=True)
    tail = "\n".join((run.stdout + run.stderr).splitlines()[-30:])
    saved = result_dir / "gateway.json"
    data = json.loads(saved.read_text()) if run.returncode == 0 and saved.is_file() else {}
    completed = int(data.get("completed", 0))
    return {"command": command, "exit_code": run.returncode, "completed": completed, "num_prompts": prompts,
            "failed": prompts - completed, "ok": run.returncode == 0 and completed == prompts,
            "output_throughput": data.get("output_throughput"), "tail": tail if run.returncode else ""}


def machine_description() -> str:
    import os

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "cpu")
    return f"{model}, {len(os.sched_getaffinity(0))} cores, {platform.system()} {platform.release()}"


def write_results(data: dict[str, Any]) -> Path:
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"interop-vllm-{datetime.now(UTC):%Y%m%d}"
    stem.with_suffix(".json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    lines = [f"# Interoperability with vLLM ({data['date']})", "", f"Machine: {data['machine']}", ""]
    lines += ["## Tokenizer files under other transformers versions", "",
              "| transformers | directory | class | ids ok | decoded ok | warnings |", "|---|---|---|---|---|---|"]
    for env in data["tokenizers"]:
        for item in env["results"]:
            rel = Path(item["path"]).resolve().relative_to(ROOT) if ROOT in Path(item["path"]).resolve().parents \
                else item["path"]
            lines.append(f"| {env['transformers']} | `{rel}` | {item['class']} | {item['ids'] == PROBE_IDS} | "
                         f"{item['decoded'] == PROBE} | {len(item['warnings'])} |")
    same = sum(r["same"] for r in data["answers"])
    lines += ["", f"## Greedy answers: vLLM {data['vllm_version']} vs the gateway", "",
              f"{same}/{len(data['answers'])} prompts (the golden prompts and the build's test questions) answered "
              "with identical text "
              f"({MAX_TOKENS} new tokens, temperature 0). vLLM was ready in {data['vllm_ready_s']:.0f} s.", ""]
    for row in data["answers"]:
        if not row["same"]:
            lines += [f"- {row['prompt'][:60]!r}: gateway {row['gateway'][:80]!r} vs vLLM {row['vllm'][:80]!r}"]
    bench = data["bench"]
    lines += ["", "## `vllm bench serve --backend openai-chat` against the gateway", "",
              f"{bench['completed']}/{bench['num_prompts']} requests completed (exit code {bench['exit_code']}), "
              f"output throughput {bench['output_throughput']} tok/s.", "", "```", " ".join(bench["command"]), "```"]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem.with_suffix(".md")


def chat_ignoring_eos(url: str, model: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    response.raise_for_status()
    data = response.json()
    return {"text": data["choices"][0]["message"]["content"], "tokens": data["usage"]["completion_tokens"],
            "prompt_tokens": data["usage"]["prompt_tokens"]}


def compare_model(vllm: Path, merged: Path, model: str, gateway_url: str, conversations: list[Any],
                  max_tokens: int = 16) -> dict[str, Any]:
    """vLLM serving the merged model directory against the gateway, same conversations, greedy past the end."""
    port = free_port()
    server = Server(f"vLLM {model}", [str(vllm), "serve", str(merged.resolve()), "--dtype", "float32", "--host",
                                      "127.0.0.1", "--port", str(port), "--served-model-name", model,
                                      "--max-model-len", "1024", "--seed", "0"],
                    f"http://127.0.0.1:{port}/v1/models", BENCH_DIR / "logs" / f"vllm-{model}.log", env=vllm_env())
    rows = []
    ready_s = server.start()
    try:
        for messages in conversations:
            ours = chat_ignoring_eos(gateway_url, model, messages, max_tokens)
            theirs = chat_ignoring_eos(f"http://127.0.0.1:{port}", model, messages, max_tokens)
            rows.append({"prompt": messages[-1]["content"], "gateway": ours, "vllm": theirs, "same": ours == theirs})
            print(f"  {model}: {'same' if ours == theirs else 'DIFFERENT'}: {messages[-1]['content'][:40]!r}",
                  flush=True)
    finally:
        server.stop()
    return {"model": model, "merged": str(merged), "vllm_ready_s": round(ready_s, 1), "answers": rows,
            "same": sum(r["same"] for r in rows), "total": len(rows)}


def check_vectors(python: Path, cases: dict[str, list[tuple[str, list[int]]]]) -> dict[str, Any]:
    spec = BENCH_DIR / "vector-cases.json"
    spec.write_text(json.dumps(cases, ensure_ascii=False))
    out = subprocess.run([str(python), "-c", _VECTOR_CHECK, str(spec)], check=True, capture_output=True, text=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    report = json.loads(out.stdout.strip().splitlines()[-1])
    report["ok"] = all(item["ok"] for item in report["results"])
    return report


def run_families(names: list[str], old_transformers: str) -> int:
    from tests import family_models as families
    from tests.tinybuild import CONVERSATIONS, build_families, served_name

    vllm = ensure_vllm()
    root = BENCH_DIR / "families"
    started = time.monotonic()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    # head size 64: vLLM's CPU attention takes 32 to 256
    workspaces = build_families(names, root, timeout_s=3600, hidden_size=128, num_attention_heads=2,
                                num_key_value_heads=1, head_dim=64)
    merged = {name: ws / "merge" / "model" for name, ws in workspaces.items()}
    repository = root / "repository"
    cases = {}
    for name in names:
        vectors = families.vocab_vectors(families.FAMILIES[name])
        cases[str(repository / served_name(name) / "1" / "tokenizer")] = vectors
        cases[str(merged[name])] = vectors
    tokenizers = [check_vectors(vllm.parent / "python", cases),
                  check_vectors(ensure_transformers(old_transformers), cases)]
    gateway_port, triton_port = free_port(), free_port() + 100
    models = []
    with Server("toolkit serve", toolkit_serve_command(repository, gateway_port, triton_port),
                f"http://127.0.0.1:{gateway_port}/health/ready", BENCH_DIR / "logs" / "toolkit-serve-families.log"):
        for name in names:
            models.append({"family": name, **compare_model(vllm, merged[name], served_name(name),
                                                            f"http://127.0.0.1:{gateway_port}", CONVERSATIONS)})
    version = subprocess.run([str(vllm.parent / "python"), "-c", "import vllm; print(vllm.__version__)"],
                             capture_output=True, text=True, env=vllm_env()).stdout.strip()
    data = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine_description(),
            "vllm_version": version, "total_s": round(time.monotonic() - started), "tokenizers": tokenizers,
            "models": models}
    stem = ROOT / "benchmarks" / "results" / f"interop-families-{datetime.now(UTC):%Y%m%d}"
    stem.with_suffix(".json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    lines = [f"# Model families against vLLM {version} ({data['date']})", "", f"Machine: {data['machine']}", "",
             "| family | vLLM = gateway (greedy, 16 tokens past the end of turn) | vLLM ready |", "|---|---:|---:|"]
    lines += [f"| {m['family']} | {m['same']}/{m['total']} | {m['vllm_ready_s']} s |" for m in models]
    lines += ["", "| transformers | directory | class | llama.cpp vectors |", "|---|---|---|---|"]
    for env in tokenizers:
        for item in env["results"]:
            rel = Path(item["path"]).relative_to(BENCH_DIR) if BENCH_DIR in Path(item["path"]).parents else item["path"]
            lines.append(f"| {env['transformers']} | `{rel}` | {item['class']} | "
                         f"{item['vectors'] - len(item['wrong'])}/{item['vectors']} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    ok = all(m["same"] == m["total"] for m in models) and all(t["ok"] for t in tokenizers)
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", type=Path, default=ROOT / "build")
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--model", default="smollm2-chat", help="served model name (the repository's)")
    parser.add_argument("--model-dir", type=Path, help="compare this merged model directory with --repository's "
                        "--model (greedy answers only)")
    parser.add_argument("--families", help="comma-separated families of tests/family_models.py, or 'all'")
    parser.add_argument("--bench-prompts", type=int, default=16)
    parser.add_argument("--old-transformers", default="4.57.6")
    args = parser.parse_args()
    if args.families:
        from tests import family_models as families

        names = list(families.FAMILIES) if args.families == "all" else args.families.split(",")
        return run_families(names, args.old_transformers)
    if args.model_dir:
        from tests.tinybuild import CONVERSATIONS

        gateway_port, triton_port = free_port(), free_port() + 100
        with Server("toolkit serve", toolkit_serve_command(args.repository, gateway_port, triton_port),
                    f"http://127.0.0.1:{gateway_port}/health/ready", BENCH_DIR / "logs" / "toolkit-serve.log"):
            result = compare_model(ensure_vllm(), args.model_dir, args.model, f"http://127.0.0.1:{gateway_port}",
                                   CONVERSATIONS)
        print(json.dumps({k: v for k, v in result.items() if k != "answers"}))
        return 0 if result["same"] == result["total"] else 1
    merged = args.build / "merge" / "model"
    if not (merged / "config.json").is_file():
        print(f"no merged model in {merged}: run `make build` first", file=sys.stderr)
        return 2

    vllm = ensure_vllm()
    dirs = tokenizer_dirs(args.build, args.repository)
    tokenizers = [check_tokenizers(Path(sys.executable), dirs),  # the toolkit's own (current) transformers
                  check_tokenizers(vllm.parent / "python", dirs),
                  check_tokenizers(ensure_transformers(args.old_transformers), dirs)]
    for env in tokenizers:
        print(f"transformers {env['transformers']}: {'ok' if env['ok'] else 'FAILED'} on {len(dirs)} directories")

    vllm_port, gateway_port, triton_port = free_port(), free_port(), free_port() + 100
    vllm_server = Server(
        "vLLM", [str(vllm), "serve", str(merged.resolve()), "--dtype", "float32", "--host", "127.0.0.1",
                 "--port", str(vllm_port), "--served-model-name", args.model, "--max-model-len", "2048", "--seed", "0"],
        f"http://127.0.0.1:{vllm_port}/v1/models", BENCH_DIR / "logs" / "vllm.log", env=vllm_env())
    gateway = Server("toolkit serve", toolkit_serve_command(args.repository, gateway_port, triton_port),
                     f"http://127.0.0.1:{gateway_port}/health/ready", BENCH_DIR / "logs" / "toolkit-serve.log")
    started = time.monotonic()
    with gateway:
        gateway_url = f"http://127.0.0.1:{gateway_port}"
        bench = bench_gateway(vllm, gateway_url, args.model, merged, args.bench_prompts)
        print(f"vllm bench serve against the gateway: {bench['completed']}/{bench['num_prompts']} completed")
        ready_s = vllm_server.start()
        try:
            answers = compare_answers(f"http://127.0.0.1:{vllm_port}", gateway_url, args.model, args.build)
        finally:
            vllm_server.stop()
    version = subprocess.run([str(vllm.parent / "python"), "-c", "import vllm; print(vllm.__version__)"],
                             capture_output=True, text=True, env=vllm_env()).stdout.strip()
    data = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "vllm_version": version, "vllm_ready_s": ready_s, "total_s": time.monotonic() - started,
        "tokenizers": tokenizers, "answers": answers, "bench": bench,
    }
    md = write_results(data)
    same = sum(r["same"] for r in answers)
    print(f"\n{same}/{len(answers)} identical answers; tokenizers "
          f"{'ok' if all(t['ok'] for t in tokenizers) else 'FAILED'}; bench {bench['completed']}/{bench['num_prompts']}"
          f"\nwrote {md}")
    return 0 if same == len(answers) and all(t["ok"] for t in tokenizers) and bench["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
