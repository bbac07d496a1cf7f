"""report.md: what a reader sees once the markdown is rendered (GitHub-flavoured tables)."""

from __future__ import annotations

import html
import re

import pytest

from toolkit.buildsys.config import BuildConfig
from toolkit.buildsys.report import BuildReport, GateResult, StageReport, render_markdown

markdown_it = pytest.importorskip("markdown_it")


def _rendered_tables(markdown: str) -> list[list[list[str]]]:
    """Every table as rows of cell texts, as a GFM renderer shows them."""
    page = markdown_it.MarkdownIt("commonmark").enable("table").render(markdown)
    tables = []
    for table in re.findall(r"<table>(.*?)</table>", page, re.S):
        rows = []
        for row in re.findall(r"<tr>(.*?)</tr>", table, re.S):
            cells = re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)
            rows.append([html.unescape(re.sub(r"<[^>]+>", "", cell)) for cell in cells])
        tables.append(rows)
    return tables


def _report() -> BuildReport:
    report = BuildReport.start(BuildConfig())
    report.add(StageReport(name="data", status="ran", duration_s=1.25, note="stop at <|im_end|> | 300 records"))
    report.add(StageReport(
        name="export_onnx",
        status="ran",
        gates=[
            GateResult(name="greedy_parity", passed=False, value=0.5, threshold=1.0,
                       detail="prompt 3 diverged after <|im_start|>assistant\nat token 7"),
            GateResult(name="stop_ids", passed=True, value="<|im_end|>", threshold="a|b", blocking=False),
        ],
        metrics={"max_abs_logit_delta": 0.0004},
    ))
    return report


def test_pipes_in_table_cells_survive_rendering() -> None:
    markdown = render_markdown(_report())
    assert "</im_end/>" not in markdown
    stages, gates = _rendered_tables(markdown)
    assert stages[0] == ["stage", "status", "seconds", "peak MiB", "note"]
    assert stages[1] == ["data", "ran", "1.2", "", "stop at <|im_end|> | 300 records"]
    assert all(len(row) == 5 for row in gates)
    assert gates[1] == ["greedy_parity", "FAIL", "0.5", "1", "prompt 3 diverged after <|im_start|>assistant at token 7"]
    assert gates[2] == ["stop_ids", "pass", "<|im_end|>", "a|b", ""]


def test_cells_escape_pipes_with_a_backslash() -> None:
    markdown = render_markdown(_report())
    assert "| stop at <\\|im_end\\|> \\| 300 records |" in markdown
    assert "| stop_ids | pass | <\\|im_end\\|> | a\\|b |  |" in markdown
    assert "- max_abs_logit_delta: 0.0004" in markdown  # list items are not table cells: left alone


def test_the_evaluate_stage_scores_render_as_a_table_with_intervals() -> None:
    report = BuildReport.start(BuildConfig())
    report.add(StageReport(name="evaluate", status="ran", metrics={
        "accuracy": {"test_en": {"after": [45, 56, 0.68, 0.89], "before": [0, 56, 0.0, 0.064]},
                     "heldout_en": {"after": [120, 168, 0.64, 0.78]}},
        "generate_s": 80.5,
    }))
    markdown = render_markdown(report)
    _stages, scores = _rendered_tables(markdown)
    assert scores == [["questions", "before", "after"],
                      ["test_en", "0/56 (0.00, 95% CI 0.00–0.06)", "45/56 (0.80, 95% CI 0.68–0.89)"],
                      ["heldout_en", "–", "120/168 (0.71, 95% CI 0.64–0.78)"]]
    assert "- generate_s: 80.5" in markdown and "- accuracy:" not in markdown
