"""The package structure, read from the source with ast (imports inside functions count too).

Rules: no import cycles, between modules or between the toolkit's packages; the toolkit's packages
sit in layers and import only from their own layer and those below (:data:`LAYERS`: no upward
arrows); nothing in ``toolkit`` imports the gateway; the build stages are imported by the pipeline
only (so no stage imports another); the runtime (what runs inside Triton) imports nothing of the
build, and the repository format no build config; the gateway imports from the toolkit only the
repository contract (contract, spec, manifest, config reading, layout), the errors and the version,
and does not pull in more through them; no two modules of the project share a name.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("toolkit", "gateway")
GATEWAY_MAY_IMPORT = {"toolkit", "toolkit.errors", "toolkit.repository.contract", "toolkit.repository.manifest",
                      "toolkit.repository.pbtxt", "toolkit.repository.layout", "toolkit.repository.spec",
                      "toolkit.supervisor.admin_auth"}  # the Triton model-control header (standard library only)
# What those may import in turn: the gateway image needs no build stack (torch, the stages, the serving runtime).
GATEWAY_CLOSURE = GATEWAY_MAY_IMPORT | {"toolkit.repository", "toolkit.files", "toolkit.supervisor"}
# The toolkit's layers, bottom first (README: layout). A module imports from its own layer and the ones below.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("toolkit", "toolkit.errors", "toolkit.files"),  # the version, the error types, atomic files and hashes
    ("toolkit.model_io",),  # model directories on disk: Hugging Face models, tokenizer files, ONNX files
    ("toolkit.repository",),  # the Triton model repository format: contract, spec, manifest, configs, writer
    ("toolkit.runtime", "toolkit.supervisor"),  # what runs inside Triton; the processes that run Triton
    ("toolkit.buildsys",),  # the build's config, stage interface, reports, logs, memory guard, code digests
    ("toolkit.datasets", "toolkit.training", "toolkit.export", "toolkit.quality"),  # what the stages do
    ("toolkit.stages",),  # the stages and the pipeline that orders them
    ("toolkit.terminal_chat", "toolkit.cli", "toolkit.__main__"),  # the commands
)
# The build (its machinery, libraries, stages and commands) and its one torch-bound model loader.
BUILD = tuple(name for layer in LAYERS[4:] for name in layer)
TORCH_BOUND = ("toolkit.model_io.modeling",)
# Names every package or endpoint may have: package files, pytest's conftest, and the gateway's per-endpoint
# protocol (request and response models) and router (the routes), as in vLLM's entrypoints/openai/<endpoint>/.
SHARED_NAMES = {"__init__", "__main__", "conftest"}
ENDPOINT_NAMES = {"protocol", "router"}
SOURCE_FOLDERS = ("toolkit", "gateway", "tests", "benchmarks", "deploy")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imported(name: str, path: Path) -> Iterator[str]:
    """The package modules `name` imports: ``from a import b`` is a.b when that is a module, else a."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")
                base = ".".join([*parts[: len(parts) - node.level + is_package], *([base] if base else [])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import a.b.c` of a module imports a.b.c
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target


GRAPH = {name: sorted(set(_imported(name, path))) for name, path in MODULES.items()}


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_walk_sees_the_packages() -> None:
    """Guards the rules below against passing on an empty graph."""
    assert {"toolkit.stages.pipeline", "toolkit.stages.merge", "gateway.app",
            "toolkit.runtime.triton_model.model"} <= set(GRAPH)
    assert "toolkit.stages.merge" in GRAPH["toolkit.stages.pipeline"]
    assert "toolkit.repository.contract" in GRAPH["gateway.triton"]


def test_no_import_cycles() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in GRAPH[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            visit(node)
    assert cycles == []


def _layer(module: str) -> int:
    """The layer of a toolkit module: that of the longest package named in LAYERS it is in ("toolkit" is its
    ``__init__`` alone, so a new package or flat module must be placed)."""
    best = max(((len(name), index) for index, layer in enumerate(LAYERS) for name in layer
                if module == name or name != "toolkit" and _under(module, name)), default=None)
    if best is None:
        raise AssertionError(f"{module} is in no layer of LAYERS: add its package there (and to the README)")
    return best[1]


def test_every_toolkit_module_has_a_layer() -> None:
    for module in MODULES:
        if _under(module, "toolkit"):
            _layer(module)


def test_no_upward_arrows() -> None:
    bad = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})" for m, targets in GRAPH.items()
           if _under(m, "toolkit") for t in targets if _under(t, "toolkit") and _layer(t) > _layer(m)]
    assert bad == []


def test_no_cycles_between_the_toolkits_packages() -> None:
    """Within a layer, packages may use each other one way only (quality uses datasets, never the reverse)."""
    def package(module: str) -> str:
        return ".".join(module.split(".")[:2])

    edges: dict[str, set[str]] = defaultdict(set)
    for m, targets in GRAPH.items():
        for t in targets:
            if _under(m, "toolkit") and _under(t, "toolkit") and package(m) != package(t):
                edges[package(m)].add(package(t))

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo += edges.get(node, set())
        return False

    assert sorted((a, b) for a in list(edges) for b in edges[a] if reaches(b, a)) == []


def test_no_two_modules_share_a_name() -> None:
    """Across the toolkit, the gateway, the tests, the benchmarks and deploy: a name says which module it is."""
    where: dict[str, list[str]] = defaultdict(list)
    for folder in SOURCE_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT)
            name = rel.parent.name if path.stem == "__init__" else path.stem
            endpoint = rel.parts[0] == "gateway" and len(rel.parts) == 3 and path.stem in ENDPOINT_NAMES
            if path.stem not in SHARED_NAMES - {"__init__"} and not endpoint:
                where[name].append(rel.as_posix())
    assert {name: paths for name, paths in where.items() if len(paths) > 1} == {}


def test_the_toolkit_never_imports_the_gateway() -> None:
    bad = [(m, t) for m, targets in GRAPH.items() if _under(m, "toolkit") for t in targets if _under(t, "gateway")]
    assert bad == []


def test_stages_are_imported_by_the_pipeline_only() -> None:
    bad = [(m, t) for m, targets in GRAPH.items() for t in targets
           if _under(t, "toolkit.stages") and t not in ("toolkit.stages", "toolkit.stages.pipeline")
           and m != "toolkit.stages.pipeline"]
    assert bad == []


@pytest.mark.parametrize(("package", "forbidden"), [
    # The writer takes a RepositorySpec, not the build config; it reads a merged model's tokenizer
    # (toolkit.model_io.modeling) and copies the runtime's model.py as a file, never importing it.
    ("toolkit.repository", (*BUILD, "toolkit.runtime", "toolkit.supervisor")),
    # It runs in Triton's python backend, which has no torch or transformers (Dockerfile.triton).
    ("toolkit.runtime", (*BUILD, *TORCH_BOUND)),
])
def test_runtime_and_format_do_not_reach_into_the_build(package: str, forbidden: tuple[str, ...]) -> None:
    bad = [(m, t) for m, targets in GRAPH.items() if _under(m, package) for t in targets if _under(t, *forbidden)]
    assert bad == []


def test_the_gateway_imports_only_the_repository_contract_and_errors() -> None:
    direct = {t for m, targets in GRAPH.items() if _under(m, "gateway") for t in targets if _under(t, "toolkit")}
    assert direct <= GATEWAY_MAY_IMPORT, direct - GATEWAY_MAY_IMPORT
    seen, todo = set(), list(direct)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += GRAPH[module]
    assert seen <= GATEWAY_CLOSURE, seen - GATEWAY_CLOSURE


def test_the_generation_model_imports_without_the_build_stack_or_protobuf() -> None:
    """Triton's python backend image has numpy, onnxruntime and pydantic only (Dockerfile.triton)."""
    script = (
        "import sys\n"
        "for name in ('google.protobuf', 'tritonclient', 'torch', 'transformers', 'yaml', 'typer'):\n"
        "    sys.modules[name] = None  # importing it now raises ImportError\n"
        "from tests.unit import fake_pb_utils\n"
        "sys.modules['triton_python_backend_utils'] = fake_pb_utils\n"
        "import toolkit.runtime.triton_model.model\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False,
                          cwd=ROOT)  # `python -c` puts the working directory first on sys.path
    assert proc.returncode == 0, proc.stderr
