"""Gateway settings: one ``BaseSettings`` read from ``GATEWAY_*`` environment variables.

Everything is validated when the settings are built, which ``create_app`` does before the server
accepts a connection: a missing repository, an unreadable key file or an empty Triton list stops
the start-up with one clear message instead of failing the first request.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, PositiveFloat, PositiveInt, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MIN_API_KEY_CHARS = 16
MIN_DISTINCT_KEY_CHARS = 8
# Words of published example keys ("change-me-0123456789abcdef"): such a key is known to everyone.
_PLACEHOLDER = re.compile(r"change[-_ ]?me|placeholder|example|your[-_]?(api[-_]?)?key|replace[-_]?me|x{6}", re.I)
KEY_HINT = "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def check_key(key: str, what: str) -> None:
    """Refuse a short, low-variety or placeholder key; the message never contains the key."""
    if len(key) < MIN_API_KEY_CHARS:
        raise ValueError(f"{what} must have at least {MIN_API_KEY_CHARS} characters; {KEY_HINT}")
    if _PLACEHOLDER.search(key):
        raise ValueError(f"{what} holds a placeholder key (a published example, known to anyone); {KEY_HINT}")
    if len(set(key)) < MIN_DISTINCT_KEY_CHARS:
        raise ValueError(f"{what} holds a key of fewer than {MIN_DISTINCT_KEY_CHARS} distinct characters; {KEY_HINT}")


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

    # hide_input_in_errors: a validation error must never print a value (it can be a key).
    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_", extra="forbid", validate_default=True, hide_input_in_errors=True
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)

    triton_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1:8001"],
        description="Triton gRPC endpoints (host:port); a host name stands for every address it resolves to "
        "(a Kubernetes headless Service: every ready Triton pod). Each request goes to the least loaded ready one.",
    )
    triton_resolve_interval_s: PositiveFloat = Field(
        default=5.0, description="How often host names in TRITON_URLS are resolved again (pods come and go)."
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
        default_factory=list, description="Keys for /admin (none: /admin is closed); never the API keys."
    )
    admin_api_keys_file: Path | None = Field(default=None, description="File with one admin key per line.")
    triton_admin_key: SecretStr | None = Field(
        default=None,
        description="Secret header Triton's model-control API expects (`toolkit serve` generates one per run); "
        "sent on admin loads only.",
    )
    enable_docs: bool = Field(default=True, description="Serve /docs, /redoc and /openapi.json.")
    trusted_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host headers accepted while auth is off (DNS-rebinding guard); default: loopback names and "
        "GATEWAY_HOST. '*' accepts any.",
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
    max_messages: PositiveInt = Field(default=256, description="Most messages in one request.")
    max_message_chars: PositiveInt = Field(
        default=200_000, description="Most characters in all messages of one request together."
    )
    max_in_flight_per_key: PositiveInt | None = Field(
        default=None, description="Generation requests in flight per API key (or client address); None: no cap."
    )
    rate_limit_max_keys: PositiveInt = Field(
        default=10_000, description="Callers whose rate-limit state is kept (least recently seen dropped first)."
    )
    grpc_keepalive_s: float = Field(
        default=30.0, ge=10.0, description="HTTP/2 keepalive ping interval on Triton channels while a call is open."
    )
    token_idle_timeout_s: PositiveFloat = Field(
        default=60.0, description="Longest wait for Triton's next response in a generation (first one included)."
    )
    sse_ping_s: PositiveFloat = Field(
        default=15.0, description="Seconds between keep-alive comment lines (`: ping`) in an idle stream."
    )

    @field_validator("triton_urls", "api_keys", "admin_api_keys", "trusted_hosts", mode="before")
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
    def _check_keys(cls, keys: list[SecretStr], info: Any) -> list[SecretStr]:
        what = f"GATEWAY_{info.field_name.upper()}"
        for key in keys:
            check_key(key.get_secret_value(), what)
        return keys

    @field_validator("triton_admin_key")
    @classmethod
    def _check_triton_key(cls, key: SecretStr | None) -> SecretStr | None:
        if key is not None:
            check_key(key.get_secret_value(), "GATEWAY_TRITON_ADMIN_KEY")
        return key

    @staticmethod
    def _keys_from_file(path: Path, variable: str) -> list[SecretStr]:
        try:
            lines = path.read_text().splitlines()
        except OSError as err:
            raise ValueError(f"cannot read {variable} {path}: {err.strerror}") from None
        keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not keys:
            raise ValueError(f"{variable} {path} holds no key; {KEY_HINT} >> {path}")
        for key in keys:
            check_key(key, variable)
        return [SecretStr(k) for k in keys]

    @model_validator(mode="after")
    def _load_key_files(self) -> GatewaySettings:
        if self.api_keys_file is not None:
            self.api_keys = [*self.api_keys, *self._keys_from_file(self.api_keys_file, "GATEWAY_API_KEYS_FILE")]
        if self.admin_api_keys_file is not None:
            self.admin_api_keys = [
                *self.admin_api_keys, *self._keys_from_file(self.admin_api_keys_file, "GATEWAY_ADMIN_API_KEYS_FILE")
            ]
        api = {k.get_secret_value() for k in self.api_keys}
        if any(k.get_secret_value() in api for k in self.admin_api_keys):
            raise ValueError("a key is both an API key and an admin key; admin keys must be separate")
        return self

    def accepted_keys(self) -> frozenset[str]:
        """Every API key accepted for the API routes (admin keys included)."""
        return frozenset(k.get_secret_value() for k in [*self.api_keys, *self.admin_api_keys])

    def admin_keys(self) -> frozenset[str]:
        """Keys accepted on /admin: the admin keys only (none: /admin is closed); never the API keys."""
        return frozenset(k.get_secret_value() for k in self.admin_api_keys)

    def allowed_hosts(self) -> list[str] | None:
        """Host headers to accept, or None for any: auth on (keys guard), or ``*`` listed."""
        if self.auth_enabled or "*" in self.trusted_hosts:
            return None
        if self.trusted_hosts:
            return [h.lower() for h in self.trusted_hosts]
        bound = [] if self.host in ("0.0.0.0", "::", "") else [self.host.strip("[]").lower()]
        return [*LOOPBACK_HOSTS, *bound]

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys or self.admin_api_keys)
