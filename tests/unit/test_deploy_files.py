"""Deployment files against the code they configure: drift here fails CI, not a rollout.

Every ``GATEWAY_*`` variable in docker-compose.yml, deploy/k8s and the Dockerfiles must be a
``GatewaySettings`` field in a format its validators accept; the Triton command lines, ports and
model name must match ``toolkit serve``; every metric the Grafana dashboard, the prometheus-adapter
rules and the HPA use must be one the gateway, the generation model or Triton itself exports.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings
from toolkit.buildsys.config import ModelSection
from toolkit.repository.plan_script import TRITON_IMAGE
from toolkit.runtime.model_metrics import TritonMetrics
from toolkit.supervisor import triton_server
from toolkit.supervisor.serve import ServeOptions

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
GRAFANA = DEPLOY / "grafana"
DOCKERFILES = (ROOT / "Dockerfile.gateway", ROOT / "Dockerfile.triton")

# Triton's own metrics (docs: user_guide/metrics.md) that the deploy files may use.
TRITON_METRICS = frozenset({
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
    "nv_inference_exec_count", "nv_inference_pending_request_count", "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us", "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us", "nv_inference_compute_output_duration_us",
    "nv_gpu_utilization", "nv_gpu_memory_total_bytes", "nv_gpu_memory_used_bytes", "nv_gpu_power_usage",
    "nv_cpu_utilization", "nv_cpu_memory_total_bytes", "nv_cpu_memory_used_bytes",
})
_PROMQL_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
                              "and", "or", "unless", "inf", "nan"})


# ---------------------------------------------------------------- readers


def _yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _k8s_docs() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in _yaml_docs(path)]


def _k8s_object(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _k8s_docs() if d.get("kind") == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name} in deploy/k8s"
    return found[0]


def _container(deployment: str) -> dict[str, Any]:
    container: dict[str, Any] = _k8s_object("Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]
    return container


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return compose


def _dockerfile_env(path: Path) -> dict[str, str]:
    """``ENV K=V ...`` instructions of a Dockerfile (continuation lines joined, comments dropped)."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    env: dict[str, str] = {}
    for instruction in "\n".join(lines).replace("\\\n", " ").splitlines():
        if instruction.startswith("ENV "):
            env.update(token.split("=", 1) for token in shlex.split(instruction[4:]) if "=" in token)
    return env


def _dockerfile_cmd(path: Path) -> str:
    text = path.read_text().replace("\\\n", " ")
    cmd = [line for line in text.splitlines() if line.startswith("CMD ")]
    assert len(cmd) == 1, f"{path.name}: expected one CMD"
    return " ".join(json.loads(cmd[0][4:]))


def _env_var(name: str) -> str:
    return f"GATEWAY_{name}".upper()


# What a deployment fills in from outside: compose's ${TRITON_ADMIN_KEY:?...}, k8s's secretKeyRef.
STAND_IN_SECRET = "Zq3-stand-in-secret-Hk8vP2wXy9"


def _resolve(value: str) -> str:
    return re.sub(r"\$\{[A-Z_]+:\?[^}]*\}", STAND_IN_SECRET, value)


def _gateway_env_sets() -> dict[str, dict[str, str]]:
    """Every place that sets gateway environment variables, as name -> value (secrets stood in for)."""
    compose_env = _compose()["services"]["gateway"]["environment"]
    if isinstance(compose_env, list):
        compose_env = dict(item.split("=", 1) for item in compose_env)
    compose_env = {k: _resolve(str(v)) for k, v in compose_env.items()}
    k8s_env = {e["name"]: e.get("value", STAND_IN_SECRET) for e in _container("gateway").get("env", [])}
    return {
        "docker-compose.yml": {k: str(v) for k, v in compose_env.items()},
        "deploy/k8s/gateway.yaml": k8s_env,
        "Dockerfile.gateway": _dockerfile_env(ROOT / "Dockerfile.gateway"),
    }


# ---------------------------------------------------------------- gateway settings


def test_every_gateway_variable_mentioned_in_deploy_files_is_a_setting() -> None:
    fields = {_env_var(name) for name in GatewaySettings.model_fields}
    sources = [ROOT / "docker-compose.yml", *DOCKERFILES, *sorted(K8S.glob("*.yaml"))]
    used = {(path.name, var) for path in sources for var in re.findall(r"\bGATEWAY_[A-Z0-9_]+", path.read_text())}
    assert used, "no GATEWAY_ variable found: the deploy files moved?"
    unknown = sorted(f"{source}: {var}" for source, var in used if var not in fields)
    assert not unknown, f"not a GatewaySettings field: {unknown}"


@pytest.mark.parametrize("source", ["docker-compose.yml", "deploy/k8s/gateway.yaml", "Dockerfile.gateway"])
def test_deployed_gateway_environment_validates(source: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in [n for n in os.environ if n.upper().startswith("GATEWAY_")]:
        monkeypatch.delenv(name)
    env = _gateway_env_sets()[source]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # Paths inside the container do not exist here: stand in for them, keep every other value as deployed.
    monkeypatch.setenv("GATEWAY_REPOSITORY", str(tmp_path))
    if "GATEWAY_API_KEYS_FILE" in env:
        keys = tmp_path / "api_keys"
        keys.write_text((DEPLOY / "api_keys.example").read_text() + "Vq7-a-real-key-Rt5mN8bXw2\n")
        monkeypatch.setenv("GATEWAY_API_KEYS_FILE", str(keys))
    settings = GatewaySettings()
    if "GATEWAY_TRITON_URLS" in env:
        assert settings.triton_urls == ["triton:8001"]
    if "GATEWAY_PORT" in env:
        assert settings.port == 8080


@pytest.mark.parametrize("example", [DEPLOY / "api_keys.example", K8S / "api_keys.example"])
def test_shipped_key_files_hold_no_usable_key(example: Path, tmp_path: Path) -> None:
    """A deployment started as shipped refuses to start, with the line that makes a key."""
    with pytest.raises(ValidationError, match="holds no key; generate one with"):
        GatewaySettings(repository=tmp_path, api_keys_file=example)


def test_compose_publishes_only_the_gateway() -> None:
    services = _compose()["services"]
    assert "ports" not in services["triton"], "Triton must not be published: only the gateway talks to it"
    published = {name: [str(p) for p in svc.get("ports", [])] for name, svc in services.items()}
    open_to_network = {name: [p for p in ports if not p.startswith("127.0.0.1:")] for name, ports in published.items()}
    assert {name: ports for name, ports in open_to_network.items() if ports} == {"gateway": ["8080:8080"]}
    # Both sides of the model-control secret come from the same variable, and it is required.
    triton_key = services["triton"]["environment"]["TRITON_ADMIN_KEY"]
    assert triton_key.startswith("${TRITON_ADMIN_KEY:?")
    assert services["gateway"]["environment"]["GATEWAY_TRITON_ADMIN_KEY"] == triton_key


def test_k8s_network_policy_admits_only_the_gateway_and_prometheus_to_triton() -> None:
    policies = [d for d in _k8s_docs() if d.get("kind") == "NetworkPolicy"]
    default_deny = [p for p in policies if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]]
    assert default_deny and default_deny[0]["spec"]["policyTypes"] == ["Ingress"]
    triton = [p for p in policies if p["spec"]["podSelector"].get("matchLabels") == {"app": "triton"}]
    assert len(triton) == 1
    ports = {p["name"]: p["containerPort"] for p in _container("triton")["ports"]}
    allowed = {rule["ports"][0]["port"]: rule["from"] for rule in triton[0]["spec"]["ingress"]}
    assert set(allowed) == {ports["grpc"], ports["metrics"]}, "Triton's HTTP port must stay closed"
    assert allowed[ports["grpc"]] == [{"podSelector": {"matchLabels": {"app": "gateway"}}}]
    assert all("namespaceSelector" in peer and "podSelector" in peer for peer in allowed[ports["metrics"]])
    # Both sides of the model-control secret read the same Secret.
    refs = {name: {e["name"]: e.get("valueFrom") for e in _container(name)["env"]} for name in ("triton", "gateway")}
    assert refs["triton"]["TRITON_ADMIN_KEY"] == refs["gateway"]["GATEWAY_TRITON_ADMIN_KEY"] is not None
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert "network-policy.yaml" in kustomization["resources"]


def test_triton_image_is_the_one_the_plan_scripts_name() -> None:
    arg = re.search(r"^ARG TRITON_IMAGE=(\S+)$", (ROOT / "Dockerfile.triton").read_text(), re.M)
    assert arg and arg.group(1) == TRITON_IMAGE
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d)\.\d\d-py3", TRITON_IMAGE)
    assert TRITON_IMAGE in (ROOT / "README.md").read_text()


def test_gateway_points_at_tritons_grpc_port(tmp_path: Path) -> None:
    grpc_port = ServeOptions(repository=Path(".")).grpc_port
    service = _k8s_object("Service", "triton")
    assert {"name": "grpc", "port": grpc_port, "targetPort": "grpc"} in service["spec"]["ports"]
    container_ports = {p["name"]: p["containerPort"] for p in _container("triton")["ports"]}
    assert container_ports["grpc"] == grpc_port
    for source, env in _gateway_env_sets().items():
        if "GATEWAY_TRITON_URLS" in env:
            urls = GatewaySettings(repository=tmp_path, triton_urls=env["GATEWAY_TRITON_URLS"]).triton_urls
            assert urls == [f"triton:{grpc_port}"], source


def test_gateways_route_over_every_triton_pod_and_pods_drain_before_they_stop(tmp_path: Path) -> None:
    """The gateway resolves the headless Service to every ready pod; a stopping pod leaves DNS, then gets
    SIGTERM and has its exit timeout, within its grace period, to finish its longest possible stream."""
    service = _k8s_object("Service", "triton")
    deployment = _k8s_object("Deployment", "triton")
    assert service["spec"]["clusterIP"] == "None", "a ClusterIP balances connections: each gateway sticks to a pod"
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    env = _gateway_env_sets()["deploy/k8s/gateway.yaml"]
    settings = GatewaySettings(repository=tmp_path, triton_urls=env["GATEWAY_TRITON_URLS"],
                               triton_resolve_interval_s=env["GATEWAY_TRITON_RESOLVE_INTERVAL_S"])
    assert [url.rpartition(":")[0] for url in settings.triton_urls] == [service["metadata"]["name"]]

    pod = deployment["spec"]["template"]["spec"]
    container = _container("triton")
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    pre_stop_s = float(pre_stop[1])
    exit_timeout_s = float(_flags(_triton_commands()["deploy/k8s/triton.yaml"])["--exit-timeout-secs"])
    assert pre_stop_s >= 2 * settings.triton_resolve_interval_s  # every gateway has looked the name up again
    assert exit_timeout_s >= settings.request_timeout_s  # the longest generation the gateway allows finishes
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + exit_timeout_s
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    hpa = _k8s_object("HorizontalPodAutoscaler", "triton")
    assert hpa["spec"]["minReplicas"] >= 2, "one Triton pod lost must not be an outage"
    budget = _k8s_object("PodDisruptionBudget", "triton")
    assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_api_key_files_are_where_the_deployments_mount_them() -> None:
    gateway = _compose()["services"]["gateway"]
    key_path = Path(gateway["environment"]["GATEWAY_API_KEYS_FILE"])
    assert key_path.parent == Path("/run/secrets") and key_path.name in gateway["secrets"]
    assert (ROOT / _compose()["secrets"][key_path.name]["file"]).is_file()

    container = _container("gateway")
    env = {e["name"]: e.get("value") for e in container["env"]}
    key_path = Path(env["GATEWAY_API_KEYS_FILE"])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(key_path.parent))
    volumes = _k8s_object("Deployment", "gateway")["spec"]["template"]["spec"]["volumes"]
    secret = next(v["secret"]["secretName"] for v in volumes if v["name"] == mount["name"])
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    generator = next(g for g in kustomization["secretGenerator"] if g["name"] == secret)
    files = dict(f.split("=", 1) for f in generator["files"])
    # kustomize refuses files outside its directory (the default load restrictor).
    target = (K8S / files[key_path.name]).resolve()
    assert target.is_file() and target.is_relative_to(K8S.resolve())


# ---------------------------------------------------------------- Triton command lines


def _triton_commands() -> dict[str, str]:
    args = _container("triton")["args"]
    return {"Dockerfile.triton": _dockerfile_cmd(ROOT / "Dockerfile.triton"), "deploy/k8s/triton.yaml": args[-1]}


def _flags(command: str) -> dict[str, str]:
    return dict(tok.split("=", 1) if "=" in tok else (tok, "") for tok in shlex.split(command) if tok.startswith("--"))


def test_triton_command_lines_match_toolkit_serve(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(triton_server, "pytriton_dist", lambda: tmp_path)
    options = ServeOptions(repository=tmp_path)
    launcher = triton_server.TritonServer(tmp_path, models=["m"], metrics_port=options.metrics_port)
    ours = _flags(" ".join(launcher.command(tmp_path)[1:]))
    model_name = ModelSection().name
    assert _dockerfile_env(ROOT / "Dockerfile.triton")["MODEL_NAME"] == "${MODEL_NAME}"
    assert re.search(rf"^ARG MODEL_NAME={re.escape(model_name)}$", (ROOT / "Dockerfile.triton").read_text(), re.M)
    k8s_env = {e["name"]: e.get("value") for e in _container("triton")["env"]}
    assert k8s_env["MODEL_NAME"] == model_name
    for source, command in _triton_commands().items():
        flags = _flags(command)
        unknown = set(flags) - set(ours) - {"--log-info"}
        assert not unknown, f"{source}: flags toolkit serve never passes: {sorted(unknown)}"
        assert flags["--model-control-mode"] == ours["--model-control-mode"] == "explicit", source
        assert flags["--model-repository"] == "/models", source
        assert flags["--load-model"] in ("${MODEL_NAME}", "$(MODEL_NAME)"), source
        assert flags["--metrics-port"] == str(options.metrics_port), source
        assert flags["--allow-metrics"] == "true", source
        for flag in ("--grpc-restricted-protocol", "--http-restricted-api"):  # same protocols and header name
            assert flags[flag].rpartition("=")[0] == ours[flag].rpartition("=")[0], source
            assert flags[flag].rpartition("=")[2] in ("${TRITON_ADMIN_KEY}", "$(TRITON_ADMIN_KEY)"), source


def test_triton_ports_and_scrape_targets_agree() -> None:
    options = ServeOptions(repository=Path("."))
    exposed = re.search(r"^EXPOSE (.+)$", (ROOT / "Dockerfile.triton").read_text(), re.M)
    assert exposed and exposed.group(1).split() == [str(p) for p in (options.http_port, options.grpc_port,
                                                                      options.metrics_port)]
    container = _container("triton")
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "http": options.http_port, "grpc": options.grpc_port, "metrics": options.metrics_port}
    annotations = _k8s_object("Deployment", "triton")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(options.metrics_port)
    gateway_annotations = _k8s_object("Deployment", "gateway")["spec"]["template"]["metadata"]["annotations"]
    assert gateway_annotations["prometheus.io/port"] == str(options.gateway_port)

    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in prometheus["scrape_configs"]}
    assert targets == {"triton": [f"triton:{options.metrics_port}"], "gateway": [f"gateway:{options.gateway_port}"]}


# ---------------------------------------------------------------- metrics


class _RecordingFamily:
    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
    registered: list[tuple[str, str]] = []

    def __init__(self, name: str, description: str, kind: str) -> None:
        _RecordingFamily.registered.append((name, kind))

    def Metric(self, labels: dict[str, str], buckets: list[float] | None = None) -> object:  # noqa: N802
        return object()


def _generation_model_series() -> set[str]:
    """Series names the generation model's ``pb_utils.MetricFamily`` metrics appear under on Triton."""
    _RecordingFamily.registered = []
    TritonMetrics(type("pb_utils", (), {"MetricFamily": _RecordingFamily}), "m", "1")
    series = set()
    for name, kind in _RecordingFamily.registered:
        suffixes = ("_bucket", "_sum", "_count") if kind == _RecordingFamily.HISTOGRAM else ("",)
        series.update(name + suffix for suffix in suffixes)
    return series


def _gateway_series() -> set[str]:
    """Series names of the gateway's prometheus-client metrics (Counter adds _total, Histogram _bucket...)."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    return {f.name + s for f in GatewayMetrics().registry.collect() for s in suffixes[f.type]}


def known_series() -> set[str]:
    return _generation_model_series() | _gateway_series() | TRITON_METRICS


def promql_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression (or a prometheus-adapter query template)."""
    expr = re.sub(r"<<[^>]*>>", " ", expr)
    expr = re.sub(r"\"[^\"]*\"|'[^']*'", " ", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[match.end():].lstrip().startswith("(") or match.group() in _PROMQL_KEYWORDS:
            continue  # a function or aggregation, or a keyword
        names.add(match.group())
    return names


def test_promql_metrics_reads_names_not_functions_or_labels() -> None:
    expr = ('histogram_quantile(0.95, sum by (le) (rate(a_seconds_bucket{job="x"}[5m]))) '
            "/ on (pod) sum(b_total) * 1e3")
    assert promql_metrics(expr) == {"a_seconds_bucket", "b_total"}
    assert promql_metrics("sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)") == set()


def test_metric_names_cover_what_the_code_registers() -> None:
    series = known_series()
    assert {"gateway_requests_total", "gateway_request_duration_seconds_bucket", "gateway_requests_in_flight",
            "toolkit_requests_total", "toolkit_time_to_first_token_seconds_bucket", "toolkit_queue_depth"} <= series
    assert "gateway_requests" not in series  # prometheus-client exposes the counter only with _total


def test_dashboard_json_is_the_scripts_output() -> None:
    spec = importlib.util.spec_from_file_location("make_dashboard", GRAFANA / "make_dashboard.py")
    assert spec is not None and spec.loader is not None
    make_dashboard = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_dashboard)
    written = (GRAFANA / "dashboards" / "chat-serving.json").read_text()
    assert written == json.dumps(make_dashboard.dashboard(), indent=2) + "\n", (
        "dashboards/chat-serving.json is stale: run python deploy/grafana/make_dashboard.py")


def test_dashboard_uses_only_exported_metrics() -> None:
    dashboard = json.loads((GRAFANA / "dashboards" / "chat-serving.json").read_text())
    series, unknown = known_series(), []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names = promql_metrics(target["expr"])
            assert names, f"{panel['title']}: no metric found in {target['expr']!r}"
            unknown += [f"{panel['title']}: {name}" for name in sorted(names - series)]
    assert not unknown, f"metrics nothing exports: {unknown}"
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {d["uid"] for d in datasources["datasources"]}


def test_adapter_rules_and_hpa_use_exported_metrics() -> None:
    adapter = _yaml_docs(K8S / "prometheus-adapter.yaml")[0]
    series, exposed = known_series(), set()
    for rule in adapter["rules"]["custom"]:
        names = promql_metrics(rule["seriesQuery"]) | promql_metrics(rule["metricsQuery"])
        assert names and names <= series, f"adapter rule {rule['seriesQuery']!r}: unknown {sorted(names - series)}"
        exposed.add(rule["name"]["as"])
    hpa_metrics = [
        metric["pods"]["metric"]["name"]
        for doc in _k8s_docs() if doc.get("kind") == "HorizontalPodAutoscaler"
        for metric in doc["spec"]["metrics"] if metric["type"] == "Pods"
    ]
    assert hpa_metrics, "the Triton HPA scales on no custom metric"
    assert set(hpa_metrics) <= exposed, f"HPA metrics the adapter does not expose: {set(hpa_metrics) - exposed}"
