"""Config loading: defaults, YAML/TOML files, one-line errors naming the field, the CLI's exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from toolkit.buildsys.config import BuildConfig, load_config
from toolkit.cli import app
from toolkit.errors import ConfigError


def test_defaults_need_no_file() -> None:
    cfg = load_config(None)
    assert cfg == BuildConfig()
    assert cfg.model.base.startswith("embedded:")
    assert cfg.lora.target_modules == "all-linear"


def test_yaml_and_toml_load(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("lora:\n  rank: 4\ntrain:\n  max_steps: 7\n")
    (tmp_path / "c.toml").write_text("[lora]\nrank = 4\n[train]\nmax_steps = 7\n")
    for name in ("c.yaml", "c.toml"):
        cfg = load_config(tmp_path / name)
        assert cfg.lora.rank == 4 and cfg.train.max_steps == 7


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lora:\n  rnak: 4\n", "lora.rnak: Extra inputs are not permitted"),
        ("lora:\n  rank: 0\n", "lora.rank: Input should be greater than or equal to 1"),
        ("data:\n  split: [0.5, 0.5, 0.5]\n", "data: Value error, split must be three"),
        ("model:\n  name: 'bad name!'\n", "model.name: String should match pattern"),
        ("- just\n- a list\n", "the top level must be a mapping"),
        ("lora: [unclosed\n", "not valid yaml"),
    ],
)
def test_bad_values_name_the_field(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert expected in str(err.value)
    assert "\n" not in str(err.value).strip()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_config_show_and_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    shown = runner.invoke(app, ["config", "show", "--format", "json"])
    assert shown.exit_code == 0, shown.output
    assert '"context_length": 2048' in shown.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rate: 5\n")
    result = runner.invoke(app, ["config", "show", "-c", str(bad)])
    assert result.exit_code == 2
    assert "train.learning_rate" in result.output
    result = runner.invoke(app, ["build", "-c", str(bad)])
    assert result.exit_code == 2
    assert "train.learning_rate" in result.output
