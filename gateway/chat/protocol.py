"""Request and response models of ``/v1/chat`` and the OpenAI-compatible ``/v1/chat/completions``.

Requests are strict (``extra="forbid"``): a misspelt or unsupported parameter is a 422 that names
it, rather than silently ignored. Requests convert themselves to the generation model's inputs.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.triton import GenerationInputs
from toolkit.repository import contract

Role = Literal["system", "developer", "user", "assistant"]
MAX_STOP_CHARS = 256  # stop strings are matched against every new piece of text: keep them short
MAX_TOP_K = 1_000_000  # above any vocabulary; Triton's top_k is INT32
MAX_REPETITION_PENALTY = 10.0
MAX_NAME_CHARS = 256


def _unicode_text(text: str) -> str:
    """Refuse text that is not valid Unicode: JSON's "\\ud800" escapes decode to a lone surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"text is not valid Unicode (a lone surrogate at character {err.start})") from None
    return text


Text = Annotated[str, AfterValidator(_unicode_text)]
# No NaN or infinity (Python's JSON parser accepts the literals NaN and Infinity).
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    """One turn; content may be a string or a list of text parts (as the OpenAI API allows)."""

    model_config = _STRICT
    role: Role
    content: Text | list[TextPart]
    name: Text | None = Field(default=None, max_length=MAX_NAME_CHARS)

    def chars(self) -> int:
        return len(self.content) if isinstance(self.content, str) else sum(len(p.text) for p in self.content)

    def to_template(self) -> dict[str, str]:
        """The message as the chat template sees it (``developer`` is the newer name of ``system``)."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class SamplingFields(BaseModel):
    """Sampling parameters shared by both chat endpoints."""

    model_config = _STRICT

    model: Text | None = Field(
        default=None, max_length=MAX_NAME_CHARS, description="A repository model; default: the gateway's default."
    )
    max_tokens: int | None = Field(
        default=None, ge=1, le=2**31 - 1, description="Default: the rest of the model's context."
    )
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="0 is greedy.")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=MAX_TOP_K, description="Extension: 0 disables.")
    repetition_penalty: float | None = Field(
        default=None, gt=0.0, le=MAX_REPETITION_PENALTY, description="Extension: 1 disables."
    )
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: Text | list[Text] | None = Field(
        default=None, description=f"Up to 4 strings of at most {MAX_STOP_CHARS} characters that end the reply "
        "(not sent)."
    )
    ignore_eos: bool = Field(
        default=contract.DEFAULT_IGNORE_EOS,
        description="Extension (as in vLLM): generate past the end-of-turn token until max_tokens or a stop string; "
        "benchmark clients use it for fixed output lengths.",
    )

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings must have at most {MAX_STOP_CHARS} characters")
        return stops

    def stop_strings(self) -> list[str]:
        return list(self.stop or [])  # normalised to a list by the validator

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def to_generation_inputs(
        self, prompt_ids: list[int], max_tokens: int, default_temperature: float, stop_token_ids: list[int]
    ) -> GenerationInputs:
        """The generation model's inputs for this request."""
        return GenerationInputs(
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            temperature=default_temperature if self.temperature is None else self.temperature,
            top_p=contract.DEFAULT_TOP_P if self.top_p is None else self.top_p,
            top_k=contract.DEFAULT_TOP_K if self.top_k is None else self.top_k,
            seed=self.seed,
            repetition_penalty=(contract.DEFAULT_REPETITION_PENALTY if self.repetition_penalty is None
                                else self.repetition_penalty),
            stop_token_ids=tuple(stop_token_ids),
            ignore_eos=self.ignore_eos,
        )


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions`` (OpenAI)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(
        default=None, ge=1, le=2**31 - 1, description="Newer name of max_tokens."
    )
    n: int = Field(default=1, ge=1, le=128, description="Only 1 is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = Field(default=None, max_length=MAX_NAME_CHARS)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, description="Only 0 is supported.")
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, description="Only 0 is supported.")
    logprobs: bool | None = Field(default=None, description="Not supported.")

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            if self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict[str, str]]:
        return [m.to_template() for m in self.messages]

    def message_count_and_chars(self) -> tuple[int, int]:
        return len(self.messages), sum(m.chars() for m in self.messages)


class SimpleChatRequest(SamplingFields):
    """``POST /v1/chat``: a conversation, or one user message."""

    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    message: Text | None = Field(default=None, min_length=1, description="Shorthand for one user message.")

    @model_validator(mode="after")
    def _one_of(self) -> SimpleChatRequest:
        if (self.messages is None) == (self.message is None):
            raise ValueError("send either 'messages' (a list of turns) or 'message' (one user message)")
        return self

    def template_messages(self) -> list[dict[str, str]]:
        if self.messages is not None:
            return [m.to_template() for m in self.messages]
        return [{"role": "user", "content": self.message or ""}]

    def message_count_and_chars(self) -> tuple[int, int]:
        if self.messages is not None:
            return len(self.messages), sum(m.chars() for m in self.messages)
        return 1, len(self.message or "")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


FinishReason = Literal["stop", "length"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class SimpleChatResponse(BaseModel):
    model: str
    response: str
    finish_reason: FinishReason
    usage: Usage


def openapi_examples() -> dict[str, Any]:
    """An example body for /docs."""
    return {
        "model": None,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 64,
        "temperature": 0,
    }
