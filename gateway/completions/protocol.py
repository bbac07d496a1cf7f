"""Request and response models of the OpenAI-compatible ``/v1/completions`` (prompt text or ids, no template)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from gateway.chat.protocol import FinishReason, SamplingFields, StreamOptions, Text, Usage
from toolkit.repository import contract

MAX_PROMPTS = 32
Prompt = str | list[int]


class CompletionRequest(SamplingFields):
    """``POST /v1/completions`` (OpenAI's legacy completions, as evaluation harnesses use it)."""

    prompt: Text | list[Text] | list[int] | list[list[int]] = Field(
        description="Text, token ids, or a list of either (one choice each)."
    )
    max_tokens: int | None = Field(default=16, ge=1, le=2**31 - 1, description="OpenAI's default: 16.")
    n: int = Field(default=1, ge=1, le=128, description="Only 1 is supported.")
    best_of: int | None = Field(default=None, ge=1, le=128, description="Only 1 is supported.")
    echo: bool = Field(default=False, description="Return the prompt before the completion (and its logprobs).")
    logprobs: int | None = Field(default=None, ge=0, le=contract.MAX_TOP_LOGPROBS,
                                 description="Each token's log-probability and this many alternatives.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: Text | None = Field(default=None, description="Not supported.")
    user: Text | None = Field(default=None, max_length=256)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, description="Only 0 is supported.")
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, description="Only 0 is supported.")
    logit_bias: dict[str, float] | None = Field(default=None, description="Not supported.")

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt must not be empty")
            if isinstance(value[0], list | str) and len(value) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
            if any(isinstance(p, list) and not p for p in value):
                raise ValueError("a token-id prompt must not be empty")
            if any(isinstance(t, int) and t < 0 for p in value for t in (p if isinstance(p, list) else [p])):
                raise ValueError("token ids must be >= 0")
        return value

    def prompts(self) -> list[Prompt]:
        """One prompt per choice: a text or a list of token ids."""
        value = self.prompt
        if isinstance(value, str):
            return [value]
        if value and all(isinstance(t, int) for t in value):
            return [list(value)]  # type: ignore[arg-type]
        return list(value)  # type: ignore[arg-type]

    def message_chars(self) -> int:
        return sum(len(p) for p in self.prompts() if isinstance(p, str))


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
