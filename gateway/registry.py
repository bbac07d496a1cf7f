"""The chat models of the repository: manifest, tokenizer and limits of each, and the default one.

A chat model is a repository model whose version directory holds ``manifest.json`` and
``tokenizer/`` (the generation model); its core models (``<name>_onnx_fp32`` ...) are not listed.
The registry is read at start-up and changed by the admin endpoint, which swaps an entry and the
default in one assignment, so requests in flight keep the entry they started with.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from gateway.error_responses import GatewayError, ModelNotFoundError
from gateway.tokenization import ChatTokenizer
from toolkit.errors import ConfigError, ServingError
from toolkit.repository.layout import generation_instances, generation_models, latest_version_dir, model_parameters
from toolkit.repository.manifest import MANIFEST_FILE, TOKENIZER_DIR, ModelManifest
from toolkit.repository.spec import GenerationLimits

logger = logging.getLogger("gateway")


class RepositoryError(GatewayError):
    """The repository or one of its models cannot be served (start-up or admin-load failure)."""

    status_code = 500
    error_type = "repository_error"


@dataclass(frozen=True)
class ModelEntry:
    """Everything the gateway needs to serve one model version."""

    name: str
    version: int
    manifest: ModelManifest
    tokenizer: ChatTokenizer
    max_new_tokens_limit: int
    created_s: int
    limits: GenerationLimits = GenerationLimits()  # as its config.pbtxt declares them
    instances: int = 1  # Triton instances of the generation model, each with its own limits

    @property
    def accepted_requests(self) -> int:
        """Requests one Triton holds for this model before refusing more as busy."""
        return self.instances * self.limits.accepted_requests

    @property
    def context_length(self) -> int:
        return self.manifest.context_length


def load_entry(repository: Path, name: str, version: int | None = None) -> ModelEntry:
    """Read manifest, tokenizer and limits of `name` (its latest version unless `version` is given)."""
    model_dir = repository / name
    if not model_dir.is_dir():
        raise ModelNotFoundError(f"model '{name}' is not in the repository {repository}", param="model")
    version_dir = model_dir / str(version) if version is not None else latest_version_dir(model_dir)
    if not (version_dir / MANIFEST_FILE).is_file():
        raise ModelNotFoundError(
            f"model '{name}' has no version {version_dir.name} with a {MANIFEST_FILE}", param="model"
        )
    try:
        manifest = ModelManifest.load(version_dir)
    except ValidationError as err:
        problem = err.errors()[0]
        raise RepositoryError(f"{version_dir / MANIFEST_FILE} is not a valid manifest: {problem['msg']}") from None
    tokenizer = ChatTokenizer.from_dir(version_dir / TOKENIZER_DIR, manifest.chat_template)
    try:
        limits = GenerationLimits.from_parameters(model_parameters(repository, name))
        instances = generation_instances(repository, name)
    except ConfigError as err:
        raise RepositoryError(f"model '{name}': {err}") from None
    limit = limits.max_new_tokens_limit or manifest.context_length
    return ModelEntry(
        name=name,
        version=int(version_dir.name),
        manifest=manifest,
        tokenizer=tokenizer,
        max_new_tokens_limit=min(limit, manifest.context_length),
        created_s=int(version_dir.stat().st_mtime),
        limits=limits,
        instances=instances,
    )


def chat_model_names(repository: Path) -> list[str]:
    """The repository's generation models (a manifest in the newest version), sorted by name; [] for none."""
    try:
        return generation_models(repository)
    except ServingError:
        return []


class ModelRegistry:
    """The served models by name, and which one answers requests that name none."""

    def __init__(self, entries: dict[str, ModelEntry], default: str) -> None:
        self._entries = dict(entries)
        self.default = default

    @classmethod
    def from_repository(cls, repository: Path, default: str | None = None) -> ModelRegistry:
        """Load every chat model of `repository`; fail clearly when there is none or `default` is unknown."""
        names = chat_model_names(repository)
        if not names:
            raise RepositoryError(
                f"no chat model in {repository} (no <model>/<version>/{MANIFEST_FILE}); run `toolkit build`"
            )
        if default is not None and default not in names:
            raise RepositoryError(f"GATEWAY_DEFAULT_MODEL '{default}' is not a chat model of {repository}: {names}")
        entries = {name: load_entry(repository, name) for name in names}
        for entry in entries.values():
            logger.info("model %s version %d, context %d", entry.name, entry.version, entry.context_length)
        return cls(entries, default or names[0])

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[ModelEntry]:
        return [self._entries[name] for name in self.names()]

    def get(self, name: str | None) -> ModelEntry:
        """The entry for `name`, or the default; 404 in the OpenAI shape for an unknown name."""
        key = name or self.default
        entry = self._entries.get(key)
        if entry is None:
            raise ModelNotFoundError(
                f"The model '{key}' does not exist; available: {', '.join(self.names())}",
                param="model",
                code="model_not_found",
            )
        return entry

    def install(self, entry: ModelEntry, make_default: bool) -> None:
        """Add or replace an entry (after Triton loaded it); optionally make it the default."""
        self._entries[entry.name] = entry
        if make_default:
            self.default = entry.name
