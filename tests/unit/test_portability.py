"""The portability gate on tiny model directories: good files pass; each kind of ambiguity fails by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.unit.tiny_llm import CHATML_TEMPLATE, save_tiny_model
from toolkit.model_io.tokenizer_files import copy_tokenizer_files, fix_tokenizer_files, portable_model_config
from toolkit.quality.portability import jinja_render, label_problems, portability_gate

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "smollm2_tokenizer"
IM_END = 2


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model as the build leaves it: transformers 5 saved it, so config.json is made portable."""
    model_dir = save_tiny_model(tmp_path_factory.mktemp("good"))
    portable_model_config(model_dir)
    return model_dir


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_a_well_formed_directory_passes(good: Path) -> None:
    gate = portability_gate(good, [IM_END])
    assert gate.passed and gate.blocking, gate.detail


def test_the_smollm2_fixture_tokenizer_passes() -> None:
    gate = portability_gate(FIXTURE, [IM_END])
    assert gate.passed, gate.detail


def test_a_mislabelled_byte_level_tokenizer_fails_with_a_clear_message(tmp_path: Path) -> None:
    bad = save_tiny_model(tmp_path / "mislabelled", mislabelled=True)
    gate = portability_gate(bad, [IM_END])
    assert not gate.passed
    assert "LlamaTokenizerFast" in gate.detail and "SentencePiece" in gate.detail
    assert "GPT2Tokenizer" in gate.detail  # says what to do
    assert "decoder mixes SentencePiece steps" in gate.detail


def test_missing_or_v5_only_tokenizer_class_fails(good: Path, tmp_path: Path) -> None:
    backend = _copy(good, tmp_path / "backend")
    _edit(backend / "tokenizer_config.json", tokenizer_class="TokenizersBackend")
    assert any("transformers 4.x cannot load" in p for p in label_problems(backend))
    unnamed = _copy(good, tmp_path / "unnamed")
    config = json.loads((unnamed / "tokenizer_config.json").read_text())
    del config["tokenizer_class"]
    (unnamed / "tokenizer_config.json").write_text(json.dumps(config))
    assert any("names no tokenizer_class" in p for p in label_problems(unnamed))


def test_two_different_copies_of_the_template_fail(good: Path, tmp_path: Path) -> None:
    bad = _copy(good, tmp_path / "template")
    (bad / "chat_template.jinja").write_text(CHATML_TEMPLATE.replace("tiny test model", "different model"))
    gate = portability_gate(bad, [IM_END])
    assert not gate.passed and "differs from chat_template.jinja" in gate.detail


def test_generation_config_must_stop_where_the_gateway_stops(good: Path, tmp_path: Path) -> None:
    bad = _copy(good, tmp_path / "stops")
    _edit(bad / "generation_config.json", eos_token_id=1)
    gate = portability_gate(bad, [IM_END])
    assert not gate.passed and "lacks the stop id(s) [2]" in gate.detail


def test_a_tokenizer_json_that_disagrees_with_transformers_fails(good: Path, tmp_path: Path) -> None:
    """tokenizer.json adds a bos the transformers class does not: raw readers (TGI) would see other ids."""
    bad = _copy(good, tmp_path / "ids")
    tokenizer = json.loads((bad / "tokenizer.json").read_text())
    tokenizer["normalizer"] = {"type": "Lowercase"}  # the raw library lowercases; the label says GPT-2
    (bad / "tokenizer.json").write_text(json.dumps(tokenizer))
    gate = portability_gate(bad, [IM_END])
    assert not gate.passed and ("ids differ" in gate.detail or "does not survive" in gate.detail), gate.detail


def test_config_without_pre_v5_rope_keys_fails_until_made_portable(good: Path, tmp_path: Path) -> None:
    bad = _copy(good, tmp_path / "rope")
    config = json.loads((bad / "config.json").read_text())
    config.pop("rope_theta", None)
    config.pop("rope_scaling", None)
    config["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "default"}
    (bad / "config.json").write_text(json.dumps(config))
    assert "rope_theta" in portability_gate(bad, [IM_END]).detail
    assert portable_model_config(bad) == ["rope_theta", "rope_scaling"]
    assert portability_gate(bad, [IM_END]).passed


def test_fixes_edit_only_the_keys_concerned(tmp_path: Path) -> None:
    defective = save_tiny_model(tmp_path / "defective", defects=True)
    before = json.loads((defective / "tokenizer.json").read_text())
    fix_tokenizer_files(defective, eos="<|im_end|>", drop_bos=True, pad="<|im_end|>", max_length=2048,
                        chat_template=CHATML_TEMPLATE)
    after = json.loads((defective / "tokenizer.json").read_text())
    assert after["model"] == before["model"] and after["pre_tokenizer"] == before["pre_tokenizer"]
    assert after["post_processor"]["single"] == [{"Sequence": {"id": "A", "type_id": 0}}]
    config = json.loads((defective / "tokenizer_config.json").read_text())
    assert (config["eos_token"], config["pad_token"], config["add_bos_token"]) == ("<|im_end|>", "<|im_end|>", False)
    assert config["chat_template"] == (defective / "chat_template.jinja").read_text() == CHATML_TEMPLATE


def test_copies_are_byte_for_byte(good: Path, tmp_path: Path) -> None:
    copied = copy_tokenizer_files(good, tmp_path / "copy")
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(copied)
    for name in copied:
        assert (tmp_path / "copy" / name).read_bytes() == (good / name).read_bytes()


def test_jinja_render_matches_transformers_and_raises_template_errors(good: Path) -> None:
    from toolkit.model_io.modeling import load_tokenizer, render_text

    tokenizer = load_tokenizer(good)
    conversation = [{"role": "user", "content": "Hi  there\n\n"}, {"role": "assistant", "content": "Hello 👋"},
                    {"role": "user", "content": "蓝峰?"}]
    assert jinja_render(CHATML_TEMPLATE, conversation, True) == render_text(tokenizer, conversation, True)
    with pytest.raises(Exception, match="only users"):
        jinja_render("{{ raise_exception('only users') }}", conversation, True)
