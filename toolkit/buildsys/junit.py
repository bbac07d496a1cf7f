"""The build report as JUnit XML, the test report format CI systems display natively.

Every stage and every gate is a test case, in the schema GitLab, Jenkins and the GitHub Actions JUnit
reporters read (``testsuites`` > ``testsuite`` > ``testcase`` with ``failure`` or ``skipped``):

- a stage that ran passes; a failed one is a failure with the error; a stage that did not run here
  (skipped because its inputs were unchanged, cached, unavailable, not run) is skipped, saying why;
- a gate that held passes (its numbers in ``system-out``); a failed blocking gate is a failure and a
  failed non-blocking gate (the INT8 variant left out) is skipped, each with the gate's value against
  its threshold in the message.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from toolkit.buildsys.report import BuildReport, BuildStatus, GateResult, StageReport, StageStatus
from toolkit.files import atomic_write_text

SUITE = "toolkit build"
_WHY_NOT_RUN = {
    StageStatus.SKIPPED: "inputs unchanged: the artifact of an earlier build is reused",
    StageStatus.CACHED: "not selected (--stages/--until): the artifact of an earlier build is used",
    StageStatus.NOT_RUN: "not selected and no earlier artifact",
}


def _stage_case(stage: StageReport) -> ET.Element:
    case = ET.Element("testcase", classname=SUITE, name=f"stage {stage.name}", time=f"{stage.duration_s or 0:.3f}")
    if stage.status == StageStatus.FAILED:
        ET.SubElement(case, "failure", message=stage.note or "failed", type="StageFailed").text = stage.note
    elif stage.status == StageStatus.INTERRUPTED:
        ET.SubElement(case, "error", message="interrupted by the user", type="Interrupted")
    elif stage.status == StageStatus.UNAVAILABLE:
        ET.SubElement(case, "skipped", message=f"unavailable here: {stage.note}")
    elif stage.status in _WHY_NOT_RUN:
        ET.SubElement(case, "skipped", message=_WHY_NOT_RUN[stage.status])
    if stage.note and stage.status != StageStatus.FAILED:
        ET.SubElement(case, "system-out").text = stage.note
    return case


def _gate_case(stage: StageReport, gate: GateResult) -> ET.Element:
    case = ET.Element("testcase", classname=f"{SUITE}.{stage.name}", name=f"gate {gate.name}", time="0")
    message = gate.summary()
    if not gate.passed and gate.blocking:
        ET.SubElement(case, "failure", message=message, type="GateFailed").text = gate.detail
    elif not gate.passed:
        ET.SubElement(case, "skipped", message=f"non-blocking gate failed: {message}")
    else:
        ET.SubElement(case, "system-out").text = message
    return case


def junit_xml(report: BuildReport) -> ET.Element:
    """The ``testsuites`` element of a build report."""
    cases = []
    for stage in report.stages:
        cases.append(_stage_case(stage))
        cases += [_gate_case(stage, gate) for gate in stage.gates]
    failures = sum(1 for c in cases if c.find("failure") is not None)
    skipped = sum(1 for c in cases if c.find("skipped") is not None)
    counts = {"tests": str(len(cases)), "failures": str(failures), "errors": "0", "skipped": str(skipped),
              "time": f"{report.duration_s or 0:.3f}"}
    suites = ET.Element("testsuites", {"name": SUITE, **{k: v for k, v in counts.items() if k != "skipped"}})
    suite = ET.SubElement(suites, "testsuite", {"name": SUITE, "timestamp": report.started_at, **counts})
    properties = ET.SubElement(suite, "properties")
    for name, value in (("toolkit_version", report.toolkit_version), ("config_sha256", report.config_sha256),
                        ("build_status", str(report.status))):
        ET.SubElement(properties, "property", name=name, value=value)
    suite.extend(cases)
    if report.status != BuildStatus.PASSED and report.error and not failures:
        # A build that stopped outside any stage or gate (bad --stages, Ctrl-C) still fails the report.
        error = ET.SubElement(suite, "testcase", classname=SUITE, name="build", time="0")
        ET.SubElement(error, "error", message=report.error, type=str(report.status))
        suite.set("errors", "1")
        suite.set("tests", str(len(cases) + 1))
        suites.set("errors", "1")
        suites.set("tests", str(len(cases) + 1))
    return suites


def write_junit(report: BuildReport, path: Path) -> Path:
    """Write the report's JUnit XML to `path`."""
    root = junit_xml(report)
    ET.indent(root)
    atomic_write_text(path, ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n")
    return path
