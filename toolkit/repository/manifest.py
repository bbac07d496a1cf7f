"""The repository manifest: what the gateway and the serving model need to know about a build.

Written by the repository stage to ``<repository>/<model>/<version>/manifest.json``; read by the
generation model (stop ids, context) and the gateway (tokenizer, chat template, context, and the
build facts its models panel shows). Depends only on pydantic so the gateway image does not need
the build stack. Fields added later have defaults, so older manifests still load.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from toolkit.errors import ServingError

MANIFEST_FILE = "manifest.json"
TOKENIZER_DIR = "tokenizer"  # beside manifest.json: tokenizer.json, tokenizer_config.json, chat_template.jinja, ...


class ArtifactRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str  # relative to the repository root
    sha256: str


# The evaluate stage's key scores, copied into the manifest when the build has them (all optional).
BUILD_METRICS = tuple(
    f"{name}_{when}"
    for name in ("fact_accuracy_en", "fact_accuracy_zh", "retention", "bleu4", "rouge_l")
    for when in ("after", "before")
)


class GateSummary(BaseModel):
    """One fidelity gate of the build, as the stage recorded it."""

    model_config = ConfigDict(extra="forbid")
    stage: str
    name: str
    passed: bool
    blocking: bool = True
    value: float | str | None = None
    threshold: float | str | None = None


class BuildFacts(BaseModel):
    """What the build measured about this version: evaluation scores and the gates it passed."""

    model_config = ConfigDict(extra="forbid")
    metrics: dict[str, float] = Field(default_factory=dict, description=f"Any of {', '.join(BUILD_METRICS)}.")
    gates: list[GateSummary] = Field(default_factory=list)

    @property
    def gates_passed(self) -> bool:
        return all(g.passed for g in self.gates if g.blocking)


class ModelManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_name: str
    version: int
    base_model: str
    adapter_sha256: str | None
    toolkit_version: str
    built_at: str
    context_length: int
    vocab_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    bos_token_id: int | None
    eos_token_ids: list[int]
    stop_token_ids: list[int]
    pad_token_id: int
    chat_template: str
    chat_template_sha256: str
    serving_core_model: str = Field(description="Repository model the generation model runs (e.g. <name>_onnx_fp32).")
    artifacts: dict[str, ArtifactRef] = Field(default_factory=dict)
    precisions: list[str] = Field(default_factory=list, description="Core models shipped, e.g. onnx_fp32, onnx_int8.")
    build: BuildFacts | None = Field(default=None, description="Scores and gates of the build (None: not recorded).")

    def save(self, version_dir: Path) -> None:
        # Without facts the file is what it was before the field existed, so older readers load it too.
        exclude = {"build"} if self.build is None else None
        (version_dir / MANIFEST_FILE).write_text(self.model_dump_json(indent=2, exclude=exclude) + "\n")

    @classmethod
    def load(cls, version_dir: Path) -> ModelManifest:
        path = version_dir / MANIFEST_FILE
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ServingError(f"no {MANIFEST_FILE} in {version_dir}: is this a toolkit-built repository?") from None
