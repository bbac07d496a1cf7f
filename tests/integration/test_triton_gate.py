"""The build's last stage: the new repository served by a real Triton, gated on ONNX greedy parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.conftest import ServedRepository, export_tiny_llama
from toolkit.buildsys.config import BuildConfig
from toolkit.buildsys.stage_api import StageContext, StageRecord
from toolkit.stages import triton_gate

pytestmark = pytest.mark.integration


def _context(repo: ServedRepository, onnx: Path, out_dir: Path) -> StageContext:
    config = BuildConfig.model_validate({"model": {"name": repo.model}})
    repository = StageRecord(name="repository", dir=repo.path, key="k", digest="d",
                             metrics={"repository": str(repo.path), "version": 1}, artifacts={}, data={})
    export = StageRecord(name="export_onnx", dir=onnx.parent, key="k", digest="d", metrics={},
                         artifacts={"model": onnx.name}, data={})
    out_dir.mkdir()
    return StageContext(config=config, out_dir=out_dir, inputs={"repository": repository, "export_onnx": export},
                        workspace=out_dir.parent)


def test_gate_passes_when_triton_serves_the_exported_graph(tiny_repository: ServedRepository, tmp_path: Path) -> None:
    result = triton_gate.run(_context(tiny_repository, tiny_repository.onnx, tmp_path / "gate"))
    gate = result.gates[0]
    assert gate.passed and gate.blocking, gate.detail
    assert result.metrics["exact_prompts"] == result.metrics["prompts"] == 9
    outputs = json.loads((tmp_path / "gate" / "triton_gate.json").read_text())
    assert outputs["served"] == outputs["expected"] and sum(map(len, outputs["served"])) > 0


def test_gate_fails_when_the_served_model_differs(tiny_repository: ServedRepository, tmp_path: Path) -> None:
    # The stage compares Triton with the graph the repository serves; compared with another graph (same
    # shapes, other weights), the comparison it gates on must find the difference.
    other = export_tiny_llama(tmp_path / "other", seed=1)
    outcome = triton_gate.serve_and_compare(tiny_repository.path, tiny_repository.model, 1, other,
                                            log_path=tmp_path / "tritonserver.log")
    assert int(outcome["exact_prompts"]) < int(outcome["prompts"])  # type: ignore[call-overload]
    assert float(outcome["token_agreement"]) < 1.0  # type: ignore[arg-type]


def test_real_smollm2_through_triton_equals_onnx_greedy(smollm_repository: ServedRepository, tmp_path: Path) -> None:
    """The real model (real text, a 500-token prompt batched with short ones): token for token."""
    outcome = triton_gate.serve_and_compare(smollm_repository.path, smollm_repository.model, 1,
                                            smollm_repository.onnx, max_new_tokens=12,
                                            log_path=tmp_path / "tritonserver.log")
    assert outcome["served"] == outcome["expected"]
    assert outcome["exact_prompts"] == 9 and outcome["tokens"] > 9
