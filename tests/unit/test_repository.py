"""The model repository: layout, manifest, versions, pruning, atomicity, INT8 left out, the stage itself.

The ONNX files are small stand-ins: the repository only links them, nothing here runs them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from toolkit.buildsys.config import RepositorySection, ServingSection, TensorRTSection, parse_config
from toolkit.buildsys.stage_api import StageContext, StageRecord
from toolkit.errors import StageError
from toolkit.files import sha256_file, sha256_text
from toolkit.repository import contract as c
from toolkit.repository import writer as r
from toolkit.repository.manifest import ModelManifest
from toolkit.repository.pbtxt import read_config
from toolkit.repository.spec import RepositorySpec
from toolkit.stages import model_repository
from toolkit.stages.model_repository import build_facts, plan_spec, repository_spec

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Hugging Face directory: Llama config, a word-level tokenizer with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("merged")
    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "unk_token": "<unk>", "chat_template": TEMPLATE}))
    (root / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (root / "chat_template.jinja").write_text(TEMPLATE)
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4], "bos_token_id": 1}))
    (root / "config.json").write_text(json.dumps({
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 32,
        "vocab_size": 5}))
    return root


def _graph(path: Path, name: str, external: bool = False) -> Path:
    """A valid ONNX file named `name` inside (so two stand-ins differ); its weight as external data if asked."""
    import numpy as np
    from onnx import helper, numpy_helper, save

    weight = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "weight")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "weight"], ["y"])], name,
                              [helper.make_tensor_value_info("x", 1, [1, 64])],
                              [helper.make_tensor_value_info("y", 1, [1, 64])], [weight])
    save(helper.make_model(graph), str(path), save_as_external_data=external, location=f"{path.name}.data",
         size_threshold=0)
    return path


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    _graph(tmp_path / "fp32.onnx", "fp32 graph stand-in")
    _graph(tmp_path / "int8.onnx", "int8 graph stand-in")
    (tmp_path / "model.py").write_text("# generation model stand-in\n")
    return {"fp32": tmp_path / "fp32.onnx", "int8": tmp_path / "int8.onnx", "model_py": tmp_path / "model.py"}


def _spec(repository: RepositorySection | None = None, serving: ServingSection | None = None) -> RepositorySpec:
    return repository_spec(repository or RepositorySection(), serving or ServingSection(), context_length=256)


def _write(out: Path, merged: Path, src: dict[str, Path], repository: RepositorySection | None = None,
           **kw: Any) -> r.RepositoryWrite:
    return r.write_repository(out, model_name="tiny", merged_dir=merged, onnx_fp32=src["fp32"],
                              model_py=src["model_py"], base_model="dir:/base", adapter_sha256="ab" * 32,
                              spec=_spec(repository), **kw)


def _versions(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.iterdir() if p.is_dir())


def test_layout_configs_and_manifest(tmp_path: Path, merged_dir: Path, sources: dict[str, Path]) -> None:
    out = tmp_path / "repo"
    out.mkdir()
    (out / "README.md").write_text("keep me")
    written = _write(out, merged_dir, sources)
    assert written.version == 1
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "tiny", "tiny_onnx_fp32"]
    assert (out / "README.md").read_text() == "keep me"
    gen = out / "tiny" / "1"
    assert (gen / "model.py").read_text() == "# generation model stand-in\n"
    assert sorted(p.name for p in (gen / "tokenizer").iterdir()) == [
        "chat_template.jinja", "generation_config.json", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json"]
    onnx = out / "tiny_onnx_fp32" / "1" / "model.onnx"
    assert os.stat(onnx).st_ino == os.stat(sources["fp32"]).st_ino  # hard link, not a copy

    config = read_config(out / "tiny" / "config.pbtxt")
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params == {c.PARAM_CORE_MODEL: "tiny_onnx_fp32", c.PARAM_RUNNER: "onnxruntime", c.PARAM_MAX_ACTIVE: "32",
                      c.PARAM_MAX_QUEUE: "256", c.PARAM_MAX_NEW_TOKENS: "1024",
                      c.PARAM_GRAMMAR_TIMEOUT: "10"}
    core = read_config(out / "tiny_onnx_fp32" / "config.pbtxt")
    assert core.platform == "onnxruntime_onnx" and len(core.input) == 3 + 2 * 2
    assert list(core.dynamic_batching.preferred_batch_size) == [4, 8] and core.max_batch_size == 8

    manifest = ModelManifest.load(gen)
    assert (manifest.model_name, manifest.version, manifest.base_model) == ("tiny", 1, "dir:/base")
    assert manifest.adapter_sha256 == "ab" * 32
    assert (manifest.context_length, manifest.num_layers, manifest.num_kv_heads, manifest.head_dim) == (256, 2, 2, 8)
    assert manifest.stop_token_ids == [2, 4] and manifest.eos_token_ids[0] == 2
    assert manifest.chat_template == TEMPLATE and manifest.chat_template_sha256 == sha256_text(TEMPLATE)
    assert manifest.serving_core_model == "tiny_onnx_fp32" and manifest.precisions == ["onnx_fp32"]
    assert manifest.artifacts["onnx_fp32"].path == "tiny_onnx_fp32/1/model.onnx"
    for ref in manifest.artifacts.values():
        assert sha256_file(out / ref.path) == ref.sha256
    assert written.version_dirs == [out / "tiny_onnx_fp32" / "1", gen]


def test_new_build_writes_next_version_and_prunes(tmp_path: Path, merged_dir: Path, sources: dict[str, Path]) -> None:
    out = tmp_path / "repo"
    repo = RepositorySection(keep_versions=2)
    for expected in (1, 2, 3):
        written = _write(out, merged_dir, sources, repository=repo)
        assert written.version == expected
    assert _versions(out / "tiny") == ["2", "3"] and _versions(out / "tiny_onnx_fp32") == ["2", "3"]
    assert ModelManifest.load(out / "tiny" / "3").version == 3
    assert [p.name for p in written.pruned] == ["1", "1"]


def test_a_graph_with_external_data_takes_its_data_file_into_the_version(tmp_path: Path, merged_dir: Path,
                                                                       sources: dict[str, Path]) -> None:
    """torch.onnx writes a graph over 2 GiB as model.onnx + model.onnx.data; the version must hold both."""
    import onnxruntime as ort
    from onnx import numpy_helper

    from toolkit.model_io.onnx_files import load_graph

    (tmp_path / "export").mkdir()
    big = _graph(tmp_path / "export" / "model.onnx", "external", external=True)
    assert (tmp_path / "export" / "model.onnx.data").is_file()
    out = tmp_path / "repo"
    written = _write(out, merged_dir, {**sources, "fp32": big})
    version = out / "tiny_onnx_fp32" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert written.manifest.artifacts["onnx_fp32/model.onnx.data"].sha256 == sha256_file(version / "model.onnx.data")
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": [[1.0] + [0.0] * 63]})
    assert y[0][:3].tolist() == [0.0, 1.0, 2.0]  # the weight's first row, read from the linked data file
    # The serving graph reads small external tensors itself: onnx's own reader refuses a hard-linked data file.
    assert (version / "model.onnx.data").stat().st_nlink == 2
    graph = load_graph(version / "model.onnx", inline_below_bytes=1 << 20)
    assert numpy_helper.to_array(graph.graph.initializer[0])[0, :3].tolist() == [0.0, 1.0, 2.0]


def test_a_graph_whose_external_data_is_missing_is_named(tmp_path: Path, merged_dir: Path,
                                                          sources: dict[str, Path]) -> None:
    (tmp_path / "export").mkdir()
    big = _graph(tmp_path / "export" / "model.onnx", "external", external=True)
    (tmp_path / "export" / "model.onnx.data").unlink()
    with pytest.raises(StageError, match=r"external data .*model\.onnx\.data that does not exist"):
        _write(tmp_path / "repo", merged_dir, {**sources, "fp32": big})
    assert not (tmp_path / "repo" / "tiny_onnx_fp32" / "1").exists()


def test_int8_shipped_and_chosen(tmp_path: Path, merged_dir: Path, sources: dict[str, Path]) -> None:
    out = tmp_path / "repo"
    written = _write(out, merged_dir, sources, onnx_int8=sources["int8"],
                     repository=RepositorySection(serving_precision="onnx_int8"))
    assert (out / "tiny_onnx_int8" / "1" / "model.onnx").read_bytes() == sources["int8"].read_bytes()
    assert written.manifest.serving_core_model == "tiny_onnx_int8"
    assert written.manifest.precisions == ["onnx_fp32", "onnx_int8"]
    assert read_config(out / "tiny" / "config.pbtxt").parameters[c.PARAM_CORE_MODEL].string_value == "tiny_onnx_int8"


def test_int8_not_shipped_falls_back_to_fp32(tmp_path: Path, merged_dir: Path, sources: dict[str, Path]) -> None:
    out = tmp_path / "repo"
    written = _write(out, merged_dir, sources, repository=RepositorySection(serving_precision="onnx_int8"))
    assert not (out / "tiny_onnx_int8").exists()
    assert written.manifest.serving_core_model == "tiny_onnx_fp32"
    assert any("runs onnx_fp32" in n for n in written.notes)


def test_serving_precision_auto_serves_int8_only_when_shipped(
    tmp_path: Path, merged_dir: Path, sources: dict[str, Path],
) -> None:
    auto = RepositorySection(serving_precision="auto")
    shipped = _write(tmp_path / "a", merged_dir, sources, onnx_int8=sources["int8"], repository=auto)
    assert shipped.manifest.serving_core_model == "tiny_onnx_int8"
    failed = _write(tmp_path / "b", merged_dir, sources, repository=auto)
    assert failed.manifest.serving_core_model == "tiny_onnx_fp32" and not (tmp_path / "b" / "tiny_onnx_int8").exists()
    default = _write(tmp_path / "c", merged_dir, sources, onnx_int8=sources["int8"], repository=RepositorySection())
    assert default.manifest.serving_core_model == "tiny_onnx_int8"  # the default is auto: a passed INT8 serves
    fp32 = _write(tmp_path / "d", merged_dir, sources, onnx_int8=sources["int8"],
                  repository=RepositorySection(serving_precision="fp32"))
    assert fp32.manifest.serving_core_model == "tiny_onnx_fp32"  # fp32 serves FP32...
    assert fp32.manifest.precisions == ["onnx_fp32", "onnx_int8"]  # ...and still ships the INT8 that passed


def test_serving_int8_that_failed_its_gate_is_an_error(tmp_path: Path, merged_dir: Path,
                                                       sources: dict[str, Path]) -> None:
    with pytest.raises(StageError, match="serving_precision is int8 but the INT8 variant did not pass"):
        _write(tmp_path / "repo", merged_dir, sources, repository=RepositorySection(serving_precision="int8"))
    assert not (tmp_path / "repo" / "tiny").exists()
    with pytest.raises(StageError, match=r"\(failed onnx_int8_general_not_worse\)"):
        r.served_core_precision("int8", int8_shipped=False, why_not="failed onnx_int8_general_not_worse")
    assert r.served_core_precision("int8", int8_shipped=True) == "onnx_int8"


def test_old_serving_precision_names_still_load() -> None:
    assert RepositorySection(serving_precision="onnx_fp32").serving_precision == "fp32"
    assert RepositorySection(serving_precision="onnx_int8").serving_precision == "auto"  # it fell back to fp32


def test_failure_mid_write_leaves_no_half_version(
    tmp_path: Path, merged_dir: Path, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "repo"
    _write(out, merged_dir, sources)
    config_before = (out / "tiny" / "config.pbtxt").read_text()

    def boom(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(r, "_copy_tokenizer", boom)  # fails inside the generation model's version dir
    with pytest.raises(OSError, match="disk full"):
        _write(out, merged_dir, sources, repository=RepositorySection(max_batch_size=4, preferred_batch_sizes=[4]))
    assert _versions(out / "tiny") == ["1"] and _versions(out / "tiny_onnx_fp32") == ["1"]
    assert not [p for p in out.rglob(".*tmp-*")]
    assert (out / "tiny" / "config.pbtxt").read_text() == config_before
    monkeypatch.undo()
    assert _write(out, merged_dir, sources).version == 2


def test_a_core_version_a_killed_build_left_is_removed_by_the_next_write(
    tmp_path: Path, merged_dir: Path, sources: dict[str, Path]
) -> None:
    """A SIGKILL skips the rollback: a core model's version 2 without the generation model's version 2."""
    out = tmp_path / "repo"
    _write(out, merged_dir, sources)
    orphan = out / "tiny_onnx_fp32" / "2"
    orphan.mkdir()
    (orphan / "model.onnx").write_bytes(b"half written")
    written = _write(out, merged_dir, sources)
    assert written.version == 2 and _versions(out / "tiny_onnx_fp32") == ["1", "2"]
    assert (orphan / "model.onnx").read_bytes() == sources["fp32"].read_bytes()
    assert written.manifest.artifacts["onnx_fp32"].sha256 == sha256_file(orphan / "model.onnx")


def test_failed_first_build_leaves_nothing(
    tmp_path: Path, merged_dir: Path, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "repo"
    out.mkdir()
    (out / "README.md").write_text("keep me")

    def boom(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(r, "_copy_tokenizer", boom)
    inputs = r.TrtInputs(plan=plan_spec(TensorRTSection(max_input_len=100)))
    with pytest.raises(OSError, match="disk full"):
        _write(out, merged_dir, sources, onnx_int8=sources["int8"], trt_inputs=inputs)
    assert sorted(p.name for p in out.iterdir()) == ["README.md"]


def test_missing_generation_model_source_is_a_clear_error(tmp_path: Path, merged_dir: Path,
                                                           sources: dict[str, Path]) -> None:
    with pytest.raises(StageError, match="triton_model/model.py"):
        r.write_repository(tmp_path / "repo", model_name="tiny", merged_dir=merged_dir, onnx_fp32=sources["fp32"],
                           spec=_spec(), model_py=tmp_path / "nope" / "model.py")
    with pytest.raises(StageError, match="ONNX model .* not found"):
        _write(tmp_path / "repo", merged_dir, {**sources, "fp32": tmp_path / "missing.onnx"})
    assert not (tmp_path / "repo" / "tiny").exists()


def test_tensorrt_models_get_config_and_build_script(tmp_path: Path, merged_dir: Path,
                                                     sources: dict[str, Path]) -> None:
    out = tmp_path / "repo"
    built = tmp_path / "built_fp16"
    built.mkdir()
    (built / "model.plan").write_bytes(b"plan stand-in")
    (built / "plan_meta.json").write_text('{"tensorrt_version": "10.3.0"}')
    inputs = r.TrtInputs(plan=plan_spec(TensorRTSection(max_input_len=100)), qdq_onnx=sources["int8"],
                         built={"fp16": built})
    written = _write(out, merged_dir, sources, trt_inputs=inputs)
    fp16, int8 = out / "tiny_trt_fp16", out / "tiny_trt_int8"
    assert read_config(fp16 / "config.pbtxt").platform == "tensorrt_plan"
    assert (fp16 / "1" / "model.plan").read_bytes() == b"plan stand-in" and (fp16 / "1" / "plan_meta.json").is_file()
    script = (fp16 / "build_plan.sh").read_text()
    assert 'ONNX="${1:-../tiny_onnx_fp32/1/model.onnx}"' in script and "--saveEngine=1/model.plan" in script
    assert "--fp16" in script and "past_key_values.1.value:8x2x255x8" in script
    assert _versions(int8) == []  # no plan built: config + script only, so Triton sees no half version
    int8_script = (int8 / "build_plan.sh").read_text()
    assert "--int8" in int8_script and str(sources["int8"]) in int8_script
    assert written.manifest.precisions == ["onnx_fp32", "trt_fp16"]
    assert any("tiny_trt_int8: no plan built here" in n for n in written.notes)


def _record(name: str, root: Path, artifacts: dict[str, str], metrics: dict[str, Any] | None = None) -> StageRecord:
    return StageRecord(name=name, dir=root, key="k", digest=f"digest-{name}", metrics=metrics or {},
                       artifacts=artifacts, data={})


def test_stage_run(tmp_path: Path, merged_dir: Path, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(r, "MODEL_PY_SOURCE", sources["model_py"])
    adapter = tmp_path / "finetune" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"lora")
    trt_dir = tmp_path / "tensorrt"
    (trt_dir / "fp16").mkdir(parents=True)
    config = parse_config({"model": {"name": "tiny", "context_length": 256},
                           "repository": {"output": str(tmp_path / "repo")}, "tensorrt": {"max_input_len": 100}})
    ctx = StageContext(config=config, out_dir=tmp_path / "out", workspace=tmp_path, inputs={
        "base_model": _record("base_model", tmp_path, {}, {"source": "gguf:/x.gguf"}),
        "finetune": _record("finetune", tmp_path / "finetune", {"adapter": "adapter"}),
        "evaluate": _record("evaluate", tmp_path, {}, {"retention_after": 0.75}),
        "merge": _record("merge", merged_dir, {"model": "."}),
        "export_onnx": _record("export_onnx", tmp_path, {"model": "fp32.onnx"}),
        "quantize": _record("quantize", tmp_path, {"int8": "int8.onnx"}, {"int8_shipped": False}),
        "tensorrt": _record("tensorrt", trt_dir, {"build_plan_fp16": "fp16/build_plan.sh"}),
    })
    ctx.out_dir.mkdir()
    result = model_repository.run(ctx)
    repo = tmp_path / "repo"
    assert result.external == [str((repo / rel).resolve()) for rel in (
        "tiny_onnx_fp32/1", "tiny/1", "tiny_onnx_fp32/config.pbtxt", "tiny_trt_fp16/config.pbtxt", "tiny/config.pbtxt",
        "tiny_trt_fp16/build_plan.sh")]
    assert "onnx_int8 left out of the repository" in result.note
    assert not (repo / "tiny_onnx_int8").exists()
    manifest = ModelManifest.load(repo / "tiny" / "1")
    assert manifest.build is not None and manifest.build.metrics == {"retention_after": 0.75}
    assert manifest.adapter_sha256 == sha256_file(adapter / "adapter_model.safetensors")
    assert manifest.base_model == "gguf:/x.gguf"
    assert result.metrics["models"] == ["tiny_onnx_fp32", "tiny_trt_fp16", "tiny"]
    rows = {row["kv_dtype"]: row for row in result.metrics["capacity"]["rows"]}
    assert rows["fp32"]["kv_bytes_per_token"] == 2 * 2 * 2 * 8 * 4
    assert (ctx.out_dir / "capacity.md").read_text().startswith("Capacity at context 256")


def _stage_ctx(tmp_path: Path, merged_dir: Path, repository: dict[str, Any], quantize: StageRecord) -> StageContext:
    adapter = tmp_path / "finetune" / "adapter"
    adapter.mkdir(parents=True)
    config = parse_config({"model": {"name": "tiny", "context_length": 256}, "tensorrt": {"max_input_len": 100},
                           "repository": {"output": str(tmp_path / "repo"), **repository}})
    ctx = StageContext(config=config, out_dir=tmp_path / "out", workspace=tmp_path, inputs={
        "base_model": _record("base_model", tmp_path, {}), "evaluate": _record("evaluate", tmp_path, {}),
        "finetune": _record("finetune", tmp_path / "finetune", {"adapter": "adapter"}),
        "merge": _record("merge", merged_dir, {"model": "."}),
        "export_onnx": _record("export_onnx", tmp_path, {"model": "fp32.onnx"}),
        "quantize": quantize, "tensorrt": _record("tensorrt", tmp_path / "tensorrt", {}),
    })
    ctx.out_dir.mkdir()
    return ctx


def test_stage_refuses_to_serve_int8_that_failed_its_gate(tmp_path: Path, merged_dir: Path,
                                                           sources: dict[str, Path],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(r, "MODEL_PY_SOURCE", sources["model_py"])
    quantize = StageRecord(name="quantize", dir=tmp_path, key="k", digest="d", artifacts={"int8": "int8.onnx"},
                           metrics={"int8_shipped": False}, data={"gates": [
                               {"name": "onnx_int8_facts_not_worse", "passed": False},
                               {"name": "onnx_int8_general_not_worse", "passed": True}]})
    ctx = _stage_ctx(tmp_path, merged_dir, {"serving_precision": "int8"}, quantize)
    with pytest.raises(StageError, match=r"did not pass .*\(failed onnx_int8_facts_not_worse\)"):
        model_repository.run(ctx)
    assert not (tmp_path / "repo" / "tiny").exists()


def test_stage_writes_no_int8_plan_entry_for_a_qdq_graph_that_failed(tmp_path: Path, merged_dir: Path,
                                                                     sources: dict[str, Path],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(r, "MODEL_PY_SOURCE", sources["model_py"])
    quantize = _record("quantize", tmp_path, {"int8": "int8.onnx", "qdq": "qdq.onnx"}, {
        "int8_shipped": True, "qdq_shipped": False, "qdq_method": "weight_only",
        "qdq_failed_gates": ["onnx_qdq_perplexity_delta_pct"]})
    _graph(tmp_path / "int8.onnx", "int8 graph stand-in")
    result = model_repository.run(_stage_ctx(tmp_path, merged_dir, {"serving_precision": "auto"}, quantize))
    assert not (tmp_path / "repo" / "tiny_trt_int8").exists() and (tmp_path / "repo" / "tiny_trt_fp16").is_dir()
    assert ("tiny_trt_int8 left out: model_qdq.onnx (weight_only) did not pass its task-quality gate "
            "(onnx_qdq_perplexity_delta_pct)") in result.note
    assert result.metrics["serving_core_model"] == "tiny_onnx_int8"


def test_build_facts_take_the_evaluate_scores_and_every_gate_defensively(tmp_path: Path) -> None:
    evaluate = StageRecord(
        name="evaluate", dir=tmp_path, key="k", digest="d", artifacts={},
        metrics={"retention_after": 0.9167, "bleu4_after": 0.0762, "fact_accuracy_zh_after": 1,
                 "rouge_l_after": None, "fact_accuracy_en_after": True, "generate_s": 68.0},
        data={"gates": [{"name": "retention", "passed": True, "value": 0.9167, "threshold": 0.75}]})
    quantize = StageRecord(name="quantize", dir=tmp_path, key="k", digest="d", artifacts={}, metrics={}, data={
        "gates": [{"name": "int8_agreement", "passed": False, "blocking": False, "value": [1, 2]}]})
    merge = _record("merge", tmp_path, {})  # an older record: no gates at all
    facts = build_facts({"evaluate": evaluate, "merge": merge, "quantize": quantize})
    # Only real numbers of the known keys: None, booleans and unlisted metrics are left out.
    assert facts.metrics == {"retention_after": 0.9167, "bleu4_after": 0.0762, "fact_accuracy_zh_after": 1.0}
    assert [(g.stage, g.name, g.passed, g.blocking) for g in facts.gates] == [
        ("evaluate", "retention", True, True), ("quantize", "int8_agreement", False, False)]
    assert facts.gates[1].value == "[1, 2]" and facts.gates_passed
    assert build_facts({}).metrics == {} and build_facts({}).gates == []


def test_config_refuses_preferred_batch_size_over_max() -> None:
    from toolkit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"repository: .*preferred_batch_sizes \[8\] must be between 1 and "
                                          r"max_batch_size \(4\)"):
        parse_config({"repository": {"max_batch_size": 4, "preferred_batch_sizes": [2, 8]}})
    # Left at its default, the preferred list follows the max batch size.
    assert parse_config({"repository": {"max_batch_size": 6}}).repository.preferred_batch_sizes == [4]
    small = {"repository": {"max_batch_size": 2}, "tensorrt": {"opt_batch_size": 1}}
    assert parse_config(small).repository.preferred_batch_sizes == [2]


def _kv_graph_stand_in(path: Path, layers: int = 2, kv_heads: int = 2, head_dim: int = 8, vocab: int = 5) -> Path:
    """An ONNX file with a KV-cache LM's inputs and outputs and no real computation: enough for the
    repository, which reads the graph's interface and links the file."""
    from onnx import TensorProto, helper, save

    def tensor(name: str, *dims: int | str) -> Any:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims))

    past = [tensor(f"past_key_values.{i}.{kv}", "batch", kv_heads, "past", head_dim)
            for i in range(layers) for kv in ("key", "value")]
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "stand-in",
                              [tensor("input_ids", "batch", "seq"), *past], [tensor("logits", "batch", "seq", vocab)])
    path.parent.mkdir(parents=True, exist_ok=True)
    save(helper.make_model(graph), str(path))
    return path


def test_dev_repository_is_the_stage_layout_around_an_onnx(tmp_path: Path, merged_dir: Path) -> None:
    from tests.devrepo import write_serving_repository

    onnx = _kv_graph_stand_in(tmp_path / "export" / "model.onnx")
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tokenizer / name).write_bytes((merged_dir / name).read_bytes())
    served = write_serving_repository(tmp_path / "repo", "dev", onnx, context_length=128, max_active=4,
                                      max_queue=16, max_new_tokens_limit=64, tokenizer_dir=tokenizer,
                                      stop_token_ids=[2], pad_token_id=2, max_batch_size=2)
    repo = tmp_path / "repo"
    assert (served.path, served.model, served.onnx) == (repo, "dev", onnx)
    assert (repo / "dev_onnx_fp32" / "1" / "model.onnx").resolve() == onnx.resolve()  # linked, not copied
    params = {k: v.string_value for k, v in read_config(repo / "dev" / "config.pbtxt").parameters.items()}
    assert params == {c.PARAM_CORE_MODEL: "dev_onnx_fp32", c.PARAM_RUNNER: "onnxruntime", c.PARAM_MAX_ACTIVE: "4",
                      c.PARAM_MAX_QUEUE: "16", c.PARAM_MAX_NEW_TOKENS: "64",
                      c.PARAM_GRAMMAR_TIMEOUT: "10"}
    core = read_config(repo / "dev_onnx_fp32" / "config.pbtxt")
    assert core.max_batch_size == 2 and list(core.dynamic_batching.preferred_batch_size) == [2]
    manifest = ModelManifest.load(repo / "dev" / "1")
    assert manifest == served.manifest
    assert (manifest.num_layers, manifest.num_kv_heads, manifest.head_dim, manifest.vocab_size) == (2, 2, 8, 5)
    assert (manifest.stop_token_ids, manifest.pad_token_id, manifest.chat_template) == ([2], 2, TEMPLATE)
    assert sorted(p.name for p in (repo / "dev" / "1" / "tokenizer").iterdir()) == [
        "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]

    bare = write_serving_repository(tmp_path / "bare", "dev", onnx, context_length=128)  # token ids only
    assert not (tmp_path / "bare" / "dev" / "1" / "tokenizer").exists() and bare.manifest.chat_template == ""


def test_python_backend_reads_every_written_config_as_read_config_does(
    tmp_path: Path, merged_dir: Path, sources: dict[str, Path]
) -> None:
    from toolkit.repository.pbtxt import model_parameters
    from toolkit.repository.pbtxt_scan import scan_config

    inputs = r.TrtInputs(plan=plan_spec(TensorRTSection(max_input_len=100)), qdq_onnx=sources["int8"])
    _write(tmp_path / "repo", merged_dir, sources, onnx_int8=sources["int8"], trt_inputs=inputs)
    configs = sorted((tmp_path / "repo").glob("*/config.pbtxt"))
    assert [p.parent.name for p in configs] == ["tiny", "tiny_onnx_fp32", "tiny_onnx_int8", "tiny_trt_fp16",
                                                "tiny_trt_int8"]
    for path in configs:
        config, facts = read_config(path), scan_config(path)
        assert (facts.name, facts.platform, facts.backend, facts.max_batch_size) == (
            config.name, config.platform, config.backend, config.max_batch_size)
        assert facts.parameters == model_parameters(config)


def test_written_repository_is_readable_by_another_user(tmp_path: Path, merged_dir: Path,
                                                        sources: dict[str, Path]) -> None:
    """Mode bits of every path a build writes: files 0644 (scripts 0755), folders 0755, whatever the umask."""
    old_umask = os.umask(0o077)  # the strictest a build user could have
    try:
        sources["model_py"].chmod(0o600)
        inputs = r.TrtInputs(plan=plan_spec(TensorRTSection(max_input_len=100)))
        _write(tmp_path / "repo", merged_dir, sources, trt_inputs=inputs)
    finally:
        os.umask(old_umask)
    out = tmp_path / "repo"
    for path in out.rglob("*"):
        mode = path.stat().st_mode & 0o777
        if path.is_dir():
            assert mode == 0o755, path
        elif path.name == "build_plan.sh":
            assert mode == 0o755, path
        else:
            assert mode == 0o644, path
    assert (out / "tiny" / "1" / "tokenizer" / "tokenizer.json").stat().st_mode & 0o004  # the gateway reads these


def test_configs_and_scripts_overwritten_by_a_failed_build_are_restored(
    tmp_path: Path, merged_dir: Path, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "repo"
    inputs = r.TrtInputs(plan=plan_spec(TensorRTSection(max_input_len=100)))
    _write(out, merged_dir, sources, trt_inputs=inputs)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.name in ("config.pbtxt", "build_plan.sh")}
    real = r.trt.write_build_script

    def fail_on_script(path: Path, text: str) -> Path:  # every config is rewritten by now
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(r.trt, "write_build_script", fail_on_script)
    other = r.TrtInputs(plan=plan_spec(TensorRTSection(max_input_len=50)))
    with pytest.raises(OSError, match="No space left"):
        _write(out, merged_dir, sources, trt_inputs=other,
               repository=RepositorySection(max_batch_size=4, preferred_batch_sizes=[4]))
    assert {p: p.read_bytes() for p in before} == before
    assert _versions(out / "tiny") == ["1"] and not [p for p in out.rglob(".*") if p.name.startswith(".")]
    monkeypatch.setattr(r.trt, "write_build_script", real)
