"""Gateway settings: one ``BaseSettings`` read from ``GATEWAY_*`` environment variables.

Everything is validated when the settings are built, which ``create_app`` does before the server
accepts a connection: a missing repository, an unreadable key file or an empty Triton list stops
the start-up with one clear message instead of failing the first request.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, PositiveFloat, PositiveInt, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MIN_API_KEY_CHARS = 8


def _split_list(value: Any) -> Any:
    """Accept a JSON list (``'["a:8001", "b:8001"]'``) or a comma-separated string for list settings."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


class GatewaySettings(BaseSettings):
    """Every knob of the gateway; environment variables are ``GATEWAY_<FIELD>`` (case-insensitive)."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="forbid", validate_default=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)

    triton_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1:8001"],
        description="Triton gRPC endpoints (host:port); requests are spread across the ready ones.",
    )
    repository: Path = Field(default=Path("model_repository"), description="The Triton model repository.")
    default_model: str | None = Field(
        default=None, description="Model used when a request names none; default: the only (or first) chat model."
    )

    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Accepted Bearer keys; none (and no file) means no auth."
    )
    api_keys_file: Path | None = Field(default=None, description="File with one key per line; # starts a comment.")
    admin_api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Keys for /admin; empty means any accepted API key."
    )
    open_health: bool = Field(default=True, description="Serve /health/* without a key.")
    open_metrics: bool = Field(default=True, description="Serve /metrics without a key.")

    max_in_flight: PositiveInt = Field(default=64, description="Generation requests in flight; past it, 429.")
    retry_after_s: PositiveInt = Field(default=1, description="Retry-After sent with an overload 429.")
    request_timeout_s: PositiveFloat = Field(default=300.0, description="Deadline of one generation on Triton.")
    triton_timeout_s: PositiveFloat = Field(default=5.0, description="Deadline of health and admin calls.")
    health_interval_s: PositiveFloat = Field(default=2.0, description="How often each Triton endpoint is probed.")
    rate_limit_requests_per_minute: PositiveInt | None = Field(default=None, description="Per key; None: no limit.")
    rate_limit_tokens_per_minute: PositiveInt | None = Field(
        default=None, description="Prompt plus completion tokens per key and minute; None: no limit."
    )
    max_body_bytes: PositiveInt = Field(default=1 << 20, description="Larger request bodies get 413 unread.")
    max_stop_strings: PositiveInt = 4
    sse_ping_s: PositiveFloat = Field(
        default=15.0, description="Seconds between keep-alive comment lines (`: ping`) in an idle stream."
    )

    @field_validator("triton_urls", "api_keys", "admin_api_keys", mode="before")
    @classmethod
    def _lists_from_env(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("triton_urls")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        cleaned = [url.strip().removeprefix("grpc://") for url in urls if url.strip()]
        if not cleaned:
            raise ValueError("set at least one Triton gRPC endpoint (GATEWAY_TRITON_URLS), e.g. 127.0.0.1:8001")
        for url in cleaned:
            host, _, port = url.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"Triton endpoint {url!r} must be host:port (the gRPC port)")
        if len(set(cleaned)) != len(cleaned):
            raise ValueError("GATEWAY_TRITON_URLS lists an endpoint twice")
        return cleaned

    @field_validator("repository")
    @classmethod
    def _check_repository(cls, path: Path) -> Path:
        if not path.is_dir():
            raise ValueError(f"model repository {path} is not a directory (GATEWAY_REPOSITORY); run `toolkit build`")
        return path.resolve()

    @field_validator("api_keys", "admin_api_keys")
    @classmethod
    def _check_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        for key in keys:
            if len(key.get_secret_value()) < MIN_API_KEY_CHARS:
                raise ValueError(f"API keys must have at least {MIN_API_KEY_CHARS} characters")
        return keys

    @model_validator(mode="after")
    def _load_key_file(self) -> GatewaySettings:
        if self.api_keys_file is not None:
            try:
                lines = self.api_keys_file.read_text().splitlines()
            except OSError as err:
                raise ValueError(f"cannot read GATEWAY_API_KEYS_FILE {self.api_keys_file}: {err.strerror}") from None
            keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
            if not keys:
                raise ValueError(f"GATEWAY_API_KEYS_FILE {self.api_keys_file} holds no key")
            self.api_keys = self._check_keys([*self.api_keys, *(SecretStr(k) for k in keys)])
        return self

    def accepted_keys(self) -> frozenset[str]:
        """Every API key accepted for the API routes (admin keys included)."""
        return frozenset(k.get_secret_value() for k in [*self.api_keys, *self.admin_api_keys])

    def admin_keys(self) -> frozenset[str]:
        """Keys accepted on /admin: the admin keys, or every API key when none is set."""
        keys = self.admin_api_keys or self.api_keys
        return frozenset(k.get_secret_value() for k in keys)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys or self.admin_api_keys)
