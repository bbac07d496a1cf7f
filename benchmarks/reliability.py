"""Reliability, the long versions: a flood of clients, malformed requests, a soak with memory figures.

Against a running stack (``toolkit serve``; its state file gives the gateway URL and both pids):

    python -m benchmarks.reliability --state build/serve/state.json [--api-key KEY] \
        [--clients 200] [--soak-s 600] [--out benchmarks/results/reliability-latest.json]
    python -m benchmarks.reliability --no-serving --build-kills 20      # the build scenario alone

1. load: ``--clients`` streaming requests at once (max_tokens 32). Passes when every answer is a
   200 or a 429 with Retry-After, none is a 5xx, and none hangs past ``--deadline-s``.
2. malformed: a fixed list of bad bodies (wrong types, NaN, huge numbers, lone surrogates, invalid
   UTF-8, deep nesting, unknown roles). Passes when each is a 4xx in the OpenAI error shape.
3. soak: ``--soak-clients`` clients send requests back to back for ``--soak-s`` seconds while the
   resident memory of the gateway, of ``tritonserver`` and of its python-backend stub processes
   (``triton_python_backend_stub``, where the generation model and its onnxruntime session live;
   summed over the stubs) is sampled every 10 s. Passes when none grew by more than 10 % from the
   first sample after a one-minute warm-up (or a tenth of the soak) to the last, and no request got
   a 5xx.

4. build kills (``--build-kills N``, no server needed): a full ``toolkit build`` of the tiny test model
   (tests/tinybuild.py) and a ``--force`` rebuild are timed, then N builds are SIGKILLed at points
   spread over the shorter duration
   (one seeded draw in each of N equal slices; alternately a ``--force`` rebuild over a whole workspace
   and a first build into an empty one), each followed by a plain rerun. Passes when every rerun exits
   0 and the workspace and repository verify file by file against the hashes the build recorded (a
   build that ended before its kill point is counted, not failed). ``--no-serving`` runs this scenario alone.

The figures go to ``--out`` (JSON) and a Markdown table on stdout for docs/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]
MALFORMED: dict[str, bytes] = {
    "wrong type": b'{"messages": "hello"}',
    "unknown role": b'{"messages": [{"role": "root", "content": "hi"}]}',
    "NaN temperature": b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    "top_k 2**40": b'{"messages": [{"role": "user", "content": "hi"}], "top_k": 1099511627776}',
    "infinite penalty": b'{"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": Infinity}',
    "negative max_tokens": b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}',
    "lone surrogate": b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
    "invalid UTF-8": b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
    "deep nesting": b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "long stop string": b'{"messages": [{"role": "user", "content": "hi"}], "stop": "' + b"x" * 300 + b'"}',
    "not JSON": b'{"messages": [',
    "empty body": b"",
}


def _rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _children(pid: int, name: str) -> list[int]:
    """Live processes whose parent is `pid` and whose command name is `name` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1: text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        # the kernel cuts a command name to 15 characters
        if int(fields[1]) == pid and name.startswith(comm) and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


STUB = "triton_python_backend_stub"


def rss_samples(pids: dict[str, int]) -> dict[str, int]:
    """Resident KiB of each named process, and of Triton's python-backend stubs summed (``triton_stubs``)."""
    out = {name: rss for name, pid in pids.items() if (rss := _rss_kib(pid)) is not None}
    if "triton" in pids:
        stubs = [rss for pid in _children(pids["triton"], STUB) if (rss := _rss_kib(pid)) is not None]
        if stubs:
            out["triton_stubs"] = sum(stubs)
    return out


async def _one(client: httpx.AsyncClient, url: str, headers: dict[str, str], deadline_s: float) -> dict[str, Any]:
    body = {"messages": MESSAGES, "max_tokens": 32, "stream": True}
    start = time.perf_counter()
    try:
        async with asyncio.timeout(deadline_s):
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as response:
                text = "".join([chunk async for chunk in response.aiter_text()])
                done = text.rstrip().endswith("data: [DONE]")
                return {"status": response.status_code, "retry_after": response.headers.get("retry-after"),
                        "done": done or response.status_code != 200, "s": time.perf_counter() - start}
    except TimeoutError:
        return {"status": "hang", "s": time.perf_counter() - start}
    except httpx.HTTPError as err:
        return {"status": f"transport: {type(err).__name__}", "s": time.perf_counter() - start}


async def load(url: str, headers: dict[str, str], clients: int, deadline_s: float) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=deadline_s, limits=limits) as client:
        results = await asyncio.gather(*(_one(client, url, headers, deadline_s) for _ in range(clients)))
    counts: dict[str, int] = {}
    for result in results:
        counts[str(result["status"])] = counts.get(str(result["status"]), 0) + 1
    bad_429 = sum(1 for r in results if r["status"] == 429 and not r.get("retry_after"))
    unfinished = sum(1 for r in results if r["status"] == 200 and not r["done"])
    passed = set(counts) <= {"200", "429"} and not bad_429 and not unfinished
    return {"clients": clients, "counts": counts, "429_without_retry_after": bad_429,
            "200_without_done": unfinished, "slowest_s": round(max(r["s"] for r in results), 2), "passed": passed}


def malformed(url: str, headers: dict[str, str]) -> dict[str, Any]:
    rows = {}
    with httpx.Client(timeout=30) as client:
        for name, raw in MALFORMED.items():
            response = client.post(f"{url}/v1/chat/completions", content=raw,
                                   headers={**headers, "Content-Type": "application/json"})
            try:
                shape = set(response.json()["error"]) == {"message", "type", "param", "code"}
            except (ValueError, KeyError, TypeError):
                shape = False
            rows[name] = {"status": response.status_code, "error_shape": shape}
    passed = all(400 <= r["status"] < 500 and r["error_shape"] for r in rows.values())
    return {"cases": rows, "passed": passed}


async def soak(url: str, headers: dict[str, str], pids: dict[str, int], seconds: float, clients: int) -> dict[str, Any]:
    samples: dict[str, list[tuple[float, int]]] = {}
    statuses: dict[str, int] = {}
    start = time.monotonic()
    stop = start + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < stop:
            result = await _one(client, url, headers, 120)
            statuses[str(result["status"])] = statuses.get(str(result["status"]), 0) + 1

    async def sampler() -> None:
        while time.monotonic() < stop:
            for name, rss in rss_samples(pids).items():
                samples.setdefault(name, []).append((time.monotonic() - start, rss))
            await asyncio.sleep(10)

    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(sampler(), *(worker(client) for _ in range(clients)))
    warmup_s = min(60.0, seconds / 10)
    growth = {}
    for name, series in samples.items():
        after = [rss for t, rss in series if t >= warmup_s] or [rss for _, rss in series]
        growth[name] = {"first_kib": after[0], "last_kib": after[-1], "max_kib": max(after),
                        "growth_pct": round(100.0 * (after[-1] - after[0]) / after[0], 1)} if after else None
    no_5xx = not any(s.startswith("5") or s == "hang" or s.startswith("transport") for s in statuses)
    # Every process asked for must have been sampled: a Triton whose stubs were not found fails.
    wanted = {*pids, "triton_stubs"} if "triton" in pids else set(pids)
    passed = no_5xx and wanted <= set(growth) and all(g is not None and g["growth_pct"] < 10 for g in growth.values())
    stubs = len(_children(pids["triton"], STUB)) if "triton" in pids else 0
    return {"seconds": seconds, "clients": clients, "statuses": statuses, "stubs": stubs, "rss": growth,
            "passed": passed}


def build_kills(kills: int, seed: int, root: Path) -> dict[str, Any]:
    """SIGKILL `kills` tiny builds at points spread over a full build's duration; rerun and verify each."""
    from tests.tinybuild import kill_build_within, run_build, timed, tiny_base_model, tiny_config, verify_build

    base = tiny_base_model(root / "base")
    workspace, repository = root / "ws", root / "repo"
    config = tiny_config(root / "tiny.yaml", base, workspace, repository)
    first, first_s = timed(run_build, config)
    if first.returncode != 0:
        return {"passed": False, "error": first.stdout[-2000:]}
    # A first build pays one-off costs (cold caches): the warm rebuild is the span the kills must fall in.
    _, rebuild_s = timed(run_build, config, "--force")
    full_s = min(first_s, rebuild_s)
    rng = random.Random(seed)
    trials = []
    for trial in range(kills):
        delay = full_s * (trial + rng.random()) / kills
        fresh = trial % 2 == 1
        killed = kill_build_within(config, workspace, delay, *(() if fresh else ("--force",)), fresh=fresh)
        rerun, rerun_s = timed(run_build, config)
        verified = verify_build(workspace, repository)
        trials.append({**killed, "build": "fresh" if fresh else "--force", "rerun_exit": rerun.returncode,
                       "rerun_s": rerun_s, "files_verified": verified.files, "problems": verified.problems[:5]})
        print(f"kill {trial + 1}/{kills} at {killed['delay_s']} s in {killed['stage']}: rerun exit "
              f"{rerun.returncode} in {rerun_s} s, {verified.files} files verified, {len(verified.problems)} problems",
              file=sys.stderr)
    # A build that ended before its kill point proves nothing, but is no failure either: it is counted.
    passed = all(t["rerun_exit"] == 0 and not t["problems"] for t in trials)
    return {"full_build_s": full_s, "ended_before_kill": sum(t["finished_first"] for t in trials), "seed": seed,
            "trials": trials, "passed": passed}


def markdown(report: dict[str, Any]) -> str:
    lines = ["| Scenario | Tried | Happened | Pass |", "|---|---|---|---|"]
    if "load" in report:
        load_ = report["load"]
        lines.append(f"| load | {load_['clients']} concurrent streaming clients | {load_['counts']}; slowest "
                     f"{load_['slowest_s']} s | {'yes' if load_['passed'] else 'NO'} |")
    if "malformed" in report:
        bad = report["malformed"]
        statuses = sorted({str(c["status"]) for c in bad["cases"].values()})
        lines.append(f"| malformed | {len(bad['cases'])} bad bodies | statuses {', '.join(statuses)}; error shape "
                     f"on {sum(c['error_shape'] for c in bad['cases'].values())} | "
                     f"{'yes' if bad['passed'] else 'NO'} |")
    if "soak" in report:
        soak_ = report["soak"]
        rss = ", ".join(f"{n} {g['first_kib'] // 1024}→{g['last_kib'] // 1024} MiB ({g['growth_pct']:+} %)"
                        for n, g in soak_["rss"].items() if g)
        lines.append(f"| soak | {soak_['clients']} clients for {soak_['seconds']:.0f} s ({soak_.get('stubs', 0)} "
                     f"python-backend stubs) | {soak_['statuses']}; {rss} "
                     f"| {'yes' if soak_['passed'] else 'NO'} |")
    if "build_kills" in report and "trials" in report["build_kills"]:
        kills = report["build_kills"]
        trials = kills["trials"]
        stages: dict[str, int] = {}
        for t in trials:
            where = "ended first" if t["finished_first"] else str(t["stage"] or "start-up")
            stages[where] = stages.get(where, 0) + 1
        reruns = sorted(t["rerun_s"] for t in trials)
        lines.append(
            f"| build kills | SIGKILL at {len(trials)} points over a {kills['full_build_s']:.1f} s tiny build (in "
            f"{', '.join(f'{n} {c}x' for n, c in stages.items())}), each followed by a rerun | reruns exit "
            f"{sorted({t['rerun_exit'] for t in trials})} in {reruns[0]}-{reruns[-1]} s; "
            f"{sum(t['files_verified'] for t in trials)} file hashes verified, "
            f"{sum(len(t['problems']) for t in trials)} problems | {'yes' if kills['passed'] else 'NO'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", type=Path, default=Path("build/serve/state.json"))
    parser.add_argument("--url", help="gateway URL (default: from --state)")
    parser.add_argument("--api-key")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--deadline-s", type=float, default=300.0)
    parser.add_argument("--soak-s", type=float, default=600.0, help="0 skips the soak")
    parser.add_argument("--soak-clients", type=int, default=8)
    parser.add_argument("--build-kills", type=int, default=0, help="SIGKILLed tiny builds (0: none)")
    parser.add_argument("--build-seed", type=int, default=13)
    parser.add_argument("--build-root", type=Path, help="where the tiny builds go (default: a temp dir, removed)")
    parser.add_argument("--no-serving", action="store_true", help="skip load, malformed and soak (no server)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/reliability-latest.json"))
    args = parser.parse_args()
    report: dict[str, Any] = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if not args.no_serving:
        state = json.loads(args.state.read_text()) if args.state.is_file() else {}
        url = args.url or f"http://127.0.0.1:{state['gateway_port']}"
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        pids = {name: state[f"{name}_pid"] for name in ("gateway", "triton") if state.get(f"{name}_pid")}
        report["url"] = url
        report["load"] = asyncio.run(load(url, headers, args.clients, args.deadline_s))
        report["malformed"] = malformed(url, headers)
        if args.soak_s > 0:
            report["soak"] = asyncio.run(soak(url, headers, pids, args.soak_s, args.soak_clients))
    if args.build_kills > 0:
        if args.build_root is not None:
            args.build_root.mkdir(parents=True, exist_ok=True)
            report["build_kills"] = build_kills(args.build_kills, args.build_seed, args.build_root)
        else:
            with tempfile.TemporaryDirectory(prefix="reliability-build-") as root:
                report["build_kills"] = build_kills(args.build_kills, args.build_seed, Path(root))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    return 0 if all(part["passed"] for key, part in report.items() if isinstance(part, dict)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
