"""The scheduler with grammars (the real llguidance over SmolLM2's tokenizer) and log-probabilities.

The model is :class:`FakeRunner` with SmolLM2's vocabulary size, so the token ids are SmolLM2's and
the grammar's masks are real; its logits are arbitrary, so whatever a constrained sequence produces
is what the mask forced.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from transformers import AutoTokenizer

from tests.unit.serving_fakes import FakeRunner, RecordingStream, reference_greedy
from toolkit.repository import contract
from toolkit.runtime.grammar import GrammarCompiler, load_tokenizer
from toolkit.runtime.logprobs import log_softmax
from toolkit.runtime.model_metrics import NullMetrics
from toolkit.runtime.requests import GenerationRequest, RequestError, SamplingParams
from toolkit.runtime.scheduler import Scheduler

TOKENIZER = Path(__file__).resolve().parents[1] / "fixtures" / "smollm2_tokenizer"
VOCAB, EOS = 49152, 2
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "size": {"enum": ["small", "large"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "size", "n"], "additionalProperties": False}
SPEC = json.dumps({"type": "json_schema", "schema": SCHEMA}).encode()
PROMPTS = [[3, 7, 9], [5, 6], [1, 2, 3, 4, 5, 6, 7, 8]]


@pytest.fixture(scope="module")
def hf() -> Any:
    return AutoTokenizer.from_pretrained(str(TOKENIZER))


@pytest.fixture(scope="module")
def runner() -> FakeRunner:
    return FakeRunner(vocab_size=VOCAB, seed=3)


def _compiler(timeout_s: float = 10.0) -> GrammarCompiler:
    return GrammarCompiler(load_tokenizer((TOKENIZER / "tokenizer.json").read_text(), VOCAB, [EOS]),
                           timeout_s=timeout_s)


def _request(prompt: list[int], max_tokens: int = 60, **extra: Any) -> GenerationRequest:
    return GenerationRequest(prompt, max_tokens, SamplingParams(), frozenset({EOS}), **extra)


def _drain(scheduler: Scheduler, streams: list[RecordingStream], max_steps: int = 400) -> None:
    for _ in range(max_steps):
        if all(s.done for s in streams):
            return
        scheduler.step()
        if scheduler._compiling:
            threading.Event().wait(0.01)  # a compile is running in its worker thread
    raise AssertionError("streams did not finish")


class MaskMetrics(NullMetrics):
    def __init__(self) -> None:
        self.masks: list[tuple[int, float]] = []

    def grammar_masks(self, rows: int, seconds: float) -> None:
        self.masks.append((rows, seconds))


def test_a_constrained_row_follows_its_schema_and_the_others_are_untouched(runner: FakeRunner, hf: Any) -> None:
    metrics = MaskMetrics()
    scheduler = Scheduler(runner, grammar=_compiler(), metrics=metrics)
    free = [RecordingStream() for _ in PROMPTS]
    constrained = RecordingStream()
    for prompt, stream in zip(PROMPTS, free, strict=True):
        scheduler.submit(_request(prompt, max_tokens=20), stream)
    scheduler.submit(_request(PROMPTS[0], grammar=SPEC), constrained)
    _drain(scheduler, [*free, constrained])
    for prompt, stream in zip(PROMPTS, free, strict=True):
        assert stream.tokens == reference_greedy(runner, prompt, 20, {EOS})
    reply = json.loads(hf.decode(constrained.tokens))
    jsonschema.validate(reply, SCHEMA)
    assert constrained.finish is not None and constrained.finish[0] == contract.FINISH_STOP
    # One mask per sampled token; the reply ends on the grammar's last token ("}"), with no stop token.
    assert scheduler.stats.masked_rows == len(constrained.tokens)
    assert [rows for rows, _ in metrics.masks] == [1] * len(constrained.tokens)  # one masked row a step
    assert sum(s for _, s in metrics.masks) == pytest.approx(scheduler.stats.mask_seconds)


def test_compiling_never_blocks_the_other_sequences(runner: FakeRunner) -> None:
    gate = threading.Event()

    class SlowCompiler(GrammarCompiler):
        def _compile(self, spec: bytes) -> Any:
            gate.wait(10)
            return super()._compile(spec)

    scheduler = Scheduler(runner, grammar=SlowCompiler(_compiler().tokenizer))
    free, constrained = RecordingStream(), RecordingStream()
    scheduler.submit(_request(PROMPTS[1], grammar=SPEC), constrained)
    scheduler.submit(_request(PROMPTS[0], max_tokens=8), free)
    for _ in range(12):
        scheduler.step()
    assert free.finish is not None and len(free.tokens) > 0  # decoded to the end while the compile waited
    assert not constrained.tokens and not constrained.done and scheduler.queue_depth == 1
    gate.set()
    _drain(scheduler, [constrained])
    assert constrained.finish is not None and constrained.finish[0] == "stop"


def test_a_compile_over_its_limit_fails_that_request_only(runner: FakeRunner) -> None:
    gate = threading.Event()

    class StuckCompiler(GrammarCompiler):
        def _compile(self, spec: bytes) -> Any:
            gate.wait(5)
            return super()._compile(spec)

    scheduler = Scheduler(runner, grammar=StuckCompiler(_compiler().tokenizer, timeout_s=0.05))
    stuck, free = RecordingStream(), RecordingStream()
    scheduler.submit(_request(PROMPTS[0], grammar=SPEC), stuck)
    scheduler.submit(_request(PROMPTS[1], max_tokens=4), free)
    _drain(scheduler, [stuck, free])
    gate.set()
    assert stuck.error is not None and stuck.error.startswith(contract.INVALID_REQUEST_PREFIX)
    assert "did not compile within 0.05 s" in stuck.error
    assert free.finish is not None


def test_a_bad_grammar_is_an_invalid_request(runner: FakeRunner) -> None:
    gate = threading.Event()

    class GatedCompiler(GrammarCompiler):
        def _compile(self, spec: bytes) -> Any:
            gate.wait(10)
            return super()._compile(spec)

    bad = json.dumps({"type": "json_schema", "schema": {"not": {"type": "string"}}}).encode()
    scheduler = Scheduler(runner, grammar=GatedCompiler(_compiler().tokenizer))
    stream = RecordingStream()
    scheduler.submit(_request(PROMPTS[0], grammar=bad), stream)  # compiling in the background: the error comes later
    gate.set()
    _drain(scheduler, [stream])
    assert stream.error is not None and stream.error.startswith(contract.INVALID_REQUEST_PREFIX + "grammar: ")
    assert "not" in stream.error
    with pytest.raises(RequestError, match="grammar: .*not"):  # now cached: refused at once
        scheduler.submit(_request(PROMPTS[0], grammar=bad), RecordingStream())
    with pytest.raises(RequestError, match="serves no grammars"):
        Scheduler(runner).submit(_request(PROMPTS[0], grammar=SPEC), RecordingStream())


def test_logprobs_are_the_log_softmax_of_the_sampled_rows(runner: FakeRunner) -> None:
    scheduler = Scheduler(runner)
    stream = RecordingStream()
    scheduler.submit(_request(PROMPTS[2], max_tokens=6, logprobs=3, prompt_logprobs=2), stream)
    _drain(scheduler, [stream])
    # The reference: the fake model's own full forward over prompt + reply.
    ids = PROMPTS[2] + stream.tokens
    logits, _ = runner.forward(np.asarray([ids]), np.ones((1, len(ids)), np.int64), np.arange(len(ids))[None],
                               runner.empty_past(1))
    expected = log_softmax(logits[0])
    generated = np.concatenate([lp.token for lp in stream.logprobs])
    start = len(PROMPTS[2]) - 1
    want = expected[np.arange(start, start + len(stream.tokens)), stream.tokens]
    np.testing.assert_allclose(generated, want, atol=1e-4)
    for step, lp in enumerate(stream.logprobs):  # greedy: the token is the top alternative
        row = expected[start + step]
        assert lp.top_ids.shape == (1, 3) and lp.top_ids[0, 0] == stream.tokens[step]
        np.testing.assert_allclose(lp.top[0], np.sort(row)[::-1][:3], atol=1e-4)
    prompt = stream.prompt_logprobs
    assert prompt is not None and np.isnan(prompt.token[0]) and prompt.top_ids.shape == (len(PROMPTS[2]), 2)
    np.testing.assert_allclose(prompt.token[1:], expected[np.arange(start), PROMPTS[2][1:]], atol=1e-4)


def test_the_stop_token_comes_with_its_logprob_when_asked(runner: FakeRunner) -> None:
    free = reference_greedy(runner, PROMPTS[2], 12, set())
    at = next(i for i in range(1, len(free)) if free[i] not in free[:i])  # a token that first comes later
    stop = free[at]
    plain, scored = RecordingStream(), RecordingStream()
    scheduler = Scheduler(runner)
    scheduler.submit(GenerationRequest(PROMPTS[2], 12, SamplingParams(), frozenset({stop})), plain)
    scheduler.submit(GenerationRequest(PROMPTS[2], 12, SamplingParams(), frozenset({stop}), logprobs=0), scored)
    _drain(scheduler, [plain, scored])
    assert plain.tokens == free[:at] and scored.tokens == free[:at + 1]  # the stop token, sent with its logprob
    assert plain.finish == scored.finish == ("stop", len(PROMPTS[2]), at)  # and not counted
    assert [len(lp) for lp in scored.logprobs] == [1] * (at + 1)


def test_prompt_logprobs_arrive_even_when_the_first_token_stops(runner: FakeRunner) -> None:
    first = reference_greedy(runner, PROMPTS[1], 1, set())[0]
    stream = RecordingStream()
    scheduler = Scheduler(runner)
    scheduler.submit(GenerationRequest(PROMPTS[1], 4, SamplingParams(), frozenset({first}), prompt_logprobs=0),
                     stream)
    _drain(scheduler, [stream])
    assert stream.tokens == [] and stream.prompt_logprobs is not None and len(stream.prompt_logprobs) == 2
