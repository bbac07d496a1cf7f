"""``GET /v1/models`` and the admin endpoint that loads a new model version and makes it the default.

The admin load is the "use my fine-tuned model as the chat backend" flow: `toolkit build` writes a
new version into the repository; ``POST /admin/models/{name}/load`` loads it into every ready
Triton (explicit model control), reads its manifest and tokenizer, and switches the default, with
no restart. Requests already running finish on the entry they started with.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi import APIRouter
from google.protobuf import json_format
from pydantic import BaseModel, ConfigDict, Field
from tritonclient.grpc import model_config_pb2

from gateway.deps import AdminKey, ApiKey, AppState, State
from gateway.error_responses import GatewayError, TritonUnavailableError
from gateway.registry import ModelEntry, load_entry
from gateway.triton import Endpoint, map_triton_error
from toolkit.repository.contract import CONFIG_FILE
from toolkit.repository.layout import bls_core_model
from toolkit.repository.pbtxt import read_config
from toolkit.supervisor.admin_auth import grpc_admin_headers

logger = logging.getLogger("gateway")
router = APIRouter(tags=["models"])


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "triton-chat-toolkit"
    version: int
    context_length: int
    max_tokens: int = Field(description="Most completion tokens one request may ask for.")
    default: bool
    ready: bool


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


def _card(state: AppState, entry: ModelEntry) -> ModelCard:
    ready = any(e.healthy and entry.name in e.ready_models for e in state.pool.endpoints)
    return ModelCard(
        id=entry.name,
        created=entry.created_s,
        version=entry.version,
        context_length=entry.context_length,
        max_tokens=entry.max_new_tokens_limit,
        default=entry.name == state.registry.default,
        ready=ready,
    )


@router.get("/v1/models", response_model=ModelList)
async def list_models(state: State, _: ApiKey) -> ModelList:
    """The chat models of the repository, with their context length."""
    return ModelList(data=[_card(state, entry) for entry in state.registry.entries()])


@router.get("/v1/models/{name}", response_model=ModelCard)
async def get_model(name: str, state: State, _: ApiKey) -> ModelCard:
    """One model (404 when unknown)."""
    return _card(state, state.registry.get(name))


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int | None = Field(default=None, ge=1, description="Default: the newest version directory.")
    make_default: bool = True


class LoadResponse(BaseModel):
    model: str
    version: int
    default: str
    endpoints: list[str]


def _load_config_json(state: AppState, name: str, version: int) -> str:
    """The repository's config of `name` pinned to `version`, as the JSON override Triton's load API takes."""
    config = read_config(state.settings.repository / name / CONFIG_FILE)
    config.version_policy.CopyFrom(
        model_config_pb2.ModelVersionPolicy(specific=model_config_pb2.ModelVersionPolicy.Specific(versions=[version]))
    )
    if not config.name:
        config.name = name
    return json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True))


async def _load_on(state: AppState, endpoint: Endpoint, entry: ModelEntry, pin_version: bool) -> None:
    timeout_s = state.settings.request_timeout_s
    names = [entry.name]
    key = state.settings.triton_admin_key
    admin_headers = grpc_admin_headers(key.get_secret_value() if key else None)
    core = bls_core_model(state.settings.repository, entry.name)
    if core is not None:  # the generation model calls the core model: it must be loaded first
        names.insert(0, core)
    try:
        for name in names:
            config = _load_config_json(state, name, entry.version) if pin_version else None
            await endpoint.client.load_model(name, headers=admin_headers, config=config, client_timeout=timeout_s)
        if not await endpoint.client.is_model_ready(entry.name, client_timeout=state.settings.triton_timeout_s):
            raise TritonUnavailableError(f"Triton at {endpoint.url} loaded {entry.name} but it is not ready")
    except GatewayError:
        raise
    except Exception as err:  # noqa: BLE001 - mapped to the client-facing error
        mapped = map_triton_error(err, endpoint.url)
        raise GatewayError(f"loading {entry.name} on {endpoint.url} failed: {mapped.message}", status_code=502) from err
    endpoint.ready_models.add(entry.name)


@router.post("/admin/models/{name}/load", response_model=LoadResponse, tags=["admin"])
async def load_model(name: str, state: State, _: AdminKey, body: LoadRequest | None = None) -> LoadResponse:
    """Load a model version into every ready Triton and (by default) make it the default model."""
    body = body or LoadRequest()
    async with state.admin_lock:
        entry = await asyncio.to_thread(load_entry, state.settings.repository, name, body.version)
        endpoints = state.pool.healthy()
        if not endpoints:
            raise TritonUnavailableError("no Triton endpoint is ready to load the model", retry_after_s=1)
        await asyncio.gather(*(_load_on(state, e, entry, body.version is not None) for e in endpoints))
        state.pool.watched_models.add(name)
        state.registry.install(entry, make_default=body.make_default)
        logger.info("loaded %s version %d (default: %s)", name, entry.version, state.registry.default)
        return LoadResponse(
            model=name, version=entry.version, default=state.registry.default, endpoints=[e.url for e in endpoints]
        )


def model_summary(state: AppState) -> dict[str, Any]:
    """For logs: models, versions and the default."""
    return {"default": state.registry.default, "models": {e.name: e.version for e in state.registry.entries()}}
