"""Three Triton replicas behind one gateway, as `toolkit serve --replicas 3` runs them, and what happens to
every request when one of them dies, hangs, or is restarted.

One `toolkit serve --replicas 3` per module on the tiny model (each replica decodes 4 sequences at a
time and queues the rest, so a replica always holds both streams that have tokens and requests that
have none yet). Every request is counted from the client's side (httpx and the `openai` client,
real SSE): a success ends with a finish reason and ``[DONE]``, a failure with an error event and
``[DONE]``; nothing else may happen. Who served what is read from each Triton's own counters
(``toolkit_requests_total``) and the gateway's per-replica metrics. Deadlines are generous and the
assertions are on counts: the machine may be busy with other jobs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import TINY_MODEL, metric_sum, write_generation_repository

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
IDLE_TIMEOUT_S = 15.0  # the first token included: the last of 30 long requests queued on one replica waits ~6 s
PROBE_TIMEOUT_S = 2.0
MAX_ACTIVE = 4
GATEWAY_ENV = {
    "GATEWAY_HEALTH_INTERVAL_S": "0.5", "GATEWAY_TRITON_TIMEOUT_S": str(PROBE_TIMEOUT_S),
    "GATEWAY_TOKEN_IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S), "GATEWAY_MAX_IN_FLIGHT": "256",
}


@dataclass
class Stack:
    """The running `toolkit serve --replicas 3`: its process, state file and the gateway's URL."""

    process: subprocess.Popen[str]
    log_dir: Path
    url: str = ""

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads((self.log_dir / "state.json").read_text())
        return state

    def replicas(self) -> list[dict[str, Any]]:
        replicas: list[dict[str, Any]] = self.state()["replicas"]
        return replicas

    def address(self, index: int) -> str:
        return f"127.0.0.1:{self.replicas()[index]['grpc_port']}"


@pytest.fixture(scope="module")
def stack(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("replicas-repo")
    write_generation_repository(root, TINY_MODEL, tiny_onnx, context_length=1024, max_new_tokens_limit=1000,
                                max_active=MAX_ACTIVE, max_queue=256)
    log_dir = tmp_path_factory.mktemp("replicas-serve")
    process = subprocess.Popen(
        [sys.executable, "-m", "toolkit", "serve", "--repository", str(root), "--replicas", "3", "--log-dir",
         str(log_dir), "--port", "auto", "--http-port", "auto", "--grpc-port", "auto", "--metrics-port", "auto"],
        env={**os.environ, "PYTHONPATH": str(ROOT), **GATEWAY_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, cwd=log_dir,
    )
    stack = Stack(process, log_dir)
    try:
        deadline = time.monotonic() + 240
        while not ((log_dir / "state.json").is_file() and stack.state()["status"] == "ready"):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate(timeout=30)[0]
            time.sleep(0.5)
        stack.url = f"http://127.0.0.1:{stack.state()['gateway_port']}"
        yield stack
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=90)
        print(output[-4000:])


def test_serve_lists_every_replica_and_the_gateway_knows_them_all(stack: Stack) -> None:
    state = stack.state()
    replicas = state["replicas"]
    assert [r["index"] for r in replicas] == [0, 1, 2] and all(r["status"] == "ready" for r in replicas)
    ports = [r[k] for r in replicas for k in ("http_port", "grpc_port", "metrics_port")]
    assert len(set(ports)) == 9 and state["triton_pid"] == replicas[0]["pid"]
    assert len({r["pid"] for r in replicas}) == 3
    text = httpx.get(f"{stack.url}/metrics", timeout=10).text
    for index in range(3):
        assert metric_sum(text, "gateway_triton_endpoint_up", url=stack.address(index)) == 1


# ---------------------------------------------------------------- clients


@dataclass
class Outcome:
    """What one streamed request looked like from the client."""

    status: int | None = None
    tokens: int = 0  # content deltas before the end
    finish: str | None = None
    error: dict[str, Any] | None = None  # the error event, if the stream ended with one
    done: bool = False  # `data: [DONE]` came
    transport: str | None = None  # the connection failed, or no end within the client's deadline (a hang)
    ended_at: float = 0.0  # time.monotonic() when the stream ended

    @property
    def succeeded(self) -> bool:
        return self.status == 200 and self.finish is not None and self.error is None and self.done

    @property
    def failed_with_event(self) -> bool:
        return self.status == 200 and self.error is not None and self.done


def body(max_tokens: int, tag: int = 0) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"count to {tag}"}], "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 0, "stream": True}


async def stream_chat(client: httpx.AsyncClient, url: str, payload: dict[str, Any], timeout_s: float = 90) -> Outcome:
    out = Outcome()
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", f"{url}/v1/chat/completions", json=payload) as response:
                out.status = response.status_code
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        out.done = True
                        continue
                    event = json.loads(data)
                    if "error" in event:
                        out.error = event["error"]
                        continue
                    for choice in event.get("choices", []):
                        out.tokens += bool(choice["delta"].get("content"))
                        out.finish = choice.get("finish_reason") or out.finish
    except (httpx.HTTPError, TimeoutError) as err:
        out.transport = f"{type(err).__name__}: {err}"
    out.ended_at = time.monotonic()
    return out


def tally(outcomes: list[Outcome]) -> dict[str, int]:
    return {"sent": len(outcomes), "succeeded": sum(o.succeeded for o in outcomes),
            "failed_with_error_event": sum(o.failed_with_event for o in outcomes),
            "failed_before_a_token": sum(not o.succeeded and o.tokens == 0 for o in outcomes),
            "other": sum(not o.succeeded and not o.failed_with_event for o in outcomes)}


async def scrape(url: str) -> str:
    async with httpx.AsyncClient(timeout=10) as client:
        return (await client.get(url)).text


async def gateway_metric(stack: Stack, name: str, **labels: str) -> float:
    return metric_sum(await scrape(f"{stack.url}/metrics"), name, **labels)


async def triton_metric(stack: Stack, index: int, name: str, **labels: str) -> float:
    port = stack.replicas()[index]["metrics_port"]
    return metric_sum(await scrape(f"http://127.0.0.1:{port}/metrics"), name, **labels)


async def served(stack: Stack) -> list[float]:
    """Requests each replica's generation model finished (its own counter), all reasons."""
    return [await triton_metric(stack, i, "toolkit_requests_total") for i in range(3)]


async def wait_for(condition: Any, timeout_s: float, what: str, interval_s: float = 0.1) -> float:
    """Poll an async condition until true; the seconds it took. Fails naming `what` after `timeout_s`."""
    start = time.monotonic()
    while not await condition():
        assert time.monotonic() - start < timeout_s, f"{what}: not within {timeout_s:g} s"
        await asyncio.sleep(interval_s)
    return time.monotonic() - start


def gateway_log(stack: Stack, lines: int = 60) -> str:
    """The gateway's log lines about replicas (taken out, ready, retried), for a failure's message."""
    log = stack.log_dir / "gateway.log"
    text = log.read_text(errors="replace").splitlines() if log.is_file() else []
    return "\n".join([line for line in text if "Triton" in line or "Traceback" in line][-lines:])


def http_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(90, connect=10),
                             limits=httpx.Limits(max_connections=300, max_keepalive_connections=300))


# ---------------------------------------------------------------- spread


async def test_150_concurrent_streams_are_spread_over_the_three_replicas(stack: Stack) -> None:
    before = await served(stack)
    oai = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=120,
                             http_client=http_client())

    async def one(tag: int) -> tuple[str | None, int]:
        stream = await oai.chat.completions.create(
            model=TINY_MODEL, messages=[{"role": "user", "content": f"count to {tag}"}], max_tokens=16,
            temperature=0, stream=True, extra_body={"ignore_eos": True})
        finish, chunks = None, 0
        async for chunk in stream:
            if chunk.choices:
                chunks += bool(chunk.choices[0].delta.content)
                finish = chunk.choices[0].finish_reason or finish
        return finish, chunks

    results = await asyncio.gather(*(one(i) for i in range(150)))
    await oai.close()
    after = await served(stack)
    shares = [(a - b) / 150 for a, b in zip(after, before, strict=True)]
    print(f"figures: 150 concurrent streams -> per replica {[int(a - b) for a, b in zip(after, before, strict=True)]} "
          f"({', '.join(f'{s:.0%}' for s in shares)})")
    assert all(finish == "length" and chunks >= 1 for finish, chunks in results), results
    assert sum(after) - sum(before) == 150
    assert all(0.20 <= share <= 0.47 for share in shares), shares


# ---------------------------------------------------------------- a replica killed


async def test_a_replica_killed_under_load_loses_no_request_and_is_back_in_use_after_its_restart(
        stack: Stack) -> None:
    victim = 1
    address, pid = stack.address(victim), stack.replicas()[victim]["pid"]
    retried_before = await gateway_metric(stack, "gateway_triton_retries_total", replica=address)
    async with http_client() as client:
        tasks = [asyncio.create_task(stream_chat(client, stack.url, body(96, i))) for i in range(60)]

        async def decoding_and_queueing() -> bool:  # the victim holds streams with tokens and requests without
            return (await triton_metric(stack, victim, "toolkit_active_sequences") >= 1
                    and await triton_metric(stack, victim, "toolkit_queue_depth") >= 1)

        await wait_for(decoding_and_queueing, 60, "the replica never held decoding and queued requests")
        os.kill(pid, signal.SIGKILL)
        outcomes = await asyncio.gather(*tasks)
    counts = tally(outcomes)
    retried = await gateway_metric(stack, "gateway_triton_retries_total", replica=address) - retried_before
    print(f"figures: replica SIGKILLed under 60 streams: {counts}, retried on another replica: {retried:.0f}")
    assert counts["other"] == 0, [o for o in outcomes if not o.succeeded and not o.failed_with_event][:3]
    assert counts["sent"] == counts["succeeded"] + counts["failed_with_error_event"]
    assert counts["failed_before_a_token"] == 0  # those were retried, invisibly
    assert all(o.tokens >= 1 and o.error and o.error["type"] == "service_unavailable"
               for o in outcomes if o.failed_with_event)
    assert retried >= 1

    # `toolkit serve` restarts the replica after its backoff; the gateway sends it traffic again.
    async def restarted() -> bool:
        replica = stack.replicas()[victim]
        return replica["status"] == "ready" and replica["pid"] not in (None, pid)

    await wait_for(restarted, 120, "toolkit serve did not restart the killed replica", interval_s=0.05)
    ready_at = time.monotonic()
    routed = await gateway_metric(stack, "gateway_triton_routed_requests_total", replica=address)
    async with http_client() as client:
        async def back_in_use() -> bool:
            await asyncio.gather(*(stream_chat(client, stack.url, body(4, i)) for i in range(6)))
            return await gateway_metric(stack, "gateway_triton_routed_requests_total", replica=address) > routed

        await wait_for(back_in_use, 30, "the restarted replica got no request", interval_s=0)
    readmitted_s = time.monotonic() - ready_at
    print(f"figures: restarted replica routed to again {readmitted_s:.2f} s after it was ready")
    assert readmitted_s < 10


# ---------------------------------------------------------------- a replica hung


async def test_a_hung_replica_ends_its_streams_within_the_idle_timeout_and_new_requests_avoid_it(
        stack: Stack) -> None:
    victim = 2
    address, pid = stack.address(victim), stack.replicas()[victim]["pid"]
    async with http_client() as client:
        first = [asyncio.create_task(stream_chat(client, stack.url, body(400, i))) for i in range(24)]

        async def decoding_and_queueing() -> bool:
            return (await triton_metric(stack, victim, "toolkit_active_sequences") >= 1
                    and await triton_metric(stack, victim, "toolkit_queue_depth") >= 1)

        await wait_for(decoding_and_queueing, 60, "the replica never held decoding and queued requests")
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            async def taken_out() -> bool:
                return await gateway_metric(stack, "gateway_triton_endpoint_up", url=address) == 0

            out_s = await wait_for(taken_out, 30, "the gateway never took the hung replica out")
            routed = await gateway_metric(stack, "gateway_triton_routed_requests_total", replica=address)
            later = await asyncio.gather(*(stream_chat(client, stack.url, body(16, i)) for i in range(30)))
            routed_after = await gateway_metric(stack, "gateway_triton_routed_requests_total", replica=address)
            outcomes = await asyncio.gather(*first)
        finally:
            os.kill(pid, signal.SIGCONT)
    counts = tally(outcomes)
    cut_s = [o.ended_at - stopped_at for o in outcomes if o.failed_with_event]
    print(f"figures: replica SIGSTOPped under 24 long streams: taken out after {out_s:.2f} s; {counts}; its "
          f"streams ended {min(cut_s, default=0):.2f}-{max(cut_s, default=0):.2f} s after the stop (idle timeout "
          f"{IDLE_TIMEOUT_S:g} s); 30 requests sent meanwhile: {tally(later)}")
    assert counts["other"] == 0 and counts["failed_before_a_token"] == 0  # nothing hung, nothing lost
    assert counts["failed_with_error_event"] >= 1  # the streams that were decoding there
    assert all(o.error and o.error["type"] == "timeout_error" for o in outcomes if o.failed_with_event)
    assert max(cut_s) < IDLE_TIMEOUT_S + 5  # silent since before the stop: ended by the idle timeout
    assert routed_after == routed  # nothing new went to the hung replica
    assert all(o.succeeded for o in later), tally(later)

    async def back() -> bool:
        return await gateway_metric(stack, "gateway_triton_endpoint_up", url=address) == 1

    await wait_for(back, 30, "the resumed replica was not admitted again")


# ---------------------------------------------------------------- a rolling restart


async def test_a_rolling_restart_of_every_replica_fails_no_request(stack: Stack) -> None:
    """SIGTERM each replica in turn, as Kubernetes stops a pod: Triton refuses new requests at once and
    finishes its streams; `toolkit serve` starts it again; the next one goes once the gateway uses it."""
    outcomes: list[Outcome] = []
    stop = asyncio.Event()
    retried_before = await gateway_metric(stack, "gateway_triton_retries_total")

    async def client_loop(worker: int) -> None:
        async with http_client() as client:
            tag = 0
            while not stop.is_set():
                outcomes.append(await stream_chat(client, stack.url, body(48, worker * 1000 + tag)))
                tag += 1

    workers = [asyncio.create_task(client_loop(w)) for w in range(6)]
    timings = []
    try:
        for index in range(3):
            address, pid = stack.address(index), stack.replicas()[index]["pid"]
            restarts = stack.replicas()[index]["restarts"]
            sent_before = len(outcomes)
            os.kill(pid, signal.SIGTERM)
            started = time.monotonic()

            async def replaced(index: int = index, pid: int = pid, restarts: int = restarts) -> bool:
                replica = stack.replicas()[index]
                return replica["status"] == "ready" and replica["pid"] != pid and replica["restarts"] > restarts

            await wait_for(replaced, 120, f"replica {index + 1} was not restarted", interval_s=0.05)

            async def in_use(address: str = address) -> bool:
                return await gateway_metric(stack, "gateway_triton_endpoint_up", url=address) == 1

            await wait_for(in_use, 30, f"replica {index + 1} was not admitted again")
            timings.append((time.monotonic() - started, len(outcomes) - sent_before))
        await asyncio.sleep(1)
    finally:
        stop.set()
        await asyncio.gather(*workers)
    counts = tally(outcomes)
    retried = await gateway_metric(stack, "gateway_triton_retries_total") - retried_before
    print(f"figures: rolling restart of 3 replicas under 6 clients: {counts}, {retried:.0f} moved to another replica "
          f"before their first token; per replica (seconds from SIGTERM to serving again, requests meanwhile): "
          f"{[(round(s, 1), n) for s, n in timings]}")
    assert counts["sent"] >= 30
    assert counts["other"] == 0, ([o for o in outcomes if not o.succeeded and not o.failed_with_event][:5],
                                  gateway_log(stack))
    assert counts["failed_before_a_token"] == 0
    assert counts["succeeded"] == counts["sent"], [o.error for o in outcomes if o.error][:3]  # drained: none cut


# ---------------------------------------------------------------- load-aware


async def test_short_requests_avoid_the_replica_busy_with_long_ones(stack: Stack) -> None:
    """Long requests (max_tokens 256) are put on replica 1 alone (the others briefly stopped, so taken out);
    short ones sent while they run must all go to replicas 2 and 3. Round robin would send a third to 1."""
    busy, others = 0, (1, 2)
    LONG = 30  # noqa: N806 - 8 rounds of 4 sequences of 256 tokens: seconds, where the short phase takes one
    pids = [stack.replicas()[i]["pid"] for i in others]
    addresses = [stack.address(i) for i in range(3)]

    async def up(index: int) -> float:
        return await gateway_metric(stack, "gateway_triton_endpoint_up", url=addresses[index])

    async with http_client() as client:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            async def others_out() -> bool:
                return all([await up(i) == 0 for i in others])

            await wait_for(others_out, 30, "the stopped replicas were not taken out")
            long_sent = time.monotonic()
            long = [asyncio.create_task(stream_chat(client, stack.url, body(256, i))) for i in range(LONG)]

            async def all_on_busy() -> bool:
                return await gateway_metric(stack, "gateway_triton_replica_in_flight", replica=addresses[busy]) == LONG

            await wait_for(all_on_busy, 30, "the long requests did not all go to replica 1")
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)

        async def others_back() -> bool:
            return all([await up(i) == 1 for i in others])

        await wait_for(others_back, 30, "the resumed replicas were not admitted again")
        async def routed() -> list[float]:
            return [await gateway_metric(stack, "gateway_triton_routed_requests_total", replica=a) for a in addresses]

        before = await routed()
        short_outcomes: list[Outcome] = []
        while len(short_outcomes) < 24:
            short_outcomes += await asyncio.gather(*(stream_chat(client, stack.url, body(8, i)) for i in range(6)))
            short_routed = [int(after - b) for after, b in zip(await routed(), before, strict=True)]
            assert short_routed[busy] == 0, f"short requests went to the replica busy with long ones: {short_routed}"
            long_still_running = await gateway_metric(stack, "gateway_triton_replica_in_flight",
                                                      replica=addresses[busy])
            assert long_still_running > 0, (f"the long requests ended after {len(short_outcomes)} short ones: "
                                            "this machine decodes too fast for the test")
        shorts_done_s = time.monotonic() - long_sent
        long_outcomes = await asyncio.gather(*long)
        longs_done_s = time.monotonic() - long_sent
    print(f"figures: {LONG} long requests on replica 1 (all done {longs_done_s:.1f} s after they were sent); 24 short "
          f"ones sent meanwhile (done at {shorts_done_s:.1f} s) went to replicas 1, 2, 3: {short_routed}")
    failed = [o for o in short_outcomes + long_outcomes if not o.succeeded]
    assert not failed, failed[:3]
    assert sum(short_routed) == 24
    assert all(short_routed[i] >= 4 for i in others)  # both idle replicas were used
