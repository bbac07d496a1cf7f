"""The tensor contract is one table: the config, both request encoders and every default follow it."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as pb

from gateway.chat.protocol import ChatCompletionRequest
from gateway.triton import GenerationInputs
from toolkit.buildsys.config import ServingSection
from toolkit.errors import ConfigError
from toolkit.quality.triton_client import generation_inputs
from toolkit.repository import contract
from toolkit.repository.pbtxt import generation_model_config
from toolkit.repository.spec import DEFAULT_LIMITS, GenerationLimits
from toolkit.runtime.grammar import GrammarCompiler
from toolkit.runtime.requests import Limits, SamplingParams, parse_request
from toolkit.runtime.scheduler import Scheduler

CONFIG = generation_model_config("m", max_batch_size=8, preferred_batch_sizes=[8], max_queue_delay_us=0,
                                 instance_count=1, parameters={})
# The config says TYPE_STRING where the wire says BYTES.
DECLARED = {t.name: (pb.DataType.Name(t.data_type).removeprefix("TYPE_").replace("STRING", "BYTES"), list(t.dims))
            for t in CONFIG.input}
EVERY_INPUT = {"max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "top_k": 3, "seed": 7, "repetition_penalty": 1.1,
               "stop_token_ids": [2, 3], "ignore_eos": True, "grammar": '{"type": "json_object"}', "logprobs": 2,
               "prompt_logprobs": 1}


def _check_against_config(tensors: dict[str, tuple[str, list[int]]]) -> None:
    for name, (dtype, shape) in tensors.items():
        declared_type, dims = DECLARED[name]
        assert dtype == declared_type, name
        assert shape[0] == 1 and len(shape) == 1 + len(dims), name  # the batch dimension, then the config's dims
        assert all(d == -1 or d == s for d, s in zip(dims, shape[1:], strict=True)), name


def test_every_optional_input_of_the_table_is_in_the_config_and_the_encoder() -> None:
    assert set(EVERY_INPUT) == set(contract.OPTIONAL_INPUTS)
    arrays = contract.request_arrays([1, 2, 3], **EVERY_INPUT)
    assert list(arrays) == [contract.INPUT_IDS, *contract.OPTIONAL_INPUTS] == list(DECLARED)
    _check_against_config({n: (contract.input_spec(n).dtype, list(a.shape)) for n, a in arrays.items()})
    assert arrays["stop_token_ids"].shape == (1, 2) and arrays["ignore_eos"].dtype == np.bool_
    assert arrays["grammar"].dtype == object and arrays["grammar"][0, 0] == b'{"type": "json_object"}'
    assert list(contract.request_arrays([1], seed=None, max_tokens=4)) == ["input_ids", "max_tokens"]
    with pytest.raises(KeyError, match="beam_width"):
        contract.request_arrays([1], beam_width=2)


def test_gateway_and_client_send_what_the_config_declares() -> None:
    gateway = GenerationInputs(prompt_ids=[1, 2, 3], max_tokens=5, seed=7, stop_token_ids=(2,), ignore_eos=True)
    client = generation_inputs([1, 2, 3], **EVERY_INPUT)
    for inputs in (gateway.to_infer_inputs(), client):
        _check_against_config({t.name(): (t.datatype(), t.shape()) for t in inputs})
    assert {t.name() for t in client} == set(DECLARED)


def test_request_defaults_have_one_source() -> None:
    sampling = SamplingParams()
    gateway = GenerationInputs(prompt_ids=[1], max_tokens=1)
    served = parse_request({"input_ids": np.asarray([1])}, Limits(vocab_size=10, context_length=8,
                                                                  max_new_tokens_limit=4)).sampling
    openai = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]})
    from_openai = openai.to_generation_inputs([1], 1, default_temperature=contract.DEFAULT_TEMPERATURE,
                                              stop_token_ids=[])
    for field, default in (("temperature", contract.DEFAULT_TEMPERATURE), ("top_p", contract.DEFAULT_TOP_P),
                           ("top_k", contract.DEFAULT_TOP_K),
                           ("repetition_penalty", contract.DEFAULT_REPETITION_PENALTY)):
        assert getattr(sampling, field) == getattr(served, field) == getattr(gateway, field) == default, field
        assert getattr(from_openai, field) == default, field
    assert gateway.ignore_eos is openai.ignore_eos is contract.DEFAULT_IGNORE_EOS


def test_limits_have_one_source() -> None:
    """The build config, the scheduler and the grammar compiler take their defaults from the repository's spec."""
    fields = {name: f.default for name, f in ServingSection.model_fields.items()}
    assert (DEFAULT_LIMITS.max_active_sequences, DEFAULT_LIMITS.max_queue) == (32, 256)
    assert fields["max_active_sequences"] == DEFAULT_LIMITS.max_active_sequences
    assert fields["max_queue"] == DEFAULT_LIMITS.max_queue
    assert fields["max_new_tokens_limit"] == DEFAULT_LIMITS.max_new_tokens_limit == 1024
    assert fields["grammar_compile_timeout_s"] == DEFAULT_LIMITS.grammar_compile_timeout_s == 10.0
    scheduler = Scheduler(runner=None)  # type: ignore[arg-type]
    assert (scheduler.max_active, scheduler.max_queue) == (32, 256)
    assert inspect.signature(GrammarCompiler).parameters["timeout_s"].default == 10.0


def test_limits_are_read_back_as_written() -> None:
    limits = GenerationLimits(max_active_sequences=3, max_queue=5, max_new_tokens_limit=7,
                              grammar_compile_timeout_s=2.5)
    params = limits.parameters()
    assert params == {contract.PARAM_MAX_ACTIVE: "3", contract.PARAM_MAX_QUEUE: "5",
                      contract.PARAM_MAX_NEW_TOKENS: "7", contract.PARAM_GRAMMAR_TIMEOUT: "2.5"}
    assert GenerationLimits.from_parameters(params) == limits
    assert limits.accepted_requests == 8


def test_limits_left_out_take_the_defaults_and_bad_ones_are_named() -> None:
    read = GenerationLimits.from_parameters({contract.PARAM_MAX_QUEUE: "9"})
    assert (read.max_active_sequences, read.max_queue, read.grammar_compile_timeout_s) == (32, 9, 10.0)
    assert read.max_new_tokens_limit is None  # no parameter: up to the context, as repositories before it
    with pytest.raises(ConfigError, match="max_active_sequences='many' is not an integer"):
        GenerationLimits.from_parameters({contract.PARAM_MAX_ACTIVE: "many"})
    with pytest.raises(ConfigError, match="max_queue='0' must be above 0"):
        GenerationLimits.from_parameters({contract.PARAM_MAX_QUEUE: "0"})
