"""The Triton adapter (model.py) and the BLS runner against a fake ``pb_utils``: every bad request gets an
error response with the final flag, good ones stream and end with finish_reason; tensors marshal right."""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.unit import fake_pb_utils
from tests.unit.serving_fakes import FakeRunner, reference_greedy
from toolkit.repository import contract
from toolkit.repository.manifest import ModelManifest
from toolkit.runtime.runners import BlsRunner

FINAL = fake_pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


@pytest.fixture()
def model_module(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils)
    sys.modules.pop("toolkit.runtime.triton_model.model", None)
    module = importlib.import_module("toolkit.runtime.triton_model.model")
    yield module
    sys.modules.pop("toolkit.runtime.triton_model.model", None)


def _manifest(version_dir: Path, vocab: int) -> None:
    version_dir.mkdir(parents=True)
    ModelManifest(
        model_name="m", version=1, base_model="b", adapter_sha256=None, toolkit_version="t", built_at="now",
        context_length=64, vocab_size=vocab, num_layers=1, num_kv_heads=1, head_dim=8, bos_token_id=None,
        eos_token_ids=[0], stop_token_ids=[0], pad_token_id=0, chat_template="", chat_template_sha256="",
        serving_core_model="m_onnx_fp32",
    ).save(version_dir)


@pytest.fixture()
def model(model_module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    runner = FakeRunner(vocab_size=40)
    monkeypatch.setattr(model_module, "OnnxRunner", lambda path, threads=None: runner)
    _manifest(tmp_path / "m" / "1", 40)
    config = {"model_transaction_policy": {"decoupled": True}, "parameters": {
        contract.PARAM_MAX_NEW_TOKENS: {"string_value": "16"}, contract.PARAM_MAX_ACTIVE: {"string_value": "4"}}}
    instance = model_module.TritonPythonModel()
    (tmp_path / "m_onnx_fp32" / "1").mkdir(parents=True)
    (tmp_path / "m_onnx_fp32" / "1" / "model.onnx").write_bytes(b"")
    instance.initialize({"model_config": json.dumps(config), "model_repository": str(tmp_path / "m"),
                         "model_version": "1", "model_name": "m"})
    instance.runner = runner
    yield instance
    instance.finalize()


def _wait_final(request: fake_pb_utils.Request) -> None:
    deadline = time.monotonic() + 10
    while not request.sender.final:
        assert time.monotonic() < deadline, "no final response"
        time.sleep(0.005)


def _ids(*ids: int) -> np.ndarray:
    return np.asarray([ids], dtype=np.int64)


def test_good_request_streams_tokens_then_a_final_response(model) -> None:  # type: ignore[no-untyped-def]
    request = fake_pb_utils.Request({"input_ids": _ids(3, 4, 5), "max_tokens": np.asarray([[6]], np.int32)})
    assert model.execute([request]) is None
    _wait_final(request)
    sent = request.sender.sent
    tokens = [int(fake_pb_utils.get_output_tensor_by_name(r, contract.OUTPUT_IDS).as_numpy()[0, 0])
              for r, flags in sent[:-1]]
    assert tokens == reference_greedy(model.runner, [3, 4, 5], 6, {0})
    final, flags = sent[-1]
    assert flags == FINAL
    reason = fake_pb_utils.get_output_tensor_by_name(final, contract.FINISH_REASON).as_numpy()[0, 0]
    assert reason in (b"length", b"stop")


@pytest.mark.parametrize(("inputs", "parameters", "message"), [
    ({"max_tokens": np.asarray([[4]], np.int32)}, None, "missing required input input_ids"),
    ({"input_ids": _ids(3, 99)}, None, "outside the vocabulary"),
    ({"input_ids": np.asarray([[3, 4], [5, 6]], np.int64)}, None, "batch dimension 2"),
    ({"input_ids": _ids(3), "max_tokens": np.asarray([[0]], np.int32)}, None, "max_tokens must be > 0"),
    ({"input_ids": _ids(3)}, {"foo": 1}, "unknown request parameter"),
])
def test_bad_request_gets_one_error_response_with_the_final_flag(
    model, inputs: dict[str, np.ndarray], parameters: dict[str, int] | None, message: str  # type: ignore[no-untyped-def]
) -> None:
    request = fake_pb_utils.Request(inputs, parameters)
    model.execute([request])
    assert len(request.sender.sent) == 1
    response, flags = request.sender.sent[0]
    assert flags == FINAL and response.has_error() and message in response.error().message()
    # the prefix by which the gateway tells a refused request (400) from a model fault (502)
    assert response.error().message().startswith("invalid request: ")


def test_a_crash_inside_execute_still_ends_the_stream(model, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("scheduler exploded")

    monkeypatch.setattr(model.scheduler, "submit", explode)
    request = fake_pb_utils.Request({"input_ids": _ids(3)})
    good_after = fake_pb_utils.Request({"input_ids": _ids(3)})
    model.execute([request, good_after])
    for r in (request, good_after):
        response, flags = r.sender.sent[-1]
        assert flags == FINAL and "internal error" in response.error().message()


def test_cancelled_request_ends_with_finish_reason_cancelled(model) -> None:  # type: ignore[no-untyped-def]
    request = fake_pb_utils.Request({"input_ids": _ids(3, 4)})
    request.cancelled = True
    model.execute([request])
    _wait_final(request)
    final, _ = request.sender.sent[-1]
    assert fake_pb_utils.get_output_tensor_by_name(final, contract.FINISH_REASON).as_numpy()[0, 0] == b"cancelled"


def test_a_send_that_fails_cancels_its_request_and_frees_the_slot(
    model, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    forward = model.runner.forward

    def slow_forward(*args: object) -> object:  # a decode step that takes as long as a real one
        time.sleep(0.02)
        return forward(*args)

    monkeypatch.setattr(model.runner, "forward", slow_forward)
    request = fake_pb_utils.Request({"input_ids": _ids(3, 4), "max_tokens": np.asarray([[16]], np.int32)})

    def refuse(response: object, flags: int = 0) -> None:
        if not flags:
            raise RuntimeError("Unable to send response. Response sender has been closed.")
        request.sender.sent.append((response, flags))

    request.sender.send = refuse  # type: ignore[method-assign]
    model.execute([request])
    _wait_final(request)
    final, _ = request.sender.sent[-1]
    assert fake_pb_utils.get_output_tensor_by_name(final, contract.FINISH_REASON).as_numpy()[0, 0] == b"cancelled"
    deadline = time.monotonic() + 5
    while model.scheduler.active_count:
        assert time.monotonic() < deadline, "the failed request kept its slot"
        time.sleep(0.005)


def test_bls_runner_marshals_chunks_to_the_core_model(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeRunner(vocab_size=40)
    seen: list[tuple[str, list[str], dict[str, tuple[int, ...]]]] = []

    def core_model(request: fake_pb_utils.InferenceRequest) -> fake_pb_utils.InferenceResponse:
        feed = {t.name(): t.as_numpy() for t in request.inputs}
        seen.append((request.model_name, request.requested_output_names, {k: v.shape for k, v in feed.items()}))
        logits, present = fake.forward(feed["input_ids"], feed["attention_mask"], feed["position_ids"],
                                       [feed["past_key_values.0.key"], feed["past_key_values.0.value"]])
        return fake_pb_utils.InferenceResponse([
            fake_pb_utils.Tensor("logits", logits), fake_pb_utils.Tensor("present.0.key", present[0]),
            fake_pb_utils.Tensor("present.0.value", present[1])])

    monkeypatch.setattr(fake_pb_utils.InferenceRequest, "executor", staticmethod(core_model))
    bls = BlsRunner(fake_pb_utils, "m_onnx_fp32", vocab_size=40, num_layers=1, num_kv_heads=1, head_dim=8,
                    max_batch_size=2)
    ids = np.asarray([[1, 2], [3, 4], [5, 6]], np.int64)
    mask = np.ones_like(ids)
    pos = np.tile(np.arange(2), (3, 1))
    logits, present = bls.forward(ids, mask, pos, bls.empty_past(3))
    direct_logits, direct_present = fake.forward(ids, mask, pos, fake.empty_past(3))
    assert np.allclose(logits, direct_logits) and np.allclose(present[0], direct_present[0])
    assert [s[2]["input_ids"] for s in seen[:2]] == [(2, 2), (1, 2)]  # chunked at the core max_batch_size
    assert seen[0][0] == "m_onnx_fp32" and seen[0][1] == ["logits", "present.0.key", "present.0.value"]
    assert seen[0][2]["past_key_values.0.key"] == (2, 1, 0, 8)


def test_bls_runner_raises_the_core_models_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fake_pb_utils.InferenceRequest, "executor", staticmethod(
        lambda request: fake_pb_utils.InferenceResponse([], fake_pb_utils.TritonError("plan built for sm_90"))))
    bls = BlsRunner(fake_pb_utils, "m_trt_fp16", vocab_size=40, num_layers=1, num_kv_heads=1, head_dim=8,
                    max_batch_size=8)
    with pytest.raises(RuntimeError, match="m_trt_fp16: plan built for sm_90"):
        bls.forward(np.ones((1, 1), np.int64), np.ones((1, 1), np.int64), np.zeros((1, 1), np.int64),
                    bls.empty_past(1))


def test_bls_core_batch_size_comes_from_the_core_models_config(model_module, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "config.pbtxt").write_text('name: "core"\nmax_batch_size: 16\n')
    assert model_module._core_max_batch_size(tmp_path / "core", {}) == 16
    assert model_module._core_max_batch_size(tmp_path / "core", {"core_max_batch_size": "4"}) == 4
    assert model_module._core_max_batch_size(tmp_path / "missing", {}) == 8


def test_bls_over_a_plan_built_for_another_gpu_refuses_to_load(
    model_module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    _manifest(tmp_path / "m" / "1", 40)
    core = tmp_path / "m_trt_fp16"
    (core / "1").mkdir(parents=True)
    (core / "config.pbtxt").write_text('name: "m_trt_fp16"\nplatform: "tensorrt_plan"\nmax_batch_size: 8\n')
    (core / "1" / "model.plan").write_bytes(b"plan")
    (core / "1" / "plan_meta.json").write_text(json.dumps({
        "tensorrt_version": "10.3.0", "gpu_name": "NVIDIA A10", "compute_capability": "8.6",
        "build_script": str(core / "build_plan.sh")}))
    monkeypatch.setenv("TRT_VERSION", "10.3.0")
    monkeypatch.setattr("toolkit.repository.plan_compat.gpu_facts", lambda: ("NVIDIA H100 80GB HBM3", "9.0"))
    config = {"model_transaction_policy": {"decoupled": True}, "parameters": {
        contract.PARAM_RUNNER: {"string_value": "bls"}, contract.PARAM_CORE_MODEL: {"string_value": "m_trt_fp16"}}}
    instance = model_module.TritonPythonModel()
    with pytest.raises(fake_pb_utils.TritonModelException,
                       match=r"core model m_trt_fp16: plan built for TensorRT 10.3.0 on NVIDIA A10 sm_86; this server "
                             r"has TensorRT 10.3.0 on NVIDIA H100 80GB HBM3 sm_90; rebuild with .*build_plan.sh"):
        instance.initialize({"model_config": json.dumps(config), "model_repository": str(tmp_path / "m"),
                             "model_version": "1", "model_name": "m"})


def test_gauges_cross_to_the_server_only_when_they_change() -> None:
    from tests.unit import fake_pb_utils
    from toolkit.runtime.model_metrics import ACTIVE_SEQUENCES, KV_CACHE_BYTES, TritonMetrics

    metrics = TritonMetrics(fake_pb_utils, "m", "1")
    for n in (1, 1, 1, 2, 2, 0):
        metrics.active_sequences(n)
        metrics.kv_cache_bytes(4096)
    assert fake_pb_utils.MetricFamily.families[ACTIVE_SEQUENCES].metrics[-1].values == [1.0, 2.0, 0.0]
    assert fake_pb_utils.MetricFamily.families[KV_CACHE_BYTES].metrics[-1].values == [4096.0]


def test_limits_come_from_the_parameters_and_the_context_from_the_manifest(  # type: ignore[no-untyped-def]
        model_module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A repository an earlier toolkit wrote also has a context_length parameter: the manifest's context wins."""
    monkeypatch.setattr(model_module, "OnnxRunner", lambda path, threads=None: FakeRunner(vocab_size=40))
    _manifest(tmp_path / "m" / "1", 40)
    (tmp_path / "m_onnx_fp32" / "1").mkdir(parents=True)
    (tmp_path / "m_onnx_fp32" / "1" / "model.onnx").write_bytes(b"")
    config = {"model_transaction_policy": {"decoupled": True}, "parameters": {
        contract.PARAM_MAX_QUEUE: {"string_value": "3"}, "context_length": {"string_value": "32"}}}
    instance = model_module.TritonPythonModel()
    instance.initialize({"model_config": json.dumps(config), "model_repository": str(tmp_path / "m"),
                         "model_version": "1", "model_name": "m"})
    try:
        assert (instance.limits.context_length, instance.limits.max_new_tokens_limit) == (64, 64)
        assert (instance.scheduler.max_active, instance.scheduler.max_queue) == (32, 3)
    finally:
        instance.finalize()
