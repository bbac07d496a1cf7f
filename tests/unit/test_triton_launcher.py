"""The Triton launcher's pure parts: backend links, command line, environment; serve's model discovery."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from toolkit.errors import ServingError
from toolkit.repository.layout import generation_models
from toolkit.supervisor.triton_replicas import ReplicaStatus, TritonPorts
from toolkit.supervisor.triton_server import TritonServer, prepare_backend_dir, pytriton_dist


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


def test_model_control_is_restricted_to_a_fresh_secret(tmp_path: Path) -> None:
    from toolkit.supervisor.admin_auth import ADMIN_HEADER, RESTRICTED_PROTOCOLS

    first, second = TritonServer(tmp_path), TritonServer(tmp_path)
    assert first.admin_key != second.admin_key and len(first.admin_key) >= 40
    command = first.command(tmp_path / "backends")
    expected = f"{','.join(RESTRICTED_PROTOCOLS)}:{ADMIN_HEADER}={first.admin_key}"
    assert f"--grpc-restricted-protocol={expected}" in command
    assert f"--http-restricted-api={expected}" in command
    assert "model-repository" in RESTRICTED_PROTOCOLS and "inference" not in RESTRICTED_PROTOCOLS
    assert first.admin_key not in repr(first)


def test_serve_binds_triton_to_loopback_whatever_host_says(tmp_path: Path) -> None:
    from toolkit.supervisor.serve import ServeOptions, Supervisor

    (tmp_path / "chat" / "1").mkdir(parents=True)
    (tmp_path / "chat" / "config.pbtxt").write_text('name: "chat"\nbackend: "python"\n')
    for file in ("model.py", "manifest.json"):
        (tmp_path / "chat" / "1" / file).write_text("")
    options = ServeOptions(repository=tmp_path, host="0.0.0.0", log_dir=tmp_path / "logs",
                           triton_ports=[TritonPorts(8000, 8001, 8002)])
    supervisor = Supervisor(options, say=lambda _: None)
    assert supervisor.triton.host == "127.0.0.1" and supervisor.state.host == "0.0.0.0"
    assert supervisor.triton.admin_key == supervisor.admin_key


def test_a_gateway_that_exits_with_a_configuration_error_is_not_restarted(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from toolkit.supervisor.serve import ServeOptions, Supervisor

    (tmp_path / "chat" / "1").mkdir(parents=True)
    (tmp_path / "chat" / "config.pbtxt").write_text('name: "chat"\nbackend: "python"\n')
    for file in ("model.py", "manifest.json"):
        (tmp_path / "chat" / "1" / file).write_text("")
    supervisor = Supervisor(ServeOptions(repository=tmp_path, log_dir=tmp_path / "logs",
                                         triton_ports=[TritonPorts(8000, 8001, 8002)]), say=lambda _: None)
    supervisor.tritons[0].status = ReplicaStatus.READY
    monkeypatch.setattr(supervisor.triton, "is_alive", lambda: True)
    restarts: list[str] = []
    monkeypatch.setattr(supervisor, "_start_gateway", lambda: restarts.append("restart"))
    with (tmp_path / "logs" / "gateway.log").open("wb") as log:
        supervisor.gateway = subprocess.Popen(
            [sys.executable, "-c", "import sys; print('error: invalid gateway setting api_keys: too short', "
             "file=sys.stderr); sys.exit(2)"], stderr=log)
    supervisor.gateway.wait(30)
    with pytest.raises(ServingError, match="^the gateway refused to start after a restart: invalid gateway setting "
                                           "api_keys: too short$"):
        supervisor.watch(stop_after_s=5)
    assert restarts == []
