"""Where the toolkit's time goes under load: CPU seconds per process and py-spy profiles.

Starts ``toolkit serve`` on a repository, loads it with ``vllm bench serve --backend openai-chat``
(the benchmark's client and prompts) at one concurrency, and meanwhile

- counts the CPU seconds each process used (/proc/<pid>/stat): Triton's server, the python backend
  stub (the generation model: scheduler and onnxruntime), the gateway and the client;
- records py-spy (``pip install py-spy``; found under .bench/tools/bin or on PATH) on the stub and
  on the gateway, and prints each one's heaviest functions (inclusive and self, share of samples).

    .venv/bin/python -m benchmarks.profile_toolkit --repository model_repository --workspace build \\
        [--concurrency 16] [--prompts 48] [--seconds 25]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bench import client_command, demo_prompts, level_metrics
from benchmarks.bench_systems import Build, make_system
from benchmarks.thirdparty import BENCH_DIR, ForeignLoad, ensure_vllm, vllm_env

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def summarize(raw: Path, top: int, only: str = "") -> str:
    """Heaviest functions of a py-spy raw (collapsed) profile: inclusive and self share of samples.

    ``only``: keep the stacks that contain this text (e.g. the scheduler thread's loop).
    """
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or only not in stack:
            continue
        n = int(count)
        total += n
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")"
                  if " (" in f else f for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    lines = [f"{total} samples"]
    lines += ["inclusive:"] + [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    lines += ["self:"] + [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=Path("build"))
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seconds", type=int, default=25, help="py-spy recording time, from 8 s into the load")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--no-py-spy", action="store_true", help="only the CPU seconds (no sampling overhead)")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(BENCH_DIR / "tools" / "bin" / "py-spy")
    build = Build.find(args.workspace.resolve(), args.repository.resolve())
    out = BENCH_DIR / "profile" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    prompts, _ = demo_prompts(args.prompts)
    prompts_file = out / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts))
    vllm = ensure_vllm()
    system = make_system("toolkit", build, args.concurrency, 2, out)
    system.server.start()
    try:
        assert system.server.process is not None
        serve_pid = system.server.process.pid
        procs: dict[str, int] = {}
        for pid in children(serve_pid):
            line = cmdline(pid)
            if "tritonserver" in line:
                procs["tritonserver"] = pid
                for stub in children(pid):
                    procs["python backend stub"] = stub
            elif "uvicorn" in line or "gateway" in line:
                procs["gateway"] = pid
        command = client_command(system, build.model_name, build.merged, prompts_file, args.concurrency,
                                 args.prompts, args.max_tokens, out)
        driver = Path(__file__).with_name("vllm_bench_driver.py")
        client = subprocess.Popen([str(vllm.parent / "python"), str(driver), json.dumps([command])], env=vllm_env(),
                                  stdout=(out / "client.log").open("wb"), stderr=subprocess.STDOUT)
        time.sleep(8)  # the client's start-up (importing vLLM) and the first admissions
        procs["client"] = client.pid
        before = {name: cpu_seconds(pid) for name, pid in procs.items()}
        foreign = ForeignLoad()
        started = time.monotonic()
        spies = []
        if not args.no_py_spy:
            # The stub's scheduler thread in wall time (--idle: waiting on Triton's IPC counts), the
            # gateway's event loop in CPU time.
            for name, extra in (("python backend stub", ["--idle"]), ("gateway", [])):
                if name in procs:
                    raw = out / f"{name.replace(' ', '-')}.txt"
                    spies.append((name, raw, subprocess.Popen(
                        [py_spy, "record", "--pid", str(procs[name]), "--duration", str(args.seconds), "--rate", "200",
                         "--format", "raw", "--nonblocking", *extra, "--output", str(raw)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
            for _, _, spy in spies:
                spy.wait()
        else:
            time.sleep(args.seconds)
        elapsed = time.monotonic() - started
        after = {name: cpu_seconds(pid) for name, pid in procs.items()}
        client.wait()
        report = [f"toolkit under concurrency {args.concurrency} ({args.prompts} prompts, {args.max_tokens} tokens), "
                  f"{elapsed:.1f} s window, {len(os.sched_getaffinity(0))} cores",
                  "CPU seconds per wall second in the window:"]
        report += [f"  {name:22s} {(after[name] - before[name]) / elapsed:5.2f}" for name in procs]
        report.append(f"  {'other processes':22s} {foreign.cores():5.2f}  (not ours: should be 0)")
        result = out / f"toolkit-c{args.concurrency}.json"
        if result.is_file():
            m = level_metrics(json.loads(result.read_text()))
            report.append(f"client: {m['output_throughput']:.1f} tok/s, TTFT p50 {m['ttft_ms'].get('p50', 0):.0f} ms, "
                          f"ITL p50 {m['itl_ms'].get('p50', 0):.1f} ms, {m['failed']} failed "
                          "(py-spy's sampling slows it)" if spies else "")
        for name, raw, _ in spies:
            if raw.is_file():
                if name == "gateway":
                    report += ["", "== py-spy: gateway (CPU samples)", summarize(raw, args.top)]
                else:
                    report += ["", "== py-spy: generation-scheduler thread (wall-clock samples)",
                               summarize(raw, args.top, only="scheduler.py")]
        text = "\n".join(report)
        (out / "profile.txt").write_text(text + "\n")
        print(text)
        print(f"\nraw profiles and logs in {out}")
    finally:
        system.server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
