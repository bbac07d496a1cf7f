"""The Triton launcher's pure parts: backend links, command line, environment; serve's model discovery."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from toolkit.errors import ServingError
from toolkit.repository.layout import generation_models
from toolkit.serving.triton_server import TritonServer, prepare_backend_dir, pytriton_dist


def test_backend_dir_symlinks_the_python_backend_and_this_pythons_stub(tmp_path: Path) -> None:
    root = prepare_backend_dir(tmp_path / "backends")
    links = sorted(p.name for p in (root / "python").iterdir())
    assert links == ["libtriton_python.so", "triton_python_backend_stub", "triton_python_backend_utils.py"]
    for link in (root / "python").iterdir():
        assert link.is_symlink() and link.resolve().is_file()  # linked, not copied: RPATHs must resolve
    stub = (root / "python" / "triton_python_backend_stub").resolve()
    assert stub.parent.name == f"{sys.version_info.major}.{sys.version_info.minor}"


def test_command_binds_loopback_with_explicit_model_control(tmp_path: Path) -> None:
    server = TritonServer(tmp_path, models=["a", "b"], http_port=18070, grpc_port=18071, metrics_port=18072,
                          log_path=tmp_path / "t.log")
    command = server.command(tmp_path / "backends")
    assert command[0] == str(pytriton_dist() / "bin" / "tritonserver")
    for flag in ("--model-control-mode=explicit", "--load-model=a", "--load-model=b", "--http-address=127.0.0.1",
                 "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1", "--grpc-port=18071",
                 "--allow-metrics=true", f"--log-file={tmp_path / 't.log'}"):
        assert flag in command
    assert server.environment()["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert (server.grpc_url, server.metrics_url) == ("127.0.0.1:18071", "http://127.0.0.1:18072/metrics")


def test_missing_repository_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ServingError, match="does not exist"):
        TritonServer(tmp_path / "nope").start()


def test_serve_finds_generation_models_only(tmp_path: Path) -> None:
    for name, files in {"chat": ["model.py", "manifest.json"], "chat_onnx_fp32": ["model.onnx"]}.items():
        (tmp_path / name / "1").mkdir(parents=True)
        (tmp_path / name / "config.pbtxt").write_text("")
        for file in files:
            (tmp_path / name / "1" / file).write_text("")
    assert generation_models(tmp_path) == ["chat"]
    with pytest.raises(ServingError, match="no generation model"):
        generation_models(tmp_path / "chat_onnx_fp32")


def test_serve_also_loads_the_core_model_of_a_bls_generation_model(tmp_path: Path) -> None:
    from toolkit.repository import contract
    from toolkit.repository.layout import models_to_load

    def model(name: str, runner: str | None = None, files: tuple[str, ...] = ("model.py", "manifest.json")) -> None:
        (tmp_path / name / "1").mkdir(parents=True)
        params = (f'parameters {{ key: "{contract.PARAM_RUNNER}" value {{ string_value: "{runner}" }} }}\n'
                  f'parameters {{ key: "{contract.PARAM_CORE_MODEL}" value {{ string_value: "{name}_trt_fp16" }} }}\n'
                  if runner else "")
        (tmp_path / name / "config.pbtxt").write_text(f'name: "{name}"\nbackend: "python"\n{params}')
        for file in files:
            (tmp_path / name / "1" / file).write_text("")

    model("a", runner="onnxruntime")
    model("b", runner="bls")
    model("b_trt_fp16", files=("model.plan",))
    assert models_to_load(tmp_path) == ["a", "b", "b_trt_fp16"]
    model("c", runner="bls")  # its core model is missing
    with pytest.raises(ServingError, match="c runs the BLS runner over core model 'c_trt_fp16', which is not in"):
        models_to_load(tmp_path)
