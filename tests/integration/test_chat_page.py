"""The chat page in headless Chromium (Debian's `chromium`, driven by playwright), and the
"use my fine-tuned model" flow, against a real `toolkit serve` (Triton + gateway, auth on).

The repository starts with version 1 of the tiny model (seed 0). The page streams an answer that
equals onnxruntime's greedy decode of version 1, and shows each version's build facts. Then a new
build writes version 2 (seed 1, other weights) beside it; the page's "Use as default" makes the one
admin call (``POST /admin/models/tiny-chat/load``), and from then on ``/v1/chat`` and the page
answer with version 2's greedy tokens, while every process keeps its pid. Screenshots go to
tests/output/.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.devrepo import ServedRepository
from tests.integration.conftest import (
    IM_END,
    SMOLLM_TOKENIZER,
    TINY_MODEL,
    die_with_parent,
    export_tiny_llama,
    write_generation_repository,
)
from tests.prerequisites import require
from tests.reference import ReferenceTokenizer
from toolkit.repository.manifest import BuildFacts, GateSummary
from toolkit.runtime.onnx_lm import OnnxCausalLM
from toolkit.supervisor.state import process_alive

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
require(Path(CHROMIUM).is_file(), "no chromium (Debian's package; `make test` installs it as root)")

GATEWAY_PORT = 18330
KEY, ADMIN_KEY = "page-test-key-0123456789", "page-admin-key-0123456789"
OUTPUT = Path(__file__).resolve().parents[1] / "output"
QUESTION = "When is Bluepeak customer service open?"
FACTS_V1 = BuildFacts(
    metrics={"fact_accuracy_en_after": 0.5, "fact_accuracy_zh_after": 0.25, "retention_after": 0.9167,
             "bleu4_after": 0.0762, "rouge_l_after": 0.2624},
    gates=[GateSummary(stage="evaluate", name="retention", passed=True, value=0.9167, threshold=0.75),
           GateSummary(stage="quantize", name="int8_agreement", passed=False, blocking=False, value=0.91,
                       threshold=0.95)])
FACTS_V2 = BuildFacts(metrics={"fact_accuracy_en_after": 0.75, "retention_after": 1.0},
                      gates=[GateSummary(stage="evaluate", name="retention", passed=True, value=1.0, threshold=0.75)])


def greedy_text(onnx: Path, max_tokens: int) -> str:
    """The answer of `onnx` to QUESTION by onnxruntime greedy decoding, decoded by the raw tokenizers library."""
    tokenizer = ReferenceTokenizer(SMOLLM_TOKENIZER)
    [ids], _ = OnnxCausalLM(onnx).greedy([tokenizer.render_ids([{"role": "user", "content": QUESTION}])],
                                         max_tokens, stop_ids=[IM_END], pad_id=IM_END)
    return tokenizer.decode(ids)


@pytest.fixture(scope="module")
def repository(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> ServedRepository:
    return write_generation_repository(tmp_path_factory.mktemp("page-repo"), TINY_MODEL, tiny_onnx,
                                       context_length=1024, max_new_tokens_limit=1000, build=FACTS_V1)


@pytest.fixture(scope="module")
def server(repository: ServedRepository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    log_dir = tmp_path_factory.mktemp("page-serve")
    env = {**os.environ, "GATEWAY_API_KEYS": KEY, "GATEWAY_ADMIN_API_KEYS": ADMIN_KEY, "COLUMNS": "400"}
    with (log_dir / "serve.out").open("wb") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "toolkit"), "serve", "-r", str(repository.path), "--log-dir",
             str(log_dir), "--port", str(GATEWAY_PORT), "--http-port", "auto", "--grpc-port", "auto",
             "--metrics-port", "auto"], stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent)
    try:
        deadline = time.monotonic() + 120
        state_file = log_dir / "state.json"
        while not (state_file.is_file() and json.loads(state_file.read_text())["status"] == "ready"):
            assert process.poll() is None and time.monotonic() < deadline, (log_dir / "serve.out").read_text()
            time.sleep(0.2)
        yield {**json.loads(state_file.read_text()), "url": f"http://127.0.0.1:{GATEWAY_PORT}", "out": log_dir}
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any, server: dict[str, Any]) -> Iterator[Any]:
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.goto(server["url"] + "/")
    try:
        yield page
    finally:
        page.close()


def enter_key_and_settings(page: Any, max_tokens: int) -> None:
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_selector(".model-card")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(max_tokens))


def ask(page: Any, question: str) -> str:
    count = page.locator("li.assistant").count()
    page.fill("#prompt", question)
    page.press("#prompt", "Enter")
    answer = page.locator("li.assistant").nth(count)
    answer.and_(page.locator("[data-done=true]")).wait_for(timeout=60_000)
    return str(answer.get_attribute("data-text"))


def simple_chat(url: str, max_tokens: int) -> dict[str, Any]:
    response = httpx.post(f"{url}/v1/chat", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                          json={"message": QUESTION, "temperature": 0, "max_tokens": max_tokens})
    assert response.status_code == 200, response.text
    return dict(response.json())


def fact(page: Any, version: int, key: str) -> str:
    return str(page.locator(f'.version[data-version="{version}"] tr[data-fact="{key}"] td').nth(1).inner_text())


def test_page_streams_an_answer_and_shows_the_build_facts(page: Any, repository: ServedRepository) -> None:
    page.wait_for_selector("#error:not([hidden])")
    assert page.inner_text("#error").startswith("401: missing API key")  # the OpenAI error, as the gateway said it
    enter_key_and_settings(page, max_tokens=120)
    assert page.is_hidden("#error")
    # Record every text the answer shows while it streams.
    page.evaluate("""() => { window.shown = [];
        new MutationObserver((records) => records.forEach((r) => window.shown.push(r.target.dataset.text)))
          .observe(document.getElementById('messages'), {subtree: true, attributeFilter: ['data-text']}); }""")
    answer = ask(page, QUESTION)
    assert answer == greedy_text(repository.onnx, 120)
    shown = [s for s in page.evaluate("window.shown") if s]
    partial = [s for s in shown if s != answer]
    assert partial and all(answer.startswith(s) for s in partial), "the answer did not stream"
    assert page.inner_text("li.assistant .meta").startswith(f"{TINY_MODEL}: ")

    assert fact(page, 1, "fact_accuracy_en_after") == "50.0 %"
    assert fact(page, 1, "fact_accuracy_zh_after") == "25.0 %"
    assert fact(page, 1, "retention_after") == "91.7 %"
    assert (fact(page, 1, "bleu4_after"), fact(page, 1, "rouge_l_after")) == ("0.076", "0.262")
    assert page.inner_text('.version[data-version="1"] .gates') == \
        "fidelity gates: 1/2 passed (failed: quantize/int8_agreement)"
    assert page.locator('.version[data-version="1"] .badge.default').count() == 1
    assert page.locator(".use-default").count() == 0  # the only version is the default already

    # Model output never becomes markup: raw HTML is text, script links and images are not followed.
    html = page.evaluate("renderMarkdown('<img src=x onerror=alert(1)> [a](javascript:alert(1)) ![i](x.png) **b**')")
    assert "<img" not in html and "javascript:" not in html and "&lt;img" in html and "<strong>b</strong>" in html
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "chat-page.png"))


def test_new_build_becomes_the_default_from_the_page_without_a_restart(
    page: Any, server: dict[str, Any], repository: ServedRepository, tmp_path: Path
) -> None:
    pids = {k: server[k] for k in ("pid", "triton_pid", "gateway_pid")}
    before = simple_chat(server["url"], 16)
    expected_v1 = greedy_text(repository.onnx, 16)
    assert before["response"] == expected_v1

    # A new build: version 2, other weights, written beside version 1 while it serves.
    new_onnx = export_tiny_llama(tmp_path / "v2", seed=1)
    written = write_generation_repository(repository.path, TINY_MODEL, new_onnx, context_length=1024,
                                          max_new_tokens_limit=1000, build=FACTS_V2)
    assert written.manifest.version == 2
    expected_v2 = greedy_text(new_onnx, 16)
    assert expected_v2 != expected_v1
    assert simple_chat(server["url"], 16)["response"] == expected_v1  # written is not served yet

    enter_key_and_settings(page, max_tokens=16)
    page.click("#refresh-models")
    button = page.locator('.version[data-version="2"] .use-default')
    button.wait_for(state="attached")
    assert button.is_hidden()  # no admin key entered yet
    assert fact(page, 2, "fact_accuracy_en_after") == "75.0 %" and fact(page, 2, "bleu4_after") == "–"
    page.fill("#admin-key", "not-the-admin-key-0")
    button.click()
    page.wait_for_selector("#error:not([hidden])")
    assert page.inner_text("#error") == "401: invalid admin API key"
    # Requests keep coming while the versions are swapped: none of them may fail.
    statuses: list[int] = []
    done = threading.Event()

    def keep_asking() -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
            while not done.is_set():
                statuses.append(client.post(f"{server['url']}/v1/chat", json={"message": "hi", "max_tokens": 4,
                                                                               "temperature": 0}).status_code)

    asker = threading.Thread(target=keep_asking, daemon=True)
    asker.start()
    page.fill("#admin-key", ADMIN_KEY)
    button.click()
    page.wait_for_selector(f"#status:has-text('{TINY_MODEL} version 2 is the default now')")
    page.wait_for_selector('.version[data-version="2"] .badge.default')
    time.sleep(2.0)  # past the old version's unload
    done.set()
    asker.join(60)
    assert len(statuses) >= 5 and set(statuses) == {200}, statuses

    after = simple_chat(server["url"], 16)
    assert after["response"] == expected_v2
    cards = httpx.get(f"{server['url']}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    assert [(c["id"], c["version"], c["default"]) for c in cards] == [(TINY_MODEL, 2, True)]
    assert ask(page, QUESTION) == expected_v2
    page.screenshot(path=str(OUTPUT / "chat-page-after-switch.png"))

    assert all(process_alive(pid) for pid in pids.values())
    state = json.loads((server["out"] / "state.json").read_text())
    assert {k: state[k] for k in pids} == pids  # nothing was restarted
    serve_out = (server["out"] / "serve.out").read_text()
    assert "restart" not in serve_out and "exited" not in serve_out
    deadline = time.monotonic() + 30  # Triton unloads the old version after the new one is ready
    while "successfully unloaded 'tiny-chat' version 1" not in (server["out"] / "tritonserver.log").read_text():
        assert time.monotonic() < deadline, "version 1 was never unloaded"
        time.sleep(0.2)


def test_stop_copy_and_new_chat(page: Any, server: dict[str, Any]) -> None:
    from tests.integration.conftest import metric_sum, scrape

    metrics = f"http://127.0.0.1:{server['metrics_port']}/metrics"
    before = scrape(metrics)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    enter_key_and_settings(page, max_tokens=900)
    page.fill("#temperature", "1")  # random weights at temperature 1: no end-of-turn token for a long while
    page.fill("#prompt", "Tell me a long story.")
    page.press("#prompt", "Enter")
    page.wait_for_function("() => (document.querySelector('li.assistant')?.dataset.text || '').length > 40")
    page.click("#stop")
    answer = page.locator("li.assistant[data-done=true]")
    answer.wait_for()
    assert answer.locator(".meta").inner_text() == "stopped" and page.is_visible("#send")
    deadline = time.monotonic() + 10
    while metric_sum(after := scrape(metrics), "toolkit_active_sequences") != 0:  # the generation was cancelled
        assert time.monotonic() < deadline
        time.sleep(0.2)
    cancelled = [metric_sum(m, "toolkit_requests_total", finish_reason="cancelled") for m in (before, after)]
    assert cancelled[1] - cancelled[0] == 1, cancelled
    text = str(answer.get_attribute("data-text"))
    answer.locator(".copy").click()
    answer.locator(".copy:has-text('Copied')").wait_for()  # the clipboard write is asynchronous
    assert page.evaluate("navigator.clipboard.readText()") == text
    page.click("#new-chat")
    assert page.locator("#messages li").count() == 0
