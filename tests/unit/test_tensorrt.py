"""The tensorrt stage: the generated trtexec invocation, the skip without TensorRT, plan compatibility."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper

from toolkit.buildsys.config import BuildConfig, parse_config
from toolkit.buildsys.stage_api import StageContext, StageRecord
from toolkit.errors import ServingError
from toolkit.repository import plan_compat
from toolkit.repository import plan_script as trt
from toolkit.repository.contract import LMInfo
from toolkit.stages import tensorrt as trt_stage

LM = LMInfo(num_layers=2, num_kv_heads=3, head_dim=8, vocab_size=64)
FAKE_TRTEXEC = """#!/usr/bin/env bash
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec $*"
for arg in "$@"; do case "$arg" in --saveEngine=*) printf 'not a real plan' > "${arg#--saveEngine=}";; esac; done
echo "$@" > "$(dirname "$0")/argv.txt"
"""
FAKE_NVIDIA_SMI = """#!/usr/bin/env bash
echo "NVIDIA A10, 8.6"
"""


def tiny_kv_onnx(path: Path, layers: int = 2, heads: int = 3, dim: int = 8, vocab: int = 64) -> Path:
    """A graph with optimum's KV-cache input/output signature (the nodes are placeholders, never run)."""
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
           for n in ("input_ids", "attention_mask", "position_ids")]
    past = [helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", TensorProto.FLOAT, ["batch", heads, "past", dim])
            for i in range(layers) for kv in ("key", "value")]
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])
    present = [helper.make_tensor_value_info(f"present.{i}.{kv}", TensorProto.FLOAT, ["batch", heads, "total", dim])
               for i in range(layers) for kv in ("key", "value")]
    nodes = [helper.make_node("Identity", [p.name], [q.name]) for p, q in zip(past, present, strict=True)]
    graph = helper.make_graph(nodes, "tiny", ids + past, [logits, *present])
    onnx.save(helper.make_model(graph), str(path))
    return path


def _record(name: str, root: Path, artifacts: dict[str, str], metrics: dict[str, Any] | None = None) -> StageRecord:
    return StageRecord(name=name, dir=root, key="k", digest=f"digest-{name}", metrics=metrics or {},
                       artifacts=artifacts, data={})


def _ctx(tmp_path: Path, config: BuildConfig, qdq: bool = False, qdq_metrics: dict[str, Any] | None = None,
         ) -> StageContext:
    export = tmp_path / "export_onnx"
    export.mkdir()
    tiny_kv_onnx(export / "model.onnx")
    quantize = tmp_path / "quantize"
    quantize.mkdir()
    artifacts = {}
    if qdq:
        tiny_kv_onnx(quantize / "model.qdq.onnx")
        artifacts["qdq"] = "model.qdq.onnx"
    out = tmp_path / "out"
    out.mkdir()
    return StageContext(config=config, out_dir=out, workspace=tmp_path, inputs={
        "export_onnx": _record("export_onnx", export, {"model": "model.onnx"}),
        "quantize": _record("quantize", quantize, artifacts,
                            {"qdq_shipped": qdq} if qdq_metrics is None else qdq_metrics),
    })


def _config(**tensorrt: object) -> BuildConfig:
    return parse_config({"model": {"context_length": 512}, "repository": {"max_batch_size": 6},
                         "tensorrt": {"opt_batch_size": 2, "max_input_len": 200, **tensorrt}})


def _shapes(flag: str, argv: list[str]) -> dict[str, str]:
    spec = next(a for a in argv if a.startswith(f"--{flag}=")).split("=", 1)[1]
    return dict(pair.rsplit(":", 1) for pair in spec.split(","))


def test_command_lists_every_input_with_profile_from_config() -> None:
    profile = trt.kv_cache_profile(LM, max_batch=6, opt_batch=2, max_input_len=200, context_length=512)
    argv = trt.trtexec_command(trtexec="trtexec", onnx="m.onnx", plan="m.plan", timing_cache="t.cache",
                               precision="fp16", profile=profile, workspace_mib=1024)
    assert argv[:5] == ["trtexec", "--onnx=m.onnx", "--saveEngine=m.plan", "--timingCacheFile=t.cache", "--fp16"]
    expected_inputs = ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    mins, opts, maxs = (_shapes(f, argv) for f in ("minShapes", "optShapes", "maxShapes"))
    assert list(mins) == list(opts) == list(maxs) == expected_inputs
    # prefill: up to max_input_len tokens on an empty past; decode: 1 token on up to context-1 past.
    assert (mins["input_ids"], opts["input_ids"], maxs["input_ids"]) == ("1x1", "2x1", "6x200")
    assert (mins["attention_mask"], opts["attention_mask"], maxs["attention_mask"]) == ("1x1", "2x201", "6x512")
    assert maxs["position_ids"] == "6x200"
    for name in expected_inputs[3:]:
        assert (mins[name], opts[name], maxs[name]) == ("1x3x0x8", "2x3x200x8", "6x3x511x8")
    assert "--memPoolSize=workspace:1024" in argv and "--skipInference" in argv


def test_profile_rejects_bounds_outside_the_context() -> None:
    with pytest.raises(ValueError, match="max_input_len"):
        trt.kv_cache_profile(LM, max_batch=4, opt_batch=2, max_input_len=512, context_length=512)
    with pytest.raises(ValueError, match="opt batch"):
        trt.kv_cache_profile(LM, max_batch=4, opt_batch=5, max_input_len=10, context_length=512)


def test_stage_is_unavailable_without_trtexec_and_writes_scripts(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, _config(trtexec="trtexec-not-installed-here"))
    result = trt_stage.run(ctx)
    assert result.status == "unavailable"
    assert "\n" not in result.note
    assert result.note.startswith("TensorRT not found (trtexec not on PATH) — plan build scripts written to ")
    assert "run them on a machine with TensorRT and a GPU; INT8 plan not written: " in result.note
    script = ctx.out_dir / "fp16" / "build_plan.sh"
    assert str(ctx.workspace / "tensorrt" / "fp16" / "build_plan.sh") in result.note  # where it lands, not the temp dir
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n# Builds the TensorRT FP16 plan")
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    assert result.artifacts == {"build_plan_fp16": "fp16/build_plan.sh"}
    assert not (ctx.out_dir / "fp16" / "model.plan").exists()
    # INT8 needs the Q/DQ ONNX, which this quantize stage did not produce.
    assert not (ctx.out_dir / "int8").exists()
    assert any("INT8 plan not written: the quantize stage produced no Q/DQ ONNX" in n
               for n in result.metrics["not_buildable"])
    assert "--maxShapes=input_ids:6x200," in result.metrics["commands"]["fp16"]


def _fake_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("trtexec", FAKE_TRTEXEC), ("nvidia-smi", FAKE_NVIDIA_SMI)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def test_stage_runs_trtexec_and_records_plan_meta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = _fake_tools(tmp_path, monkeypatch)
    ctx = _ctx(tmp_path, _config(), qdq=True)
    result = trt_stage.run(ctx)
    assert result.status == "ran"
    for precision in ("fp16", "int8"):
        meta = json.loads((ctx.out_dir / precision / "plan_meta.json").read_text())
        assert meta["tensorrt_version"] == "10.3.0"
        assert (meta["gpu_name"], meta["compute_capability"]) == ("NVIDIA A10", "8.6")
        assert result.artifacts[f"plan_{precision}"] == f"{precision}/model.plan"
        assert (ctx.out_dir / precision / "reproduce.sh").is_file()
    argv = (bin_dir / "argv.txt").read_text().split()
    assert "--int8" in argv and "--fp16" in argv and any(a.endswith("model.qdq.onnx") for a in argv)


def test_a_qdq_graph_that_failed_its_gate_gets_no_int8_plan(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, _config(trtexec="trtexec-not-installed-here"), qdq=True, qdq_metrics={
        "qdq_shipped": False, "qdq_method": "static_qdq",
        "qdq_failed_gates": ["onnx_qdq_facts_not_worse", "onnx_qdq_perplexity_delta_pct"]})
    result = trt_stage.run(ctx)
    assert set(result.artifacts) == {"build_plan_fp16"}
    assert not (ctx.out_dir / "int8").exists() and "int8" not in result.metrics["commands"]
    assert ("INT8 plan not written: model_qdq.onnx (static_qdq) did not pass its task-quality gate "
            "(onnx_qdq_facts_not_worse, onnx_qdq_perplexity_delta_pct)") in result.note


def test_build_script_runs_and_writes_plan_meta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_tools(tmp_path, monkeypatch)
    profile = trt.kv_cache_profile(LM, max_batch=4, opt_batch=2, max_input_len=16, context_length=64)
    model_dir = tmp_path / "m_trt_fp16"
    script = trt.write_build_script(model_dir / "build_plan.sh", trt.build_script(
        model="m", precision="fp16", default_onnx="../src.onnx", plan="3/model.plan", timing_cache="timing.cache",
        trtexec="trtexec", profile=profile, workspace_mib=512))
    subprocess.run([str(script)], check=True, capture_output=True, cwd=tmp_path)
    assert (model_dir / "3" / "model.plan").is_file()
    meta = plan_compat.load_plan_meta(model_dir / "3")
    assert meta == {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA A10", "compute_capability": "8.6",
                    "build_script": str(script)}
    plan_compat.check_plan_compat(meta, "10.3.0", "NVIDIA A10", "8.6")
    log = (model_dir / "3" / "trtexec.log").read_text()
    assert "--onnx=../src.onnx" in log and shlex.quote("--saveEngine=3/model.plan") in log


def test_build_script_stops_when_the_graphs_external_data_is_not_beside_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph over 2 GiB keeps its weights in model.onnx.data; trtexec reads it from the graph's folder."""
    _fake_tools(tmp_path, monkeypatch)
    profile = trt.kv_cache_profile(LM, max_batch=4, opt_batch=2, max_input_len=16, context_length=64)
    model_dir = tmp_path / "m_trt_fp16"
    (tmp_path / "m_onnx_fp32" / "3").mkdir(parents=True)
    (tmp_path / "m_onnx_fp32" / "3" / "model.onnx").write_bytes(b"graph")
    script = trt.write_build_script(model_dir / "build_plan.sh", trt.build_script(
        model="m", precision="fp16", default_onnx="../m_onnx_fp32/3/model.onnx", plan="3/model.plan",
        timing_cache="timing.cache", trtexec="trtexec", profile=profile, workspace_mib=512,
        external_data=["model.onnx.data"]))
    missing = subprocess.run([str(script)], capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode == 1 and not (model_dir / "3" / "model.plan").exists()
    assert "../m_onnx_fp32/3/model.onnx.data is missing: the weights of ../m_onnx_fp32/3/model.onnx" in missing.stderr
    (tmp_path / "m_onnx_fp32" / "3" / "model.onnx.data").write_bytes(b"weights")
    subprocess.run([str(script)], check=True, capture_output=True, cwd=tmp_path)
    assert (model_dir / "3" / "model.plan").is_file()


def test_plan_compat_refuses_another_tensorrt_or_gpu() -> None:
    meta = {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA A10", "compute_capability": "8.6",
            "build_script": "/repo/m_trt_fp16/build_plan.sh"}
    plan_compat.check_plan_compat(meta, "10.3.0", "NVIDIA A10", "8.6")
    with pytest.raises(ServingError) as err:
        plan_compat.check_plan_compat(meta, "10.5.0", "NVIDIA L4", "8.9")
    assert str(err.value) == (
        "plan built for TensorRT 10.3.0 on NVIDIA A10 sm_86; this server has TensorRT 10.5.0 on NVIDIA L4 sm_89; "
        "rebuild with /repo/m_trt_fp16/build_plan.sh")
    with pytest.raises(ServingError, match="TensorRT 10.3.0 on NVIDIA A10 sm_86; this server has TensorRT 10.3.1"):
        plan_compat.check_plan_compat(meta, "10.3.1", "NVIDIA A10", "8.6")


def test_missing_plan_meta_is_an_actionable_error(tmp_path: Path) -> None:
    with pytest.raises(ServingError, match="plan_meta.json missing: rebuild the plan with its build_plan.sh"):
        plan_compat.load_plan_meta(tmp_path)


@pytest.mark.parametrize(("tag", "version"), [("100300", "10.3.0"), ("101401", "10.14.1"), ("8601", "8.6.1")])
def test_trt_version_from_trtexec_tag(tag: str, version: str) -> None:
    assert plan_compat.trt_version_from_tag(tag) == version


def test_lm_info_from_onnx(tmp_path: Path) -> None:
    assert LMInfo.from_onnx(tiny_kv_onnx(tmp_path / "m.onnx", layers=3, heads=2, dim=4, vocab=10)) == LMInfo(
        num_layers=3, num_kv_heads=2, head_dim=4, vocab_size=10)


def test_serving_verifies_a_plan_against_this_servers_tensorrt_and_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_tools(tmp_path, monkeypatch)  # nvidia-smi reports an NVIDIA A10, sm_86
    profile = trt.kv_cache_profile(LM, max_batch=4, opt_batch=2, max_input_len=16, context_length=64)
    model_dir = tmp_path / "m_trt_fp16"
    with pytest.raises(ServingError, match=r"no TensorRT plan at .*3/model.plan: run .*build_plan.sh"):
        plan_compat.verify_plan_dir(model_dir / "3")
    script = trt.write_build_script(model_dir / "build_plan.sh", trt.build_script(
        model="m", precision="fp16", default_onnx="../src.onnx", plan="3/model.plan", timing_cache="timing.cache",
        trtexec="trtexec", profile=profile, workspace_mib=512))
    subprocess.run([str(script)], check=True, capture_output=True, cwd=tmp_path)

    monkeypatch.setenv("TRT_VERSION", "10.3.0")  # what NVIDIA's containers set
    plan_compat.verify_plan_dir(model_dir / "3")
    monkeypatch.setenv("TRT_VERSION", "10.8.0")
    with pytest.raises(ServingError, match=r"this server has TensorRT 10.8.0 on NVIDIA A10 sm_86; rebuild with"):
        plan_compat.verify_plan_dir(model_dir / "3")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no nvidia-smi, no GPU
    with pytest.raises(ServingError, match=r"is a TensorRT plan but this server has no GPU .*onnx_fp32"):
        plan_compat.verify_plan_dir(model_dir / "3")
