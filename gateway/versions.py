"""``GET /v1/models/{name}/versions``: every version of a model in the repository, with its build facts.

Read from the repository on each call, so a version a new build just wrote is listed before it
is loaded: the chat page's models panel shows it with its scores and gates, and its "Use as
default" button loads it through ``POST /admin/models/{name}/load``. ``serving`` marks the
version the gateway answers with now; ``default`` marks it when the model is also the default.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fastapi import APIRouter
from pydantic import BaseModel, Field, ValidationError

from gateway.deps import ApiKey, AppState, State
from gateway.error_responses import ModelNotFoundError
from gateway.registry import chat_model_names
from toolkit.repository.manifest import MANIFEST_FILE, BuildFacts, ModelManifest

logger = logging.getLogger("gateway")
router = APIRouter(tags=["models"])


class VersionCard(BaseModel):
    version: int
    built_at: str
    base_model: str
    toolkit_version: str
    context_length: int
    precisions: list[str]
    serving_core_model: str
    adapter_sha256: str | None
    build: BuildFacts | None = Field(
        description="Evaluation scores (fact_accuracy_*_after, retention_after, bleu4_after, rouge_l_after, ...) "
        "and the fidelity gates of the build; null for builds that did not record them.",
    )
    serving: bool = Field(description="The gateway answers requests for this model with this version.")
    default: bool = Field(description="Serving, and the model is the gateway's default.")


class VersionList(BaseModel):
    object: str = "list"
    model: str
    data: list[VersionCard]


def _manifests(model_dir: Path) -> list[ModelManifest]:
    found = []
    for version_dir in sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()),
                              key=lambda p: int(p.name)):
        if not (version_dir / MANIFEST_FILE).is_file():
            continue
        try:
            found.append(ModelManifest.load(version_dir))
        except (ValidationError, ValueError, OSError) as err:  # one bad version must not hide the others
            logger.warning("skipping %s: unreadable manifest (%s)", version_dir, str(err).splitlines()[0])
    return found


def _cards(state: AppState, name: str) -> list[VersionCard]:
    repository = state.settings.repository
    if name not in chat_model_names(repository):
        raise ModelNotFoundError(f"The model '{name}' is not a chat model of the repository", param="name",
                                 code="model_not_found")
    try:
        serving = state.registry.get(name).version
    except ModelNotFoundError:
        serving = None  # on disk, never loaded
    return [
        VersionCard(
            version=m.version, built_at=m.built_at, base_model=m.base_model, toolkit_version=m.toolkit_version,
            context_length=m.context_length, precisions=m.precisions, serving_core_model=m.serving_core_model,
            adapter_sha256=m.adapter_sha256, build=m.build, serving=m.version == serving,
            default=m.version == serving and name == state.registry.default,
        )
        for m in _manifests(repository / name)
    ]


@router.get("/v1/models/{name}/versions", response_model=VersionList,
            responses={404: {"description": "Not a chat model of the repository"}})
async def list_versions(name: str, state: State, _: ApiKey) -> VersionList:
    """Every version of `name` in the repository, oldest first, with its build facts."""
    return VersionList(model=name, data=await asyncio.to_thread(_cards, state, name))
