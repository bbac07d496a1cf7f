"""A real Prometheus scraping a real Triton and a real gateway on loopback: the metrics reach it.

Prometheus is the binary `make test` unpacks into .venv/bin (skipped, saying so, where it is absent).
Its config, written to tmp_path, scrapes the session's Triton (conftest ``triton_server``) metrics port
and a gateway of this module every second; the test sends chat requests through the gateway, then asks
Prometheus's HTTP API until the counters it scraped account for them. The deploy config (and any rule
files under deploy/) must pass ``promtool check``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from tests.integration.conftest import (
    REPO_ROOT,
    Gateway,
    RunningTriton,
    die_with_parent,
    metric_sum,
    scrape,
    start_gateway,
    stop_gateway,
    stop_process,
    wait_ready,
)
from tests.prerequisites import require

pytestmark = pytest.mark.integration

TIMEOUT_S = 60.0
SCRAPE_DEADLINE_S = 60.0
MESSAGES: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]


def _find_tool(name: str) -> str | None:
    """`name` in the venv's bin (where `make test` puts it), else on PATH."""
    venv_bins = (REPO_ROOT / ".venv" / "bin", Path(sys.executable).parent)
    path = os.pathsep.join([*(str(d) for d in venv_bins), os.environ.get("PATH", "")])
    return shutil.which(name, path=path)


PROMETHEUS, PROMTOOL = _find_tool("prometheus"), _find_tool("promtool")
NO_PROMETHEUS = "no prometheus/promtool in .venv/bin or on PATH (`make test` unpacks them from Debian's package)"


@pytest.fixture
def prometheus_tools() -> None:
    require(PROMETHEUS is not None and PROMTOOL is not None, NO_PROMETHEUS)


needs_prometheus = pytest.mark.usefixtures("prometheus_tools")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _promtool(*args: str) -> None:
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def query(self, expr: str) -> float:
        """The sum of an instant vector's samples (0 while it has none)."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=5)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{expr}: {response.text}"
        return sum(float(sample["value"][1]) for sample in body["data"]["result"])

    def series(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector's samples as Prometheus returns them (``metric`` labels and ``value``)."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=5)
        assert response.status_code == 200, f"{expr}: {response.text}"
        result: list[dict[str, Any]] = response.json()["data"]["result"]
        return result

    def target_health(self) -> dict[str, str]:
        response = httpx.get(f"{self.url}/api/v1/targets", params={"state": "active"}, timeout=5)
        assert response.status_code == 200, response.text
        return {t["labels"]["job"]: t["health"] for t in response.json()["data"]["activeTargets"]}


def _start_prometheus(config: Path, storage: Path, log: Path, timeout_s: float = TIMEOUT_S) -> Prometheus:
    assert PROMETHEUS is not None
    port = _free_port()
    command = [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={storage}",
               f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   preexec_fn=die_with_parent)  # fmt: skip
    running = Prometheus(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{running.url}/-/ready", timeout=1).status_code == 200:
                return running
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            _stop_prometheus(running)
            raise RuntimeError(f"prometheus not ready after {timeout_s}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def _stop_prometheus(prometheus: Prometheus) -> None:
    # SIGTERM is Prometheus's clean shutdown (it flushes the head block); kill only if it hangs.
    stop_process(prometheus.process, signal.SIGTERM, 20)


@pytest.fixture(scope="module")
def gateway(triton_server: RunningTriton, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    env = {
        "GATEWAY_TRITON_URLS": json.dumps([triton_server.grpc_url]),
        "GATEWAY_REPOSITORY": str(triton_server.repository),
        "GATEWAY_HEALTH_INTERVAL_S": "0.5",
    }
    running = start_gateway(_free_port(), env, tmp_path_factory.mktemp("obs-gateway") / "gateway.log")
    try:
        wait_ready(running, TIMEOUT_S)
        yield running
    finally:
        stop_gateway(running)


@pytest.fixture
def prometheus(triton_server: RunningTriton, gateway: Gateway, tmp_path: Path) -> Iterator[Prometheus]:
    require(PROMETHEUS is not None and PROMTOOL is not None, NO_PROMETHEUS)
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "triton", "static_configs": [{"targets": [urlsplit(triton_server.metrics_url).netloc]}]},
            {"job_name": "gateway", "metrics_path": "/metrics",
             "static_configs": [{"targets": [urlsplit(gateway.url).netloc]}]},
        ],
    }  # fmt: skip
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    _promtool("check", "config", str(config_path))
    running = _start_prometheus(config_path, tmp_path / "tsdb", tmp_path / "prometheus.log")
    try:
        yield running
    finally:
        _stop_prometheus(running)


def _chat(gateway: Gateway, max_tokens: int) -> dict[str, int]:
    body = {"messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0}
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    usage: dict[str, int] = response.json()["usage"]
    return usage


def _chat_streaming(gateway: Gateway, max_tokens: int) -> dict[str, int]:
    body = {"messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    usage: dict[str, int] | None = None
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=TIMEOUT_S) as response:
        assert response.status_code == 200, response.read().decode()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                usage = json.loads(line.removeprefix("data: ")).get("usage") or usage
    assert usage is not None, "the stream sent no usage chunk"
    return usage


@needs_prometheus
def test_prometheus_scrapes_triton_and_gateway(
    prometheus: Prometheus, gateway: Gateway, triton_server: RunningTriton
) -> None:
    model = triton_server.model
    # Triton is shared by the session: compare its counters with what they were before these requests.
    before = scrape(triton_server.metrics_url)

    def baseline(name: str, **labels: str) -> float:
        return metric_sum(before, name, model=model, **labels)

    usages = [_chat(gateway, 12), _chat_streaming(gateway, 16), _chat(gateway, 8)]
    sent = len(usages)
    completion_tokens = sum(u["completion_tokens"] for u in usages)
    prompt_tokens = sum(u["prompt_tokens"] for u in usages)
    assert completion_tokens > 0

    chat_200 = 'gateway_requests_total{route="/v1/chat/completions",status="200"}'
    finished = f'toolkit_requests_total{{model="{model}",finish_reason=~"stop|length"}}'
    # PromQL expression -> the least value it must reach once Prometheus has scraped after the requests.
    expected = {
        'up{job="triton"}': 1.0,
        'up{job="gateway"}': 1.0,
        f'nv_inference_count{{model="{model}"}}': baseline("nv_inference_count") + sent,
        f'nv_inference_exec_count{{model="{model}"}}': baseline("nv_inference_exec_count") + 1,
        f'toolkit_generated_tokens_total{{model="{model}"}}':
            baseline("toolkit_generated_tokens_total") + completion_tokens,
        f'toolkit_prompt_tokens_total{{model="{model}"}}': baseline("toolkit_prompt_tokens_total") + prompt_tokens,
        f'toolkit_time_to_first_token_seconds_count{{model="{model}"}}':
            baseline("toolkit_time_to_first_token_seconds_count") + sent,
        finished: sum(baseline("toolkit_requests_total", finish_reason=r) for r in ("stop", "length")) + sent,
        chat_200: sent,
        "gateway_completion_tokens_total": completion_tokens,
        "gateway_prompt_tokens_total": prompt_tokens,
        "gateway_time_to_first_token_seconds_count": sent,
    }  # fmt: skip
    deadline = time.monotonic() + SCRAPE_DEADLINE_S
    while True:
        values = {expr: prometheus.query(expr) for expr in expected}
        health = prometheus.target_health()
        done = health == {"triton": "up", "gateway": "up"} and all(values[e] >= v for e, v in expected.items())
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert health == {"triton": "up", "gateway": "up"}, f"{health}\n{prometheus.log.read_text()[-3000:]}"
    short = {expr: (values[expr], least) for expr, least in expected.items() if values[expr] < least}
    assert not short, f"after {SCRAPE_DEADLINE_S}s, (scraped, expected at least): {short}"
    # The gateway is this module's alone: its counters are exactly these requests.
    assert values["gateway_completion_tokens_total"] == completion_tokens
    assert values[chat_200] == sent


def _long_stream(gateway: Gateway, errors: list[str]) -> None:
    body = {"messages": MESSAGES, "max_tokens": 960, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=TIMEOUT_S) as response:
        text = response.read().decode()
        if response.status_code != 200 or not text.rstrip().endswith("data: [DONE]"):
            errors.append(f"{response.status_code}: {text[-300:]}")


@needs_prometheus
def test_prometheus_scrapes_the_autoscaling_metrics_as_they_move(
    prometheus: Prometheus, gateway: Gateway, triton_server: RunningTriton
) -> None:
    """The HPA scales on Triton's toolkit_queue_depth and toolkit_active_sequences (deploy/k8s): both reach
    Prometheus, and active sequences rise under concurrent streams and fall back to 0 after them."""
    model = triton_server.model
    streams = 8
    errors: list[str] = []
    deadline = time.monotonic() + SCRAPE_DEADLINE_S
    while not prometheus.series(f'toolkit_active_sequences{{model="{model}"}}'):  # scraped once: the load shows
        assert time.monotonic() < deadline, prometheus.log.read_text()[-3000:]
        time.sleep(0.2)
    threads = [threading.Thread(target=_long_stream, args=(gateway, errors)) for _ in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
    assert not errors, errors
    peak_expr = f'max_over_time(toolkit_active_sequences{{model="{model}"}}[5m])'
    deadline = time.monotonic() + SCRAPE_DEADLINE_S
    while True:
        queue = prometheus.series(f'toolkit_queue_depth{{model="{model}"}}')
        active = prometheus.series(f'toolkit_active_sequences{{model="{model}"}}')
        peak = prometheus.query(peak_expr)
        now = sum(float(s["value"][1]) for s in active)
        if (queue and active and peak >= 1 and now == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    print(f"figures: Prometheus saw toolkit_active_sequences peak at {peak:g} under {streams} streams, then {now:g}; "
          f"toolkit_queue_depth {[s['value'][1] for s in queue]}")
    assert queue and {s["metric"]["job"] for s in queue} == {"triton"}, queue
    assert all(float(s["value"][1]) == 0 for s in queue)  # 32 slots: 8 streams never queue
    assert active and peak >= 1, (active, peak)  # moved under load, as Prometheus recorded it
    assert now == 0, active  # and back to 0 once the streams ended


def _rule_files() -> list[Path]:
    """YAML files under deploy/ shaped as Prometheus rule files (``groups`` of ``rules``)."""
    found = []
    for path in sorted((REPO_ROOT / "deploy").rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            groups = doc.get("groups") if isinstance(doc, dict) else None
            if isinstance(groups, list) and all(isinstance(g, dict) and "rules" in g for g in groups):
                found.append(path)
                break
    return found


@needs_prometheus
def test_deploy_prometheus_config_and_rules_pass_promtool() -> None:
    # `check config` also checks every rule file the config lists; standalone rule files are checked on their own.
    _promtool("check", "config", str(REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"))
    rules = _rule_files()
    if rules:
        _promtool("check", "rules", *map(str, rules))
