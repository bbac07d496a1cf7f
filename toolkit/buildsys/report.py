"""The build report: ``report.json`` for CI, ``report.md`` for people. Saved after every stage."""

from __future__ import annotations

import datetime as dt
import json
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from toolkit import __version__
from toolkit.buildsys.config import BuildConfig
from toolkit.files import atomic_write_text, sha256_json


class StageStatus(StrEnum):
    """What became of a stage in one build. Only RAN and UNAVAILABLE records are reused by a later build."""

    RAN = "ran"
    SKIPPED = "skipped"  # inputs unchanged: the recorded artifact is reused
    CACHED = "cached"  # not selected (--stages, --until): the recorded artifact is reused
    UNAVAILABLE = "unavailable"  # could not run here (no GPU, gate off); recorded, not an error
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # Ctrl-C while it ran: nothing of this run kept, the earlier record untouched
    NOT_RUN = "not-run"  # not selected and nothing recorded


class BuildStatus(StrEnum):
    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


class GateResult(BaseModel):
    """One fidelity check. A failed blocking gate fails the build; a non-blocking one drops an artifact."""

    name: str
    passed: bool
    value: float | str | None = None
    threshold: float | str | None = None
    detail: str = ""
    blocking: bool = True

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else ("FAIL" if self.blocking else "fail (non-blocking)")

    def numbers(self) -> str:
        """The gate's value against its threshold, e.g. ``0.9167 (threshold 0.75)``."""
        value = _fmt(self.value) if self.value is not None else "n/a"
        return value + (f" (threshold {_fmt(self.threshold)})" if self.threshold is not None else "")

    def summary(self) -> str:
        """One line: name, verdict, value against threshold, detail."""
        return f"{self.name}: {self.verdict}, {self.numbers()}" + (f"; {self.detail}" if self.detail else "")


class StageReport(BaseModel):
    name: str
    status: StageStatus
    duration_s: float | None = None
    peak_rss_mib: int | None = None  # the build process's high-water mark while the stage ran
    note: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict)
    gates: list[GateResult] = Field(default_factory=list)
    artifacts: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @classmethod
    def from_record(
        cls, name: str, data: dict[str, Any], *, status: StageStatus, stage_dir: Path | None = None
    ) -> StageReport:
        stage_dir_files = data.get("files", {})
        return cls(
            name=name,
            status=status,
            duration_s=data.get("duration_s"),
            peak_rss_mib=data.get("peak_rss_mib"),
            note=data.get("note", ""),
            metrics=data.get("metrics", {}),
            gates=[GateResult.model_validate(g) for g in data.get("gates", [])],
            artifacts={
                art: {
                    "path": str(stage_dir / rel) if stage_dir else rel,
                    "sha256": stage_dir_files.get(rel, {}).get("sha256"),
                }
                for art, rel in data.get("artifacts", {}).items()
            },
        )


class BuildReport(BaseModel):
    toolkit_version: str = __version__
    config_sha256: str
    config: dict[str, Any]
    started_at: str
    finished_at: str | None = None
    duration_s: float | None = None
    status: BuildStatus = BuildStatus.RUNNING
    error: str | None = None
    stages: list[StageReport] = Field(default_factory=list)

    @classmethod
    def start(cls, config: BuildConfig) -> BuildReport:
        dumped = config.model_dump(mode="json")
        return cls(config_sha256=sha256_json(dumped), config=dumped, started_at=_now())

    def add(self, stage: StageReport) -> None:
        self.stages = [s for s in self.stages if s.name != stage.name] + [stage]

    def finish(self, *, status: BuildStatus, error: str | None = None) -> None:
        self.status = status
        self.error = error
        self.finished_at = _now()
        started = dt.datetime.fromisoformat(self.started_at)
        self.duration_s = round((dt.datetime.fromisoformat(self.finished_at) - started).total_seconds(), 3)

    def stage(self, name: str) -> StageReport | None:
        return next((s for s in self.stages if s.name == name), None)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return "`" + json.dumps(value, ensure_ascii=False)[:120] + "`"
    return str(value)


def _cell(text: str) -> str:
    """A markdown table cell: pipes escaped as ``\\|`` (GFM, code spans included), line breaks as spaces."""
    return " ".join(text.replace("|", "\\|").splitlines())


def render_markdown(report: BuildReport) -> str:
    lines = [
        "# Build report",
        "",
        f"- status: **{report.status}**" + (f" ({report.error})" if report.error else ""),
        f"- toolkit {report.toolkit_version}, config sha256 `{report.config_sha256[:12]}`",
        f"- started {report.started_at}, took {report.duration_s if report.duration_s is not None else '…'} s",
        "",
        "| stage | status | seconds | peak MiB | note |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for s in report.stages:
        secs = f"{s.duration_s:.1f}" if s.duration_s is not None else ""
        peak = str(s.peak_rss_mib) if s.peak_rss_mib is not None else ""
        lines.append(f"| {_cell(s.name)} | {_cell(s.status)} | {secs} | {peak} | {_cell(s.note)} |")
    for s in report.stages:
        if not s.metrics and not s.gates:
            continue
        lines += ["", f"## {s.name}", ""]
        if s.gates:
            lines += ["| gate | result | value | threshold | detail |", "| --- | --- | --- | --- | --- |"]
            for g in s.gates:
                cells = [g.name, g.verdict, _fmt(g.value), _fmt(g.threshold), g.detail]
                lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
            lines.append("")
        accuracy = s.metrics.get("accuracy")
        if isinstance(accuracy, dict) and accuracy:  # the evaluate stage's scores per question set
            lines += ["| questions | before | after |", "| --- | ---: | ---: |"]
            for name, row in accuracy.items():
                lines.append(f"| {_cell(name)} | {_score(row.get('before'))} | {_score(row.get('after'))} |")
            lines.append("")
        for key, value in s.metrics.items():
            if key != "accuracy":
                lines.append(f"- {key}: {_fmt(value)}")
    return "\n".join(lines) + "\n"


def _score(value: Any) -> str:
    """[right, asked, low, high] as "right/asked (share, 95% CI low-high)"; "–" when not measured."""
    if not isinstance(value, list) or len(value) != 4 or not value[1]:
        return "–"
    right, asked, low, high = value
    return f"{right}/{asked} ({right / asked:.2f}, 95% CI {low:.2f}–{high:.2f})"


def write_report(report: BuildReport, workspace: Path) -> None:
    atomic_write_text(workspace / "report.json", report.model_dump_json(indent=2) + "\n")
    atomic_write_text(workspace / "report.md", render_markdown(report))
