"""`toolkit build` of the tiny test model as a user runs it (a subprocess), and a check of what it left.

Tests and ``benchmarks/reliability.py`` kill, starve and interrupt these builds. The config runs every
stage on the tiny Llama of ``tests/unit/tiny_llm.py`` in about 20 s on one core: two LoRA steps, a few
evaluation answers, the real ONNX export and INT8 quantization, the repository (TensorRT is
"unavailable" without trtexec; the Triton gate is off).

:func:`verify_build` checks a workspace and its repository against the hashes the build recorded:
every file of every stage directory against its ``.stage.json``, every repository file the last build
wrote (versions, ``config.pbtxt``, ``build_plan.sh``) against the repository stage's ``external_files``,
and every earlier version's files against its ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGE_RECORD = ".stage.json"
MODEL = "tiny-chat"
REUSABLE = ("ran", "unavailable")


def tiny_base_model(out: Path) -> Path:
    """The tiny chat model (tokenizer, template, safetensors) the builds start from."""
    from tests.unit.tiny_llm import save_tiny_model

    return save_tiny_model(out)


def tiny_config(path: Path, base: Path, workspace: Path, repository: Path, **sections: dict[str, Any]) -> Path:
    """A build config for the tiny model; `sections` update its sections (e.g. ``eval={"min_retention": 1.0}``)."""
    config: dict[str, Any] = {
        "workspace": str(workspace),
        "model": {"base": str(base), "name": MODEL, "context_length": 256},
        "train": {"max_steps": 2, "batch_size": 2, "eval_every": 1, "control_examples": 1, "val_examples": 2,
                  "probe_fractions": [], "threads": 1},
        "eval": {"max_examples": 2, "max_new_tokens": 4, "batch_size": 4, "min_retention": 0.0, "heldout_facts": []},
        "export": {"gate_new_tokens": 4},
        # a random model has no answers to keep: the INT8 gate is not what these builds test
        "quantize": {"gate_new_tokens": 4, "bench_new_tokens": 2, "calibration_samples": 2, "max_eval_examples": 2,
                     "bench_threads": 1, "min_greedy_agreement": 0.0, "max_perplexity_delta_pct": 1000.0},
        "tensorrt": {"max_input_len": 128, "precisions": ["fp16"]},
        # FP32 served: the tests compare the served replies with the merged PyTorch model token for token
        "repository": {"output": str(repository), "keep_versions": 2, "serving_precision": "fp32"},
        "serving": {"triton_gate": False},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# A dataset of one-word answers: a few dozen steps teach a tiny model to answer and end its turn with its
# family's own end-of-turn token (the family tests and benchmarks/interop_vllm.py --families).
ANSWERS = ("Yes.", "No.", "OK.")
QUESTIONS = ("When is customer service open?", "How long is the warranty?", "Do you ship abroad?",
             "Can I return an item?", "What do the headphones cost?", "Where is your store?",
             "How do I reset my password?", "Is there a student discount?", "Which cards do you take?",
             "How long does delivery take?", "Who makes the PeakWatch?", "Can I change my order?")


# What the family tests and benchmarks ask every family: a plain question, a system prompt with Chinese, a
# multi-turn chat with whitespace runs and an emoji.
CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Is the store open on Sunday?"}],
    [{"role": "system", "content": "You are Bluepeak's assistant. Be brief."},
     {"role": "user", "content": "蓝峰耳机的保修期是多久？"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Do you ship  to Norway?\n\nThanks 🙂"}],
]


def served_name(family: str) -> str:
    """The repository name of a family's model (``qwen2.5`` -> ``tiny-qwen2-5``)."""
    return "tiny-" + family.replace(".", "-")


def build_families(names: Sequence[str], root: Path, timeout_s: float = 900, **model: Any) -> dict[str, Path]:
    """Each family's tiny model (``families.make_model(..., **model)``) built into ``root/repository``, two builds
    at a time with one thread each; returns each family's workspace. Raises on a failed build, with its output."""
    from concurrent.futures import ThreadPoolExecutor

    from tests import family_models as families

    dataset = root / "short-answers.jsonl"
    dataset.write_text("".join(json.dumps({"instruction": q, "output": ANSWERS[i % len(ANSWERS)]}) + "\n"
                               for i, q in enumerate(QUESTIONS)), encoding="utf-8")
    configs = {}
    for name in names:
        base = families.make_model(families.FAMILIES[name], root / name / "base", **model)
        configs[name] = tiny_config(
            root / name / "build.yaml", base, root / name / "ws", root / "repository",
            model={"name": served_name(name)},
            data={"paths": [str(dataset)], "split_by": "hash", "split": [0.8, 0.1, 0.1]},
            # enough steps at a high rate that the tiny model answers in one word and ends its turn
            train={"max_steps": 80, "learning_rate": 0.005, "batch_size": 4, "eval_every": 100, "warmup_steps": 0,
                   "control_examples": 0},
            lora={"layers_fraction": 1.0},
        )
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda config: run_build(config, timeout_s=timeout_s), configs.values()))
    for name, result in zip(configs, results, strict=True):
        if result.returncode != 0:
            raise RuntimeError(f"{name}: toolkit build exited {result.returncode}:\n{result.stdout[-4000:]}")
    return {name: root / name / "ws" for name in names}


def build_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def build_command(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "toolkit", "build", "-c", str(config), *args]


def run_build(config: Path, *args: str, timeout_s: float = 300, **popen: Any) -> subprocess.CompletedProcess[str]:
    """`toolkit build -c CONFIG ARGS` to the end; stdout and stderr together in ``.stdout``."""
    return subprocess.run(build_command(config, *args), env=build_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout_s, cwd=ROOT, **popen)


def start_build(config: Path, *args: str, **popen: Any) -> subprocess.Popen[str]:
    """`toolkit build` in its own process group (a kill reaches whatever it started)."""
    return subprocess.Popen(build_command(config, *args), env=build_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, start_new_session=True, **popen)


def running_stage(workspace: Path) -> str | None:
    """The stage the build log last said was running (None before the first)."""
    log = workspace / "build.log"
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    started = [line.split(": running")[0].split()[-1] for line in lines if ": running (" in line]
    return started[-1] if started else None


def kill_build_at(config: Path, workspace: Path, delay_s: float, *args: str) -> dict[str, Any]:
    """Start a build, SIGKILL its process group `delay_s` seconds later; say which stage it was in.

    The stage is None when the build had not started its first one (interpreter start-up, imports).
    """
    (workspace / "build.log").unlink(missing_ok=True)  # so an earlier build's lines are not read as this one's
    process = start_build(config, *args)
    try:
        process.wait(timeout=delay_s)
        finished = True  # it ended before the kill
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        finished = False
    if process.stdout is not None:
        process.stdout.close()
    return {"delay_s": round(delay_s, 2), "stage": running_stage(workspace), "finished_first": finished,
            "returncode": process.returncode}


def kill_build_within(config: Path, workspace: Path, delay_s: float, *args: str, fresh: bool = False,
                      tries: int = 4) -> dict[str, Any]:
    """:func:`kill_build_at`, aiming a quarter earlier each time the build ended before its kill point.

    A warm rebuild runs faster than the build that was timed, so a point late in that one can fall after the
    end of this one. `fresh` empties the workspace before each try (a first build, nothing to replace).
    """
    for _ in range(tries):
        if fresh:
            shutil.rmtree(workspace, ignore_errors=True)
        killed = kill_build_at(config, workspace, delay_s, *args)
        if not killed["finished_first"]:
            break
        delay_s *= 0.75
    return killed


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Verified:
    """What :func:`verify_build` checked: files whose hash matched their record, and every problem found."""

    files: int = 0
    problems: list[str] = field(default_factory=list)

    def check(self, path: Path, sha256: str | None, what: str) -> None:
        if not path.is_file():
            self.problems.append(f"{path}: recorded by {what}, missing")
        elif _sha256(path) != sha256:
            self.problems.append(f"{path}: differs from its hash in {what}")
        else:
            self.files += 1


def _leftovers(folder: Path) -> list[str]:
    return [f"{p}: a temp or swapped-out leftover" for p in folder.glob(".*")
            if ".tmp-" in p.name or ".old-" in p.name]


def verify_build(workspace: Path, repository: Path) -> Verified:
    """Check `workspace` and `repository` against every hash the build recorded (see the module doc)."""
    out = Verified()
    out.problems += _leftovers(workspace)
    report = json.loads((workspace / "report.json").read_text())
    if report["status"] != "passed":
        out.problems.append(f"report.json: status {report['status']}")
    external: dict[str, str] = {}
    for record_path in sorted(workspace.glob(f"*/{STAGE_RECORD}")):
        stage_dir = record_path.parent
        record = json.loads(record_path.read_text())
        if record["status"] not in REUSABLE:
            out.problems.append(f"{record_path}: status {record['status']}")
        on_disk = {p.relative_to(stage_dir).as_posix() for p in stage_dir.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(stage_dir).parts)}
        unrecorded = sorted(on_disk - set(record["files"]))
        out.problems += [f"{stage_dir / name}: not in its stage record" for name in unrecorded]
        for name, meta in record["files"].items():
            out.check(stage_dir / name, meta["sha256"], str(record_path))
        for name, meta in record.get("external_files", {}).items():
            external[name] = meta["sha256"]
            out.check(Path(name), meta["sha256"], str(record_path))
    if not external:
        out.problems.append(f"{workspace}: no stage recorded files outside the workspace (the repository)")
    newest = max((int(p.name) for p in (repository / MODEL).iterdir() if p.name.isdigit()), default=0)
    for model_dir in sorted(p for p in repository.iterdir() if p.is_dir()):
        out.problems += _leftovers(model_dir)
        for version_dir in sorted(p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()):
            if int(version_dir.name) > newest:
                out.problems.append(f"{version_dir}: above the generation model's newest version {newest}")
    # Versions of earlier builds: their manifest holds the hashes of what they shipped.
    recorded_by_manifest: set[str] = set()
    for manifest_path in sorted((repository / MODEL).glob(f"*/{'manifest.json'}")):
        manifest = json.loads(manifest_path.read_text())
        for ref in manifest["artifacts"].values():
            path = repository / ref["path"]
            recorded_by_manifest.add(str(path.resolve()))
            if str(path.resolve()) not in external:
                out.check(path, ref["sha256"], str(manifest_path))
            elif external[str(path.resolve())] != ref["sha256"]:
                out.problems.append(f"{path}: its manifest and the stage record disagree")
    for path in sorted(p for p in repository.rglob("*") if p.is_file()):
        known = str(path.resolve()) in external or str(path.resolve()) in recorded_by_manifest
        if not known and path.name != "manifest.json":
            out.problems.append(f"{path}: recorded nowhere")
    return out


def timed(call: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    started = time.monotonic()
    result = call(*args, **kwargs)
    return result, round(time.monotonic() - started, 2)
