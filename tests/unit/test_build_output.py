"""What a build prints: stage and gate lines on the terminal, the rest in build.log; JUnit XML for CI."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from toolkit.buildsys.buildlog import progress
from toolkit.buildsys.junit import junit_xml
from toolkit.buildsys.report import BuildReport, BuildStatus, GateResult, StageReport, StageStatus
from toolkit.buildsys.stage_api import StageContext, StageResult
from toolkit.cli import app
from toolkit.stages import pipeline
from toolkit.stages.pipeline import StageSpec

ROOT = Path(__file__).resolve().parents[2]

NOISY_BUILD = """
import logging, os, sys, warnings
from pathlib import Path
from toolkit.buildsys.buildlog import build_logging, progress

with build_logging(Path(sys.argv[1])):
    logging.getLogger("toolkit.stages.pipeline").info("finetune: running (PEFT LoRA fine-tune)")
    print("[torch.onnx] Obtain model graph")  # a library that prints
    os.write(2, b"onnxruntime C++ warning on fd 2\\n")  # a library that writes to the fd itself
    os.write(1, b"native write on fd 1\\n")
    for _ in range(3):
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").info("skip to quantize node_Shape_1")
    logging.getLogger("onnxruntime.quantization").warning("calibration range is empty")
    logging.getLogger("toolkit.stages.data").info("data: 975 examples")  # detail: log only
    logging.getLogger("toolkit.stages.base_model").warning("context_length exceeds the model")
    warnings.warn("is_gradient_checkpointing is deprecated", FutureWarning)
    for _ in progress(range(20), total=20, desc="finetune", unit="step"):
        pass
    logging.getLogger("toolkit.stages.pipeline").info("finetune: ran in 1.0 s")
print("after the build")
"""


def test_the_terminal_gets_stage_lines_and_the_log_gets_everything(tmp_path: Path) -> None:
    script = tmp_path / "noisy.py"
    script.write_text(textwrap.dedent(NOISY_BUILD))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ws")], capture_output=True, text=True,
                          env=env, timeout=120, check=True)
    terminal = proc.stderr.splitlines()
    assert [line.split(" ", 1)[1] for line in terminal] == [
        "finetune: running (PEFT LoRA fine-tune)",
        "context_length exceeds the model",
        *[f"finetune: {n}/20 step ({5 * n} %) in 0 s" for n in range(2, 21, 2)],
        "finetune: ran in 1.0 s",
    ]
    assert proc.stdout == "after the build\n"  # stdout is the program's again once the build is over
    log = (tmp_path / "ws" / "build.log").read_text()
    for text in ("[torch.onnx] Obtain model graph", "onnxruntime C++ warning on fd 2", "native write on fd 1",
                 "WARNING onnxruntime.quantization: calibration range is empty",
                 "toolkit.stages.data: data: 975 examples",
                 "FutureWarning: is_gradient_checkpointing is deprecated", "finetune: running"):
        assert text in log, text
    assert "skip to quantize" not in log  # a quantizer's line per skipped node (2000+ in a default build)


def test_progress_is_a_line_every_tenth_off_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="toolkit.progress"):
        bar = progress(range(25), total=25, desc="steps", unit="step")
        for i in bar:
            bar.set_postfix(loss=f"{i / 10:.1f}")
        bar.close()
        assert list(progress(range(5), total=5, desc="quiet", enabled=False)) == list(range(5))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10 and lines[0].startswith("steps: 3/25 step (12 %)")
    assert lines[-1].startswith("steps: 25/25 step (100 %)") and lines[-1].endswith("loss=2.4")


def _report() -> BuildReport:
    report = BuildReport(config_sha256="c" * 64, config={}, started_at="2026-11-26T00:00:00+00:00",
                         status=BuildStatus.FAILED, error="gate failed", duration_s=12.5)
    report.stages = [
        StageReport(name="data", status=StageStatus.SKIPPED, duration_s=1.0),
        StageReport(name="quantize", status=StageStatus.RAN, duration_s=5.0, note="INT8 NOT shipped", gates=[
            GateResult(name="onnx_int8_perplexity_delta_pct", passed=False, value=7.5, threshold=5.0, blocking=False,
                       detail="perplexity 10.0 -> 10.75")]),
        StageReport(name="tensorrt", status=StageStatus.UNAVAILABLE, note="TensorRT not found"),
        StageReport(name="evaluate", status=StageStatus.FAILED, duration_s=6.5, note="retention below 0.75", gates=[
            GateResult(name="retention", passed=False, value=0.5, threshold=0.75, detail="6/12 right"),
            GateResult(name="held", passed=True, value=1.0, threshold=1.0)]),
        StageReport(name="triton_gate", status=StageStatus.NOT_RUN),
    ]
    return report


def test_junit_has_a_case_per_stage_and_gate_with_the_numbers() -> None:
    root = ET.fromstring(ET.tostring(junit_xml(_report())))
    suite = root.find("testsuite")
    assert suite is not None
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert list(cases) == ["stage data", "stage quantize", "gate onnx_int8_perplexity_delta_pct", "stage tensorrt",
                           "stage evaluate", "gate retention", "gate held", "stage triton_gate"]
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("8", "2", "4")
    assert cases["stage quantize"].find("failure") is None and cases["stage quantize"].find("skipped") is None
    skipped = cases["gate onnx_int8_perplexity_delta_pct"].find("skipped")
    assert skipped is not None and "7.5 (threshold 5)" in skipped.get("message", "")
    failure = cases["gate retention"].find("failure")
    assert failure is not None and failure.get("message") == "retention: FAIL, 0.5 (threshold 0.75); 6/12 right"
    assert cases["stage evaluate"].find("failure") is not None
    assert "unavailable here: TensorRT not found" in cases["stage tensorrt"].find("skipped").get("message", "")  # type: ignore[union-attr]
    assert cases["stage data"].find("skipped").get("message", "").startswith("inputs unchanged")  # type: ignore[union-attr]
    assert cases["gate retention"].get("classname") == "toolkit build.evaluate"


def _fake_stage(gate_value: float) -> object:
    def run(ctx: StageContext) -> StageResult:
        (ctx.out_dir / "out.txt").write_text("made")
        return StageResult(artifacts={"out": "out.txt"}, gates=[
            GateResult(name="parity", passed=gate_value >= 1.0, value=gate_value, threshold=1.0)])

    return type("FakeStage", (), {"__name__": "fake_stage", "run": staticmethod(run)})()


@pytest.mark.parametrize(("value", "exit_code", "failures"), [(1.0, 0, "0"), (0.5, 4, "2")])
def test_cli_build_writes_junit_whatever_the_outcome(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: float, exit_code: int, failures: str
) -> None:
    real = pipeline.run_build
    stages = (StageSpec("only", _fake_stage(value), ("lora",)),)  # type: ignore[arg-type]
    monkeypatch.setattr(pipeline, "run_build", lambda config, **kw: real(config, stages=stages, **kw))
    monkeypatch.setattr(pipeline, "STAGE_NAMES", ("only",))
    junit = tmp_path / "junit.xml"
    result = CliRunner().invoke(app, ["build", "--workspace", str(tmp_path / "ws"), "--junit-xml", str(junit)])
    assert result.exit_code == exit_code, result.output
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == failures and suite.get("tests") == "2"
    assert (tmp_path / "ws" / "build.log").is_file() and (tmp_path / "ws" / "report.md").is_file()
    if exit_code:
        assert "parity: FAIL, 0.5 (threshold 1)" in result.output and "full log:" in result.output


def test_cli_junit_says_why_a_build_stopped_before_its_report(tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    workspace = tmp_path / "ws"
    result = CliRunner().invoke(app, ["build", "--workspace", str(workspace), "--stages", "nope",
                                      "--junit-xml", str(junit)])
    assert result.exit_code == 2
    error = ET.parse(junit).getroot().find("testsuite/testcase/error")
    assert error is not None and "unknown stage(s) nope" in error.get("message", "")
