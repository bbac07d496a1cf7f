"""Request models: what is accepted, what is refused, and how requests become Triton inputs."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.chat.protocol import ChatCompletionRequest, SimpleChatRequest

MESSAGES = [{"role": "user", "content": "hi"}]


def test_openai_request_with_every_supported_field() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "model": "chat",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            ],
            "max_completion_tokens": 7,
            "temperature": 0,
            "top_p": 0.9,
            "stop": "END",
            "seed": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    assert request.template_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "ab"},
    ]
    assert request.requested_max_tokens() == 7
    assert request.stop_strings() == ["END"]
    inputs = request.to_generation_inputs([1, 2, 3], 7, default_temperature=1.0, stop_token_ids=[2])
    assert (inputs.max_tokens, inputs.temperature, inputs.top_p, inputs.seed) == (7, 0.0, 0.9, 3)
    assert inputs.stop_token_ids == (2,)
    tensors = {t.name(): t for t in inputs.to_infer_inputs()}
    assert tensors["input_ids"].shape() == [1, 3]  # the batch dimension of the contract
    assert tensors["max_tokens"].datatype() == "INT32" and tensors["max_tokens"].shape() == [1, 1]
    assert tensors["stop_token_ids"].shape() == [1, 1]


def test_defaults_leave_temperature_to_the_server_default() -> None:
    request = ChatCompletionRequest.model_validate({"messages": MESSAGES})
    inputs = request.to_generation_inputs([1], 5, default_temperature=1.0, stop_token_ids=[])
    assert (inputs.temperature, inputs.top_p, inputs.top_k, inputs.seed) == (1.0, 1.0, 0, None)
    assert "seed" not in {t.name() for t in inputs.to_infer_inputs()}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"messages": MESSAGES, "temperature": 3}, "temperature"),
        ({"messages": MESSAGES, "top_p": 0}, "top_p"),
        ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"messages": MESSAGES, "stop": [""]}, "stop"),
        ({"messages": MESSAGES, "max_tokens": 5, "max_completion_tokens": 6}, "disagree"),
        ({"messages": MESSAGES, "best_of": 2}, "best_of"),
    ],
)
def test_invalid_openai_requests(body: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        ChatCompletionRequest.model_validate(body)


def test_simple_request_takes_messages_or_message() -> None:
    assert SimpleChatRequest(message="hello").template_messages() == [{"role": "user", "content": "hello"}]
    with pytest.raises(ValidationError, match="either 'messages'"):
        SimpleChatRequest()
    with pytest.raises(ValidationError, match="either 'messages'"):
        SimpleChatRequest.model_validate({"message": "a", "messages": MESSAGES})
