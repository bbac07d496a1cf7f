"""config.pbtxt generation: typed protobuf configs compared with golden files, and invalid ones refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from toolkit.errors import ConfigError
from toolkit.repository import contract as c
from toolkit.repository.contract import LMInfo
from toolkit.repository.pbtxt import (
    config_to_text,
    data_type,
    generation_model_config,
    model_parameters,
    onnx_core_config,
    read_config,
    tensorrt_core_config,
    write_config,
)
from toolkit.repository.pbtxt_scan import scan_config

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "pbtxt"
LM = LMInfo(num_layers=2, num_kv_heads=2, head_dim=8, vocab_size=64)
BATCHING: dict[str, Any] = {
    "max_batch_size": 8, "preferred_batch_sizes": [4, 8], "max_queue_delay_us": 2000, "instance_count": 1
}
PARAMS = {c.PARAM_CORE_MODEL: "tiny_onnx_fp32", c.PARAM_RUNNER: "onnxruntime", c.PARAM_MAX_ACTIVE: "32",
          c.PARAM_MAX_QUEUE: "256", c.PARAM_MAX_NEW_TOKENS: "1024"}


def _generation() -> pb.ModelConfig:
    return generation_model_config("tiny", parameters=PARAMS, **BATCHING)


@pytest.mark.parametrize(
    ("golden", "build"),
    [
        ("generation.pbtxt", _generation),
        ("onnx_fp32.pbtxt", lambda: onnx_core_config("tiny_onnx_fp32", LM, **BATCHING)),
        ("trt_fp16.pbtxt", lambda: tensorrt_core_config("tiny_trt_fp16", LM, **BATCHING)),
    ],
)
def test_generated_config_matches_golden_file(golden: str, build: Callable[[], pb.ModelConfig]) -> None:
    expected = (GOLDEN / golden).read_text()
    assert config_to_text(build()) == expected
    assert read_config(GOLDEN / golden) == build()


def test_generation_model_follows_the_contract() -> None:
    config = _generation()
    inputs = {t.name: t for t in config.input}
    assert list(inputs) == [c.INPUT_IDS, *c.OPTIONAL_INPUTS]
    assert not inputs[c.INPUT_IDS].optional and inputs[c.INPUT_IDS].allow_ragged_batch
    assert all(inputs[name].optional for name in c.OPTIONAL_INPUTS)
    assert inputs[c.STOP_TOKEN_IDS].allow_ragged_batch and list(inputs[c.STOP_TOKEN_IDS].dims) == [-1]
    outputs = {t.name: pb.DataType.Name(t.data_type) for t in config.output}
    assert outputs == {c.OUTPUT_IDS: "TYPE_INT64", c.FINISH_REASON: "TYPE_STRING", c.PROMPT_TOKENS: "TYPE_INT32",
                       c.COMPLETION_TOKENS: "TYPE_INT32", c.TOKEN_LOGPROBS: "TYPE_FP32",
                       c.TOP_LOGPROB_IDS: "TYPE_INT64", c.TOP_LOGPROBS: "TYPE_FP32",
                       c.PROMPT_TOKEN_LOGPROBS: "TYPE_FP32", c.PROMPT_TOP_LOGPROB_IDS: "TYPE_INT64",
                       c.PROMPT_TOP_LOGPROBS: "TYPE_FP32"}
    assert pb.DataType.Name(inputs[c.GRAMMAR].data_type) == "TYPE_STRING" and list(inputs[c.GRAMMAR].dims) == [1]
    assert config.backend == "python" and config.model_transaction_policy.decoupled
    assert [g.kind for g in config.instance_group] == [pb.ModelInstanceGroup.KIND_CPU]
    assert {k: v.string_value for k, v in config.parameters.items()} == PARAMS


def test_core_models_declare_every_kv_tensor() -> None:
    config = onnx_core_config("m", LMInfo(num_layers=3, num_kv_heads=4, head_dim=16, vocab_size=10), **BATCHING)
    names = [t.name for t in config.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == [f"past_key_values.{i}.{kv}" for i in range(3) for kv in ("key", "value")]
    assert [t.name for t in config.output][1:] == [f"present.{i}.{kv}" for i in range(3) for kv in ("key", "value")]
    assert list(config.input[3].dims) == [4, -1, 16]
    assert list(config.output[0].dims) == [-1, 10]
    assert config.platform == "onnxruntime_onnx"


def test_fp16_graph_gets_fp16_kv_types() -> None:
    lm = LMInfo(num_layers=1, num_kv_heads=1, head_dim=4, vocab_size=8, kv_dtype="fp16")
    config = tensorrt_core_config("m", lm, **BATCHING)
    assert pb.DataType.Name(config.input[3].data_type) == "TYPE_FP16"
    assert pb.DataType.Name(config.input[0].data_type) == "TYPE_INT64"


def test_unknown_data_type_name_fails_at_build_time() -> None:
    with pytest.raises(ConfigError, match="unknown Triton data type 'TYPE_FLOAT32'"):
        data_type("TYPE_FLOAT32")


def test_pbtxt_with_a_wrong_data_type_name_is_refused(tmp_path: Path) -> None:
    bad = (GOLDEN / "generation.pbtxt").read_text().replace("TYPE_FP32", "TYPE_FLOAT32", 1)
    (tmp_path / "config.pbtxt").write_text(bad)
    with pytest.raises(ConfigError, match="not a valid Triton model config"):
        read_config(tmp_path / "config.pbtxt")


def test_preferred_batch_size_over_max_is_refused() -> None:
    with pytest.raises(ConfigError, match="preferred batch size 16"):
        generation_model_config("m", max_batch_size=8, preferred_batch_sizes=[16], max_queue_delay_us=0,
                                instance_count=1, parameters={})


def test_decoupled_policy_only_on_python_backend(tmp_path: Path) -> None:
    config = onnx_core_config("m", LM, **BATCHING)
    config.model_transaction_policy.decoupled = True
    with pytest.raises(ConfigError, match="only the python backend"):
        write_config(tmp_path, config)
    assert not (tmp_path / "config.pbtxt").exists()


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    path = write_config(tmp_path / "tiny", _generation())
    assert path == tmp_path / "tiny" / "config.pbtxt"
    assert read_config(path) == _generation()
    assert text_format.Parse(path.read_text(), pb.ModelConfig()).name == "tiny"


def test_lm_info_from_hf_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        '{"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576, '
        '"vocab_size": 49152}'
    )
    assert LMInfo.from_hf_config(tmp_path) == LMInfo(num_layers=30, num_kv_heads=3, head_dim=64, vocab_size=49152)


def _scan_equals_read(path: Path) -> None:
    config = read_config(path)
    facts = scan_config(path)
    assert (facts.name, facts.platform, facts.backend, facts.max_batch_size) == (
        config.name, config.platform, config.backend, config.max_batch_size)
    assert facts.parameters == model_parameters(config)


@pytest.mark.parametrize("golden", ["generation.pbtxt", "onnx_fp32.pbtxt", "trt_fp16.pbtxt"])
def test_python_backend_reader_agrees_with_the_protobuf_reader(golden: str) -> None:
    """The generation model reads configs without protobuf (pbtxt_scan); it must see what read_config sees."""
    _scan_equals_read(GOLDEN / golden)


def test_python_backend_reader_agrees_on_escapes_and_hand_written_configs(tmp_path: Path) -> None:
    config = _generation()
    config.parameters["odd"].string_value = 'quote " backslash \\ newline \n é 中'
    path = write_config(tmp_path / "tiny", config)
    _scan_equals_read(path)
    assert scan_config(path).parameters["odd"] == 'quote " backslash \\ newline \n é 中'
    hand = tmp_path / "hand" / "config.pbtxt"
    hand.parent.mkdir()
    hand.write_text('# a comment\nname: "hand"  platform: \'tensorrt_plan\'\nmax_batch_size: 16\n'
                    'parameters [{ key: "runner" value: { string_value: "bls" } }]\n'
                    'input [{ name: "x" data_type: TYPE_FP32 dims: [ -1, 4 ] }]\n')
    _scan_equals_read(hand)
    assert scan_config(hand).parameters == {"runner": "bls"} and scan_config(hand).max_batch_size == 16
