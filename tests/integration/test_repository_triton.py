"""The repository stage's output on a real Triton: the generated configs load and the model serves.

Builds a repository with ``write_repository`` from the session's tiny Llama export (SmolLM2's
tokenizer), loads the generation model with explicit model control, and checks greedy tokens
against the direct onnxruntime loop. The ``onnxruntime_onnx`` and ``tensorrt_plan`` core models
cannot load here (pytriton bundles only the python backend): their load errors must name that
cause, which proves their configs parsed.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from toolkit.buildsys.config import RepositorySection, ServingSection, TensorRTSection
from toolkit.quality.triton_client import GenerationClient
from toolkit.repository.writer import TrtInputs, write_repository
from toolkit.runtime.onnx_lm import OnnxCausalLM
from toolkit.stages.model_repository import plan_spec, repository_spec
from toolkit.supervisor.admin_auth import ADMIN_HEADER, GRPC_ADMIN_HEADER
from toolkit.supervisor.triton_server import TritonServer

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
HTTP_PORT, GRPC_PORT, METRICS_PORT = 18320, 18321, 18322
PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 2, 198, 1, 4093, 198]


def _post(path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{HTTP_PORT}{path}", method="POST", data=b"{}",
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_written_repository_loads_and_serves(tiny_onnx: Path, tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    shutil.copytree(FIXTURES / "smollm2_tokenizer", merged)
    shutil.copy2(tiny_onnx.parent / "config.json", merged / "config.json")
    (merged / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "bos_token_id": 1}))
    repo = tmp_path / "repo"
    written = write_repository(
        repo, model_name="tiny", merged_dir=merged, onnx_fp32=tiny_onnx,
        spec=repository_spec(RepositorySection(), ServingSection(), context_length=256),
        trt_inputs=TrtInputs(plan=plan_spec(TensorRTSection(max_input_len=128))),
    )
    assert written.manifest.stop_token_ids == [2]
    expected, _ = OnnxCausalLM(tiny_onnx, threads=1).greedy([PROMPT], 8, [2], pad_id=written.manifest.pad_token_id)

    server = TritonServer(repo, models=["tiny"], http_port=HTTP_PORT, grpc_port=GRPC_PORT,
                          metrics_port=METRICS_PORT, log_path=tmp_path / "tritonserver.log")
    server.start(ready_timeout_s=120)
    try:
        with GenerationClient(server.grpc_url, "tiny") as client:
            result = client.submit(PROMPT, max_tokens=8, temperature=0.0)
            client.wait([result], timeout_s=60)
        assert result.error is None
        assert len(expected[0]) >= 4 and result.tokens == expected[0]
        # Model control is closed to callers without the run's secret (HTTP and gRPC alike).
        status, body = _post("/v2/repository/models/tiny/unload")
        assert status == 403 and f"expecting header '{ADMIN_HEADER}'" in body
        with pytest.raises(InferenceServerException, match=f"expecting header '{GRPC_ADMIN_HEADER}'"):
            grpcclient.InferenceServerClient(server.grpc_url).unload_model("tiny")
        admin = {ADMIN_HEADER: server.admin_key}
        status, body = _post("/v2/repository/models/tiny_onnx_fp32/load", admin)
        assert status == 400 and "unable to find backend library for backend 'onnxruntime'" in body
        status, body = _post("/v2/repository/models/tiny_trt_fp16/load", admin)
        assert status == 400 and "at least one version must be available" in body  # no plan built here
    finally:
        server.stop()
