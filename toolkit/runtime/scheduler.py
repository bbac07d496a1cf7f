"""Continuous (in-flight) batching: one background thread decodes every active sequence together.

Between decode steps the scheduler drops cancelled sequences, admits queued requests into free
slots (one batched, left-padded prefill that also yields their first token), then runs ONE batched
forward over every active sequence with its KV cache (:class:`BatchKV`), samples each row with its
own sampler, streams the new tokens through each request's :class:`Stream`, and retires the rows
that finished. Plain Python: the Triton adapter supplies the runner, the streams and the metrics.

A request with a grammar waits, outside the queue, while a worker thread compiles it (others keep
decoding); its sequence then carries its own matcher, every step masks its logits row with the
matcher's bitmask before sampling (the masks of all constrained rows are computed together, in
parallel, by llguidance), and the sequence ends when the grammar is complete. Log-probabilities are
computed from the masked row the token was drawn from (:mod:`toolkit.runtime.logprobs`); a request
for prompt log-probabilities is prefilled alone, with logits for every prompt position.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from toolkit.repository import contract
from toolkit.repository.spec import DEFAULT_LIMITS
from toolkit.runtime.grammar import GrammarCompiler, GrammarError, SequenceGrammar, apply_bitmask, fill_masks
from toolkit.runtime.kvcache import BatchKV, left_pad
from toolkit.runtime.logprobs import Logprobs, logprobs_of, prompt_logprobs
from toolkit.runtime.model_metrics import NullMetrics
from toolkit.runtime.requests import GenerationRequest, QueueFullError, RequestError
from toolkit.runtime.runners import Runner
from toolkit.runtime.sampling import Sampler, StopState, make_sampler

log = logging.getLogger(__name__)


class Stream(Protocol):
    """Where one request's output goes. Exceptions raised here cancel that request only."""

    def on_tokens(
        self, ids: list[int], logprobs: Logprobs | None = None, prompt_logprobs: Logprobs | None = None
    ) -> None: ...
    def on_finish(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None: ...
    def on_error(self, message: str) -> None: ...
    def is_cancelled(self) -> bool: ...


@dataclass
class _Sequence:
    request: GenerationRequest
    stream: Stream
    sampler: Sampler
    stop: StopState
    enqueued_at: float
    last_token: int = 0
    last_emit_at: float = 0.0
    cancelled: bool = False
    grammar: SequenceGrammar | None = None
    compiling: Future[Any] | None = None  # the grammar's compile, while the request waits for it
    error: str | None = None  # set when the sequence must end with an error response
    prompt_logprobs: Logprobs | None = None  # sent with the first token


@dataclass
class SchedulerStats:
    steps: int = 0  # batched decode forwards
    prefills: int = 0
    max_batch_size: int = 0
    mask_seconds: float = 0.0  # computing and applying grammar masks, all steps
    masked_rows: int = 0
    finished: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))


class Scheduler:
    """Owns the active sequences and the decode loop; ``submit`` is thread-safe."""

    def __init__(
        self,
        runner: Runner,
        *,
        max_active: int = DEFAULT_LIMITS.max_active_sequences,
        max_queue: int = DEFAULT_LIMITS.max_queue,
        max_prefill_tokens: int = 1024,
        pad_id: int = 0,
        metrics: NullMetrics | None = None,
        cancel_poll_every: int = 4,
        itl_samples_per_step: int = 8,
        grammar: GrammarCompiler | None = None,
    ):
        self.runner = runner
        self.max_active = max_active
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.pad_id = pad_id
        self.metrics = metrics or NullMetrics()
        # Inside Triton every is_cancelled() and metric update is a round trip to the server process; at
        # batch 32 they cost as much as a third of a step on a busy CPU. So each sequence is polled for
        # cancellation every `cancel_poll_every` steps (staggered), and inter-token latency is observed
        # for at most `itl_samples_per_step` sequences a step (rotating; the sequences of one step see the
        # same latency, so the histogram's shape holds, its count is a sample).
        self.cancel_poll_every = max(1, cancel_poll_every)
        self.itl_samples_per_step = max(1, itl_samples_per_step)
        self.stats = SchedulerStats()
        self.grammar = grammar
        self._queue: collections.deque[_Sequence] = collections.deque()
        self._compiling: list[_Sequence] = []  # waiting for their grammar; not in the queue yet
        self._active: list[_Sequence] = []
        self._admitting = 0  # taken from the queue by the step in progress, not yet active
        self._kv = BatchKV(spare_columns=getattr(runner, "kv_spare_columns", 0))
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- public API --------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, stream: Stream) -> None:
        """Queue a validated request; raises QueueFullError when ``max_queue`` requests already wait.

        Queued requests that free slots will take at the next step are not waiting: a burst of
        ``max_active + max_queue`` arrivals at an idle scheduler is accepted whole.
        """
        sampler, stop = make_sampler(request)
        seq = _Sequence(request, stream, sampler, stop, enqueued_at=time.perf_counter())
        if request.grammar is not None:
            if self.grammar is None:
                raise RequestError("this model serves no grammars (its version has no tokenizer/tokenizer.json)")
            seq.compiling = self.grammar.compile(request.grammar)
            if seq.compiling.done():
                self._take_grammar(seq)  # cached: a bad spec is refused right here
        with self._cond:
            if self._stopping:
                raise QueueFullError(
                    f"{contract.SHUTTING_DOWN_PREFIX}the model is unloading; retry on another instance"
                )
            free_slots = max(0, self.max_active - len(self._active) - self._admitting)
            waiting = len(self._queue) + len(self._compiling)
            if waiting - free_slots >= self.max_queue:
                self.metrics.finished("rejected")
                raise QueueFullError(
                    f"{contract.SERVER_BUSY_PREFIX}{waiting - free_slots} requests already queued "
                    f"(max_queue={self.max_queue}); retry later"
                )
            if seq.compiling is not None:
                self._compiling.append(seq)
                seq.compiling.add_done_callback(lambda _: self._wake())
            else:
                self._queue.append(seq)
            self.metrics.queue_depth(len(self._queue))
            self._cond.notify()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _take_grammar(self, seq: _Sequence) -> None:
        """Give a sequence its own matcher from its finished compile; RequestError if the grammar failed."""
        assert seq.compiling is not None and self.grammar is not None
        future, seq.compiling = seq.compiling, None
        try:
            seq.grammar = SequenceGrammar(future.result().deep_copy())
        except GrammarError as err:
            raise RequestError(f"grammar: {err}") from None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="generation-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the loop; every queued or active request gets an error, so no stream is left open."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self.grammar is not None:
            self.grammar.shutdown()
        with self._cond:
            pending = list(self._queue) + list(self._active) + list(self._compiling)
            self._queue.clear()
            self._compiling = []
            self._active = []
            self._kv.clear()
        for seq in pending:
            self._fail(seq, "the model is shutting down")

    @property
    def active_count(self) -> int:
        return len(self._active)

    @property
    def queue_depth(self) -> int:
        return len(self._queue) + len(self._compiling)

    def idle(self) -> bool:
        return not self._active and not self._queue and not self._compiling

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._queue and not self._active:
                    # A compile's done-callback wakes the loop; the timeout checks compile deadlines.
                    self._cond.wait(timeout=0.25 if self._compiling else 1.0)
                    if self._compiling:
                        break
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as err:  # never let the loop die with streams open
                log.exception("generation step failed")
                with self._cond:
                    failed, self._active = self._active, []
                    self._kv.clear()
                for seq in failed:
                    self._fail(seq, f"generation failed: {type(err).__name__}: {err}")

    def step(self) -> None:
        """One scheduling iteration: cancel, admit and prefill, one batched decode forward, retire."""
        if self._compiling:
            self._collect_compiled()
        self._drop_cancelled()
        admitted = self._admit()
        if admitted:
            try:
                self._prefill(admitted)
            finally:
                with self._cond:
                    self._admitting = 0
        if self._active:
            self._decode()
        self.metrics.active_sequences(len(self._active))
        self.metrics.kv_cache_bytes(self._kv.nbytes())

    def _collect_compiled(self) -> None:
        """Queue the requests whose grammar compiled; fail those whose compile failed or is over its limit."""
        assert self.grammar is not None
        now = time.perf_counter()
        with self._cond:
            waiting, self._compiling = self._compiling, []
        failed: list[tuple[_Sequence, str]] = []
        still: list[_Sequence] = []
        ready: list[_Sequence] = []
        for seq in waiting:
            assert seq.compiling is not None
            if seq.compiling.done():
                try:
                    self._take_grammar(seq)
                    ready.append(seq)
                except RequestError as err:
                    failed.append((seq, f"{contract.INVALID_REQUEST_PREFIX}{err}"))
            elif now - seq.enqueued_at > self.grammar.timeout_s:
                failed.append((seq, f"{contract.INVALID_REQUEST_PREFIX}grammar: the grammar did not compile within "
                                    f"{self.grammar.timeout_s:g} s (grammar_compile_timeout_s): simplify the schema"))
            elif self._poll_cancelled(seq):
                self._finish(seq, contract.FINISH_CANCELLED)
            else:
                still.append(seq)
        with self._cond:
            self._compiling = still + self._compiling
            self._queue.extend(ready)
        for seq, message in failed:
            self._fail(seq, message)

    def _drop_cancelled(self) -> None:
        keep = []
        phase = self.stats.steps % self.cancel_poll_every
        for row, seq in enumerate(self._active):
            due = (row + phase) % self.cancel_poll_every == 0
            if seq.cancelled or (due and self._poll_cancelled(seq)):
                self._finish(seq, contract.FINISH_CANCELLED)
            else:
                keep.append(row)
        if len(keep) != len(self._active):
            self._active = [self._active[r] for r in keep]
            self._kv.keep(keep)

    def _admit(self) -> list[_Sequence]:
        admitted: list[_Sequence] = []
        budget = self.max_prefill_tokens
        with self._cond:
            while self._queue and len(self._active) + len(admitted) < self.max_active:
                seq = self._queue[0]
                if self._poll_cancelled(seq):
                    self._queue.popleft()
                    self._finish(seq, contract.FINISH_CANCELLED)
                    continue
                # Bound the prompt tokens prefilled per step, so running sequences keep streaming while a
                # burst of arrivals is admitted over a few steps; one request always fits.
                length = len(seq.request.prompt_ids)
                if admitted and length > budget:
                    break
                budget -= length
                admitted.append(self._queue.popleft())
            self._admitting = len(admitted)
            self.metrics.queue_depth(len(self._queue))
        return admitted

    def _prefill(self, admitted: list[_Sequence]) -> None:
        """Prefill in left-padded chunks of similar lengths, so padding costs little compute.

        A request for prompt log-probabilities is prefilled alone, with the logits of every position.
        """
        for seq in [s for s in admitted if s.request.prompt_logprobs is not None]:
            self._prefill_chunk([seq], all_logits=True)
        admitted = [s for s in admitted if s.request.prompt_logprobs is None]
        ordered = sorted(admitted, key=lambda s: len(s.request.prompt_ids))
        chunk: list[_Sequence] = []
        for seq in ordered:
            longest = len(seq.request.prompt_ids)  # ascending, so the newcomer is the longest
            if chunk and longest * (len(chunk) + 1) > max(self.max_prefill_tokens, longest):
                self._prefill_chunk(chunk)
                chunk = []
            chunk.append(seq)
        if chunk:
            self._prefill_chunk(chunk)

    def _prefill_chunk(self, admitted: list[_Sequence], all_logits: bool = False) -> None:
        prompts = [s.request.prompt_ids for s in admitted]
        ids, mask, positions = left_pad(prompts, self.pad_id)
        try:
            past = self.runner.empty_past(len(admitted))
            if all_logits:
                logits, present = self.runner.forward(ids, mask, positions, past, all_logits=True)
                for row, seq in enumerate(admitted):
                    count = seq.request.prompt_logprobs
                    assert count is not None
                    seq.prompt_logprobs = prompt_logprobs(logits[row], seq.request.prompt_ids, count)
            else:
                logits, present = self.runner.forward(ids, mask, positions, past)
        except Exception as err:
            log.exception("prefill failed")
            for seq in admitted:
                self._fail(seq, f"prefill failed: {type(err).__name__}: {err}")
            return
        self.stats.prefills += 1
        self.metrics.prompt_tokens(sum(len(p) for p in prompts))
        joined = []
        streamed = 0
        last = logits[:, -1]
        self._mask(admitted, last)
        for row, seq in enumerate(admitted):
            streamed += self._emit(seq, last[row])
            if not self._retire(seq):
                joined.append(row)
        self.metrics.generated_tokens(streamed)
        if joined:
            index = np.asarray(joined)
            rows_past = present if len(joined) == len(admitted) else [p[index] for p in present]
            self._kv.add(rows_past, mask[index])
            self._active.extend(admitted[r] for r in joined)

    def _decode(self) -> None:
        tokens = np.asarray([s.last_token for s in self._active], dtype=np.int64)
        ids, mask, positions = self._kv.step_inputs(tokens)
        logits, present = self.runner.forward(ids, mask, positions, self._kv.past)
        self._kv.advance(present)
        batch = len(self._active)
        self.stats.steps += 1
        self.stats.max_batch_size = max(self.stats.max_batch_size, batch)
        self.metrics.batch_size(batch)
        keep = []
        streamed = 0
        stride = -(-batch // self.itl_samples_per_step)  # rotate which rows report inter-token latency
        last = logits[:, -1]
        self._mask(self._active, last)
        for row, seq in enumerate(self._active):
            streamed += self._emit(seq, last[row], observe_itl=(row + self.stats.steps) % stride == 0)
            if not self._retire(seq):
                keep.append(row)
        self.metrics.generated_tokens(streamed)
        if len(keep) != batch:
            self._active = [self._active[r] for r in keep]
            self._kv.keep(keep)

    # -- per-sequence helpers ------------------------------------------------------------------
    def _mask(self, seqs: list[_Sequence], last: np.ndarray) -> None:
        """Mask each constrained row of `last` ([rows, vocab] logits) with its grammar's allowed tokens."""
        rows = [(seq.grammar, row) for row, seq in enumerate(seqs) if seq.grammar is not None]
        if not rows:
            return
        assert self.grammar is not None
        start = time.perf_counter()
        masks = np.zeros((len(seqs), (self.grammar.vocab_size + 31) // 32), dtype=np.int32)
        fill_masks(self.grammar.executor, rows, masks)
        for _, row in rows:
            apply_bitmask(last[row], masks[row])
        elapsed = time.perf_counter() - start
        self.stats.mask_seconds += elapsed
        self.stats.masked_rows += len(rows)
        self.metrics.grammar_masks(len(rows), elapsed)

    def _retire(self, seq: _Sequence) -> bool:
        """End a sequence that is done, cancelled or failed (True); False keeps it decoding."""
        if seq.error is not None:
            self._fail(seq, seq.error)
        elif seq.stop.done or seq.cancelled:
            self._finish(seq, seq.stop.finish_reason or contract.FINISH_CANCELLED)
        else:
            return False
        return True

    def _emit(self, seq: _Sequence, logits: np.ndarray, observe_itl: bool = True) -> int:
        """Sample, account and stream one token; returns how many tokens were streamed (0 or 1).

        A stop token is not streamed, except when the request wants log-probabilities: then it comes
        with its own (OpenAI's and vLLM's completions list it), uncounted, and the final response follows.
        """
        token = seq.sampler.sample(logits)
        seq.sampler.observe(token)
        seq.last_token = token
        if seq.grammar is not None and token not in seq.stop.stop_token_ids and not seq.grammar.accept(token):
            seq.error = f"the grammar refused token {token} it had allowed: {seq.grammar.error}"
            return 0
        logprobs = None
        if seq.request.logprobs is not None:
            logprobs = logprobs_of(logits[None], [token], seq.request.logprobs)
        if not seq.stop.accept(token):
            if logprobs is not None:
                self._send(seq, [token], logprobs)
            return 0
        if seq.grammar is not None and seq.grammar.complete and not seq.stop.done:
            seq.stop.finish_reason = contract.FINISH_STOP  # nothing may follow: the reply is complete
        now = time.perf_counter()
        if seq.stop.generated == 1:
            self.metrics.time_to_first_token(now - seq.enqueued_at)
        elif observe_itl:
            self.metrics.inter_token_latency(now - seq.last_emit_at)
        seq.last_emit_at = now
        self._send(seq, [token], logprobs)
        return 1

    def _send(self, seq: _Sequence, tokens: list[int], logprobs: Logprobs | None) -> None:
        prompt, seq.prompt_logprobs = seq.prompt_logprobs, None
        try:
            seq.stream.on_tokens(tokens, logprobs, prompt)
        except Exception:
            log.warning("stream rejected a token; cancelling its request", exc_info=True)
            seq.cancelled = True

    def _poll_cancelled(self, seq: _Sequence) -> bool:
        try:
            seq.cancelled = seq.cancelled or bool(seq.stream.is_cancelled())
        except Exception:
            seq.cancelled = True
        return seq.cancelled

    def _finish(self, seq: _Sequence, reason: str) -> None:
        if seq.prompt_logprobs is not None:  # no token was streamed (a stop token came first)
            self._send(seq, [], None)
        self.stats.finished[reason] += 1
        self.metrics.finished(reason)
        try:
            seq.stream.on_finish(reason, len(seq.request.prompt_ids), seq.stop.generated)
        except Exception:
            log.warning("could not send the final response", exc_info=True)

    def _fail(self, seq: _Sequence, message: str) -> None:
        self.stats.finished["error"] += 1
        self.metrics.finished("error")
        try:
            seq.stream.on_error(message)
        except Exception:
            log.warning("could not send the error response", exc_info=True)
