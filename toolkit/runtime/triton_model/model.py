"""Triton python-backend adapter of the generation model (decoupled transaction policy).

Thin on purpose: ``execute`` turns each ``pb_utils`` request into a validated
:class:`~toolkit.runtime.requests.GenerationRequest` and hands it, with a :class:`TritonStream`, to
the continuous-batching :class:`~toolkit.runtime.scheduler.Scheduler`; the scheduler's thread sends
one response per generated token and a final one. Every failure path sends an error response with
the final flag: a decoupled model that raises leaves its client waiting forever.

The repository stage copies this file into ``<repository>/<name>/<N>/model.py``; the toolkit itself
is imported from the Python environment the backend stub runs in.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from toolkit.errors import ServingError
from toolkit.repository import contract
from toolkit.repository.layout import latest_version_dir
from toolkit.repository.manifest import MANIFEST_FILE, TOKENIZER_DIR, ModelManifest
from toolkit.repository.pbtxt_scan import ConfigFacts, scan_config
from toolkit.repository.plan_compat import verify_plan_dir
from toolkit.repository.spec import GenerationLimits
from toolkit.runtime.grammar import GrammarCompiler, load_tokenizer
from toolkit.runtime.logprobs import Logprobs
from toolkit.runtime.model_metrics import TritonMetrics
from toolkit.runtime.requests import Limits, QueueFullError, RequestError, parse_request, unbatch
from toolkit.runtime.runners import BlsRunner, OnnxRunner, Runner
from toolkit.runtime.scheduler import Scheduler

log = logging.getLogger("toolkit.runtime.triton_model")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


_OUTPUT_DTYPES = {spec.name: spec.numpy_dtype for spec in contract.GENERATION_OUTPUTS}
_TOKEN_LOGPROB_OUTPUTS = (contract.TOKEN_LOGPROBS, contract.TOP_LOGPROB_IDS, contract.TOP_LOGPROBS)
_PROMPT_LOGPROB_OUTPUTS = (contract.PROMPT_TOKEN_LOGPROBS, contract.PROMPT_TOP_LOGPROB_IDS,
                           contract.PROMPT_TOP_LOGPROBS)
CORE_MAX_BATCH_SIZE = 8  # when neither the parameter nor the core model's config says


def _tensor(name: str, value: Any) -> Any:
    return pb_utils.Tensor(name, np.asarray(value, dtype=_OUTPUT_DTYPES[name]))


class TritonStream:
    """One request's response sender, as the scheduler's :class:`Stream`."""

    def __init__(self, request: Any, sender: Any):
        self.request = request
        self.sender = sender

    def on_tokens(self, ids: list[int], logprobs: Logprobs | None = None,
                  prompt_logprobs: Logprobs | None = None) -> None:
        tensors = [_tensor(contract.OUTPUT_IDS, [ids]), _tensor(contract.FINISH_REASON, [[b""]])]
        for names, values in ((_TOKEN_LOGPROB_OUTPUTS, logprobs), (_PROMPT_LOGPROB_OUTPUTS, prompt_logprobs)):
            if values is not None:
                tensors += [_tensor(name, [array.reshape(-1)]) for name, array in zip(
                    names, (values.token, values.top_ids, values.top), strict=True)]
        self.sender.send(pb_utils.InferenceResponse(output_tensors=tensors))

    def on_finish(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        response = pb_utils.InferenceResponse(output_tensors=[
            _tensor(contract.OUTPUT_IDS, np.zeros((1, 0))),
            _tensor(contract.FINISH_REASON, [[reason.encode()]]),
            _tensor(contract.PROMPT_TOKENS, [[prompt_tokens]]),
            _tensor(contract.COMPLETION_TOKENS, [[completion_tokens]]),
        ])
        self.sender.send(response, flags=FINAL)

    def on_error(self, message: str) -> None:
        send_error(self.sender, message)

    def is_cancelled(self) -> bool:
        return bool(self.request.is_cancelled())


def send_error(sender: Any, message: str) -> None:
    sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message)), flags=FINAL)


def _core_config(core_dir: Path) -> ConfigFacts | None:
    """The core model's config (None when it has none: Triton reports a missing core model itself)."""
    path = core_dir / contract.CONFIG_FILE
    return scan_config(path) if path.is_file() else None


def _core_max_batch_size(core_dir: Path, params: dict[str, str]) -> int:
    """The core model's max_batch_size: a `core_max_batch_size` parameter, else its config.pbtxt, else 8."""
    if params.get(contract.PARAM_CORE_MAX_BATCH):
        return int(params[contract.PARAM_CORE_MAX_BATCH])
    config = _core_config(core_dir)
    return config.max_batch_size if config is not None and config.max_batch_size > 0 else CORE_MAX_BATCH_SIZE


def _load_manifest(version_dir: Path) -> ModelManifest:
    """The manifest, without fields the installed toolkit does not know.

    This file is copied into the repository by the build, but the toolkit it imports is whatever
    the serving environment has installed, which may be older than the build (a manifest with
    build facts): the generation model needs none of the newer fields.
    """
    path = version_dir / MANIFEST_FILE
    if not path.is_file():
        raise ServingError(f"no {MANIFEST_FILE} in {version_dir}: is this a toolkit-built repository?")
    data = json.loads(path.read_text())
    return ModelManifest.model_validate({k: v for k, v in data.items() if k in ModelManifest.model_fields})


def _verify_core_plan(core_dir: Path, version: str) -> None:
    """A tensorrt_plan core model must hold a plan built for this server's TensorRT and GPU."""
    config = _core_config(core_dir)
    if config is None or not {config.platform, config.backend} & {"tensorrt_plan", "tensorrt"}:
        return
    try:
        verify_plan_dir(core_dir / version if (core_dir / version).is_dir() else latest_version_dir(core_dir))
    except ServingError as err:
        raise pb_utils.TritonModelException(f"core model {core_dir.name}: {err}") from err


def _grammar_compiler(version_dir: Path, vocab_size: int, stop_ids: frozenset[int],
                      timeout_s: float) -> GrammarCompiler | None:
    """The grammar compiler over the version's own tokenizer; None (grammars refused) when it has none."""
    path = version_dir / TOKENIZER_DIR / "tokenizer.json"
    if not path.is_file():
        log.warning("%s: no tokenizer.json, so no grammar-constrained decoding", version_dir)
        return None
    return GrammarCompiler(load_tokenizer(path.read_text(encoding="utf-8"), vocab_size, sorted(stop_ids)),
                           timeout_s=timeout_s)


def _parameters(config: dict[str, Any]) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


class TritonPythonModel:
    """The generation model: validation and enqueueing here, generation in the scheduler."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException(
                f"{args['model_name']}: the generation model must use the decoupled transaction policy"
            )
        params = _parameters(config)
        model_dir = Path(args["model_repository"])
        version = args["model_version"]
        manifest = _load_manifest(model_dir / version)
        core_model = params.get(contract.PARAM_CORE_MODEL) or manifest.serving_core_model
        runner_kind = params.get(contract.PARAM_RUNNER, contract.RUNNER_ONNXRUNTIME)
        runner: Runner
        if runner_kind == contract.RUNNER_BLS:
            _verify_core_plan(model_dir.parent / core_model, version)
            runner = BlsRunner(
                pb_utils, core_model, vocab_size=manifest.vocab_size, num_layers=manifest.num_layers,
                num_kv_heads=manifest.num_kv_heads, head_dim=manifest.head_dim,
                max_batch_size=_core_max_batch_size(model_dir.parent / core_model, params),
            )
        elif runner_kind == contract.RUNNER_ONNXRUNTIME:
            onnx_path = model_dir.parent / core_model / version / "model.onnx"
            if not onnx_path.is_file():  # the core model may keep other version numbers
                onnx_path = latest_version_dir(model_dir.parent / core_model) / "model.onnx"
            threads = params.get("threads") or os.environ.get("OMP_NUM_THREADS")
            runner = OnnxRunner(onnx_path, threads=int(threads) if threads else None)
        else:
            raise pb_utils.TritonModelException(f"unknown runner {runner_kind!r}; use 'onnxruntime' or 'bls'")
        served = GenerationLimits.from_parameters(params)
        context = manifest.context_length
        self.limits = Limits(
            vocab_size=min(runner.vocab_size, manifest.vocab_size),
            context_length=context,
            max_new_tokens_limit=served.max_new_tokens_limit or context,
            stop_token_ids=frozenset(manifest.stop_token_ids) | frozenset(manifest.eos_token_ids),
        )
        self.scheduler = Scheduler(
            runner,
            grammar=_grammar_compiler(model_dir / version, runner.vocab_size, self.limits.stop_token_ids,
                                      served.grammar_compile_timeout_s),
            max_active=served.max_active_sequences,
            max_queue=served.max_queue,
            pad_id=manifest.pad_token_id,
            metrics=TritonMetrics(pb_utils, args["model_name"], version),
        )
        self.scheduler.start()
        log.warning("%s v%s: runner %s on %s (%s), context %d, max active %d", args["model_name"], version,
                    runner_kind, core_model, getattr(runner, "graph_note", "core model"), context,
                    self.scheduler.max_active)

    def execute(self, requests: list[Any]) -> None:
        """Validate and enqueue; responses come from the scheduler thread. Never raises."""
        for request in requests:
            sender = request.get_response_sender()
            try:
                inputs = unbatch({t.name(): t.as_numpy() for t in request.inputs()})
                raw = request.parameters()
                parameters = json.loads(raw) if raw else {}
                generation = parse_request(inputs, self.limits, parameters)
                self.scheduler.submit(generation, TritonStream(request, sender))
            except RequestError as err:
                send_error(sender, f"{contract.INVALID_REQUEST_PREFIX}{err}")
            except QueueFullError as err:  # its message starts with SERVER_BUSY_PREFIX or SHUTTING_DOWN_PREFIX
                send_error(sender, str(err))
            except Exception as err:
                log.exception("could not enqueue a request")
                try:
                    send_error(sender, f"internal error: {type(err).__name__}: {err}")
                except Exception:
                    log.exception("could not send the error response")
        return None

    def finalize(self) -> None:
        self.scheduler.stop()
