"""The writer of the Triton model repository: versioned, atomic, configs from typed objects.

Layout for model ``NAME`` (see ``model_repository/README.md``)::

    NAME/config.pbtxt                 python backend, decoupled generation model
    NAME/N/model.py                   copied from toolkit/runtime/triton_model/model.py
    NAME/N/manifest.json              toolkit.repository.manifest.ModelManifest
    NAME/N/tokenizer/                 tokenizer files, chat template, generation config
    NAME_onnx_fp32/N/model.onnx       onnxruntime_onnx core model (hard link when possible)
    NAME_onnx_int8/N/model.onnx       only if the INT8 variant passed its gate
    NAME_trt_fp16/, NAME_trt_int8/    tensorrt_plan config + build_plan.sh (+ N/model.plan when built)

Every build writes version N+1 of every model it ships. A version directory is written to a
hidden temp directory and renamed into place, core models first and the generation model last;
if anything fails, the versions this build already renamed are removed again, so no half version
is ever visible. Older versions beyond ``repository.keep_versions`` are pruned afterwards.
:func:`write_repository` is the same thing as a plain function; given :class:`ModelFacts` instead of
a merged model directory it also serves ``tests/devrepo.py`` (tests and benchmarks).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from toolkit import __version__
from toolkit.errors import StageError
from toolkit.files import (
    DIR_MODE,
    atomic_write_bytes,
    fsync_path,
    fsync_tree,
    publish_modes,
    sha256_file,
    sha256_text,
)
from toolkit.model_io.onnx_files import onnx_files
from toolkit.model_io.tokenizer_files import CHAT_TEMPLATE_FILE, copy_tokenizer_files
from toolkit.repository import contract
from toolkit.repository import plan_script as trt
from toolkit.repository.contract import LMInfo
from toolkit.repository.layout import core_model_name, existing_versions, next_version
from toolkit.repository.manifest import TOKENIZER_DIR, ArtifactRef, BuildFacts, ModelManifest
from toolkit.repository.pbtxt import (
    generation_model_config,
    onnx_core_config,
    tensorrt_core_config,
    write_config,
)
from toolkit.repository.plan_compat import BUILD_SCRIPT, PLAN_FILE, PLAN_META
from toolkit.repository.spec import PlanSpec, RepositorySpec

log = logging.getLogger(__name__)

MODEL_PY_SOURCE = Path(__file__).resolve().parent.parent / "runtime" / "triton_model" / "model.py"
REQUIRED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
ONNX_FILE = "model.onnx"


@dataclass(frozen=True)
class TrtInputs:
    """What the repository needs for the tensorrt_plan core models (their batch and context: the spec's)."""

    plan: PlanSpec
    qdq_onnx: Path | None = None  # source of the INT8 plan (a Q/DQ graph that passed its gate); None leaves it out
    qdq_missing: str = "no Q/DQ ONNX to build an INT8 plan from"  # why qdq_onnx is None, for the notes
    built: Mapping[str, Path] = field(default_factory=dict)  # precision -> dir with model.plan + plan_meta.json


@dataclass(frozen=True)
class ModelFacts:
    """What the repository records about the model beside its ONNX graph.

    `tokenizer_dir` holds the tokenizer files shipped beside the manifest (None ships none: the
    generation model works on token ids; only the gateway needs the tokenizer).
    """

    lm: LMInfo
    bos_token_id: int | None
    stop_token_ids: tuple[int, ...]
    pad_token_id: int
    chat_template: str
    tokenizer_dir: Path | None = None

    @classmethod
    def from_merged_dir(cls, merged_dir: Path) -> ModelFacts:
        """Shape, bos / stop / pad ids and chat template of a merged model, as the rest of the build computes them."""
        from toolkit.model_io.modeling import chat_template_of, load_tokenizer, pad_token_id, stop_token_ids

        lm = LMInfo.from_hf_config(merged_dir)
        tokenizer = load_tokenizer(merged_dir)
        gen_path = merged_dir / "generation_config.json"
        gen = SimpleNamespace(**json.loads(gen_path.read_text(encoding="utf-8"))) if gen_path.is_file() else None
        template_file = merged_dir / CHAT_TEMPLATE_FILE
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else chat_template_of(tokenizer)
        stops = stop_token_ids(tokenizer, gen)  # the tokenizer's eos, then the generation config's eos ids
        return cls(lm=lm, bos_token_id=tokenizer.bos_token_id, stop_token_ids=tuple(stops),
                   pad_token_id=pad_token_id(tokenizer), chat_template=template, tokenizer_dir=merged_dir)


@dataclass
class RepositoryWrite:
    """What :func:`write_repository` wrote."""

    root: Path
    version: int
    version_dirs: list[Path]
    model_dirs: list[Path]
    manifest: ModelManifest
    notes: list[str]
    pruned: list[Path]
    shared_files: list[Path] = field(default_factory=list)  # config.pbtxt and build_plan.sh, for every version


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link a large file (same filesystem), else copy it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _link_onnx(src: Path, version_tmp: Path, symlink: bool = False) -> list[str]:
    """Link the graph as ``model.onnx`` and its external data files under their own names; return those names."""
    if not src.is_file():
        raise StageError(f"ONNX model {src} not found; rerun the export stage (toolkit build --force --stages "
                         "export_onnx)")
    graph, *data = onnx_files(src)  # a graph over 2 GiB keeps its weights beside it, named in the graph
    missing = [path for path in data if not path.is_file()]
    if missing:
        raise StageError(f"{src} refers to external data {missing[0]} that does not exist; rerun the stage that "
                         "made it")
    for source, dest in ((graph, version_tmp / ONNX_FILE), *((path, version_tmp / path.name) for path in data)):
        dest.symlink_to(source.resolve()) if symlink else link_or_copy(source, dest)
    return [path.name for path in data]


CORE_PRECISIONS = ("onnx_fp32", "onnx_int8", "trt_fp16", "trt_int8")


def drop_unfinished_versions(output: Path, model_name: str) -> list[Path]:
    """Remove core-model versions above the generation model's newest: what a killed build left.

    A build writes its core models' versions first and the generation model's last, so a core
    version with no generation version of its number was never finished (a SIGKILL skips the
    rollback). Left in place it would be served by nothing and verified by no manifest.
    """
    newest = max(existing_versions(output / model_name), default=0)
    removed = []
    for precision in CORE_PRECISIONS:
        model_dir = output / core_model_name(model_name, precision)
        for version in existing_versions(model_dir):
            if version > newest:
                log.warning("removing %s: a version an interrupted build left unfinished", model_dir / str(version))
                shutil.rmtree(model_dir / str(version))
                removed.append(model_dir / str(version))
    return removed


def _clean_temps(model_dir: Path) -> None:
    if model_dir.is_dir():
        for stale in model_dir.glob(".*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)


class _VersionWriter:
    """Writes version dirs via temp dir + rename; rolls every renamed one back if the build fails."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.done: list[Path] = []
        self.replaced: list[tuple[Path, bytes | None, int]] = []  # files overwritten in place, as they were

    def write_file(self, path: Path, write: Any) -> None:
        """Run `write` (an atomic write of `path`), remembering what `path` held so rollback restores it."""
        if path.is_file():
            self.replaced.append((path, path.read_bytes(), path.stat().st_mode & 0o777))
        else:
            self.replaced.append((path, None, 0))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.parent.chmod(DIR_MODE)
        write()

    @contextlib.contextmanager
    def version_dir(self, model_dir: Path) -> Iterator[Path]:
        final = model_dir / str(self.version)
        if final.exists():
            raise StageError(f"{final} already exists; remove it or let the next build write a new version")
        model_dir.mkdir(parents=True, exist_ok=True)
        model_dir.chmod(DIR_MODE)  # the servers' users list it (a umask of 077 would make it 0700)
        _clean_temps(model_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.version}.tmp-", dir=model_dir))
        try:
            yield tmp
            publish_modes(tmp)  # readable by the servers' users (mkdtemp made it 0700)
            fsync_tree(tmp)
            tmp.rename(final)
            fsync_path(model_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            with contextlib.suppress(OSError):
                model_dir.rmdir()  # only if this build created it and left nothing in it
            raise
        self.done.append(final)

    def rollback(self) -> None:
        for path, content, mode in reversed(self.replaced):
            with contextlib.suppress(OSError):
                if content is None:
                    path.unlink(missing_ok=True)
                else:
                    atomic_write_bytes(path, content, mode)
        self.replaced.clear()
        for path in reversed(self.done):
            shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # a model this build created: nothing else is in it
        self.done.clear()


def _copy_tokenizer(tokenizer_dir: Path, dest: Path, template: str) -> None:
    missing = [n for n in REQUIRED_TOKENIZER_FILES if not (tokenizer_dir / n).is_file()]
    if missing:
        raise StageError(f"{tokenizer_dir} lacks {', '.join(missing)}: the merged model has no saved tokenizer")
    dest.mkdir(parents=True)
    copy_tokenizer_files(tokenizer_dir, dest)  # byte for byte, as merge left them
    if (tokenizer_dir / "generation_config.json").is_file():
        shutil.copyfile(tokenizer_dir / "generation_config.json", dest / "generation_config.json")
    if template and not (dest / CHAT_TEMPLATE_FILE).is_file():  # the gateway renders with the template
        (dest / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")


def _ref(root: Path, path: Path) -> ArtifactRef:
    return ArtifactRef(path=path.relative_to(root).as_posix(), sha256=sha256_file(path))


def served_core_precision(choice: str, *, int8_shipped: bool, why_not: str = "") -> str:
    """The core model (``onnx_fp32``/``onnx_int8``) that ``repository.serving_precision`` selects.

    ``int8`` when the INT8 variant did not pass its gate is an error, not a silent fallback:
    `why_not` (the failed gates) goes into the message.
    """
    if choice == "int8" and not int8_shipped:
        raise StageError(
            "repository.serving_precision is int8 but the INT8 variant did not pass the quantize stage's gate"
            f"{f' ({why_not})' if why_not else ''}; serve fp32 or auto (INT8 only when it passes), or change "
            "quantize.method / the quantize.max_* thresholds and rebuild")
    if choice == "int8" or (choice == "auto" and int8_shipped):
        return "onnx_int8"
    return "onnx_fp32"


def write_repository(
    output: Path,
    *,
    model_name: str,
    spec: RepositorySpec,
    merged_dir: Path | None = None,
    model: ModelFacts | None = None,
    onnx_fp32: Path,
    onnx_int8: Path | None = None,
    base_model: str = "",
    adapter_sha256: str | None = None,
    trt_inputs: TrtInputs | None = None,
    model_py: Path | None = None,
    extra_parameters: Mapping[str, str] | None = None,
    symlink_onnx: bool = False,
    build: BuildFacts | None = None,
) -> RepositoryWrite:
    """Write version N+1 of the generation model and its core models into `output`; prune old versions.

    `merged_dir` is a Hugging Face model directory with the tokenizer (config.json, tokenizer.json,
    tokenizer_config.json, ...); or pass what it would give as `model` instead. `onnx_fp32` is the
    KV-cache ONNX export; `onnx_int8` the INT8 variant, only when it passed its gate. `spec` is
    everything else the repository is written with (batching, served limits, context, runner).
    `extra_parameters` are added to the generation model's
    config parameters (e.g. EXECUTION_ENV_PATH). `symlink_onnx` links the core models to the
    exports instead of holding them (hard link or copy): for dev repositories beside a build only,
    a shipped repository must stand alone. `build` (scores and gates) goes into the manifest.
    """
    model_py = model_py or MODEL_PY_SOURCE
    if not model_py.is_file():
        raise StageError(f"the Triton generation model {model_py} does not exist yet; it comes with the serving "
                         "package (toolkit/runtime/triton_model/model.py), install or update the toolkit")
    if merged_dir is not None and model is None:
        facts = ModelFacts.from_merged_dir(merged_dir)
    elif model is not None and merged_dir is None:
        facts = model
    else:
        raise ValueError("write_repository takes one of merged_dir and model")
    if not output.exists():
        output.mkdir(parents=True)
        output.chmod(DIR_MODE)
    lm = facts.lm
    drop_unfinished_versions(output, model_name)
    version = next_version(output, model_name)
    notes: list[str] = []
    batching: dict[str, Any] = {"max_batch_size": spec.batching.max_batch_size,
                                "preferred_batch_sizes": list(spec.batching.preferred_batch_sizes),
                                "max_queue_delay_us": spec.batching.max_queue_delay_us,
                                "instance_count": spec.batching.instance_count}
    precisions = ["onnx_fp32"] + (["onnx_int8"] if onnx_int8 is not None else [])
    served = served_core_precision(spec.serving_precision, int8_shipped=onnx_int8 is not None)
    if spec.serving_precision == "auto" and served == "onnx_fp32":
        notes.append("serving_precision auto: INT8 not shipped, the generation model runs onnx_fp32")
    core = core_model_name(model_name, served)
    writer = _VersionWriter(version)
    configs: list[tuple[Path, Any]] = []
    scripts: list[tuple[Path, str]] = []
    artifacts: dict[str, ArtifactRef] = {}
    fp32_data: list[str] = []  # the FP32 graph's external data files, beside it in its version
    try:
        for precision, src in (("onnx_fp32", onnx_fp32), ("onnx_int8", onnx_int8)):
            if src is None:
                continue
            model_dir = output / core_model_name(model_name, precision)
            with writer.version_dir(model_dir) as tmp:
                data_files = _link_onnx(src, tmp, symlink_onnx)
            artifacts[precision] = _ref(output, model_dir / str(version) / ONNX_FILE)
            for name in data_files:
                artifacts[f"{precision}/{name}"] = _ref(output, model_dir / str(version) / name)
            if precision == "onnx_fp32":
                fp32_data = data_files
            configs.append((model_dir, onnx_core_config(model_dir.name, lm, **batching)))
        if trt_inputs is not None:
            notes += _write_trt_models(output, model_name, version, lm, trt_inputs, spec, batching, writer,
                                       configs, scripts, artifacts, precisions, fp32_data)
        params = {
            contract.PARAM_CORE_MODEL: core,
            contract.PARAM_RUNNER: spec.runner,
            **spec.limits.parameters(),
            **(extra_parameters or {}),
        }
        gen_dir = output / model_name
        configs.append((gen_dir, generation_model_config(model_name, parameters=params, **batching)))
        with writer.version_dir(gen_dir) as tmp:
            shutil.copy2(model_py, tmp / "model.py")
            artifacts["model_py"] = ArtifactRef(path=f"{model_name}/{version}/model.py", sha256=sha256_file(model_py))
            if facts.tokenizer_dir is not None:
                _copy_tokenizer(facts.tokenizer_dir, tmp / TOKENIZER_DIR, facts.chat_template)
                for path in sorted((tmp / TOKENIZER_DIR).iterdir()):
                    artifacts[f"tokenizer/{path.name}"] = ArtifactRef(
                        path=f"{model_name}/{version}/{TOKENIZER_DIR}/{path.name}", sha256=sha256_file(path))
            manifest = ModelManifest(
                model_name=model_name, version=version, base_model=base_model, adapter_sha256=adapter_sha256,
                toolkit_version=__version__, built_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                context_length=spec.context_length, vocab_size=lm.vocab_size, num_layers=lm.num_layers,
                num_kv_heads=lm.num_kv_heads, head_dim=lm.head_dim, bos_token_id=facts.bos_token_id,
                eos_token_ids=list(facts.stop_token_ids), stop_token_ids=list(facts.stop_token_ids),
                pad_token_id=facts.pad_token_id, chat_template=facts.chat_template,
                chat_template_sha256=sha256_text(facts.chat_template), serving_core_model=core,
                artifacts=artifacts, precisions=precisions, build=build,
            )
            manifest.save(tmp)
        # Configs and plan scripts last: they apply to every version of a model (a script builds
        # version N), so they change only once every new version directory is in place.
        for model_dir, config in configs:
            writer.write_file(model_dir / contract.CONFIG_FILE, lambda d=model_dir, c=config: write_config(d, c))
        for script_path, text in scripts:
            writer.write_file(script_path, lambda p=script_path, t=text: trt.write_build_script(p, t))
    except BaseException:
        writer.rollback()
        raise
    pruned = prune_versions([d for d, _ in configs], spec.keep_versions)
    return RepositoryWrite(root=output, version=version, version_dirs=list(writer.done),
                           model_dirs=[d for d, _ in configs], manifest=manifest, notes=notes, pruned=pruned,
                           shared_files=[d / contract.CONFIG_FILE for d, _ in configs] + [p for p, _ in scripts])


def _write_trt_models(
    output: Path, model_name: str, version: int, lm: LMInfo, inputs: TrtInputs, spec: RepositorySpec,
    batching: dict[str, Any],
    writer: _VersionWriter, configs: list[tuple[Path, Any]], scripts: list[tuple[Path, str]],
    artifacts: dict[str, ArtifactRef], precisions: list[str], fp32_data: list[str],
) -> list[str]:
    notes: list[str] = []
    profile = trt.kv_cache_profile(lm, max_batch=spec.batching.max_batch_size, opt_batch=inputs.plan.opt_batch_size,
                                   max_input_len=inputs.plan.max_input_len, context_length=spec.context_length)
    for precision in inputs.plan.precisions:
        if precision == "fp16":
            source = f"../{core_model_name(model_name, 'onnx_fp32')}/{version}/{ONNX_FILE}"
            data = fp32_data
        elif inputs.qdq_onnx is not None:
            source = str(inputs.qdq_onnx.absolute())
            data = [path.name for path in onnx_files(inputs.qdq_onnx)[1:]]
        else:
            notes.append(f"{core_model_name(model_name, 'trt_int8')} left out: {inputs.qdq_missing}")
            continue
        model_dir = output / core_model_name(model_name, f"trt_{precision}")
        script = trt.build_script(model=model_name, precision=precision, default_onnx=source,
                                  plan=f"{version}/{PLAN_FILE}", timing_cache=trt.TIMING_CACHE,
                                  trtexec=inputs.plan.trtexec, profile=profile,
                                  workspace_mib=inputs.plan.workspace_mib, external_data=data)
        built = inputs.built.get(precision)
        if built is not None and (built / PLAN_FILE).is_file():
            with writer.version_dir(model_dir) as tmp:
                link_or_copy(built / PLAN_FILE, tmp / PLAN_FILE)
                shutil.copy2(built / PLAN_META, tmp / PLAN_META)
            artifacts[f"trt_{precision}"] = _ref(output, model_dir / str(version) / PLAN_FILE)
            precisions.append(f"trt_{precision}")
        else:
            notes.append(f"{model_dir.name}: no plan built here; run {model_dir / BUILD_SCRIPT} on a TensorRT host")
        scripts.append((model_dir / BUILD_SCRIPT, script))
        configs.append((model_dir, tensorrt_core_config(model_dir.name, lm, **batching)))
    return notes


def prune_versions(model_dirs: list[Path], keep: int) -> list[Path]:
    """Remove all but the newest `keep` numeric versions of each model; return what was removed."""
    removed: list[Path] = []
    for model_dir in model_dirs:
        for v in existing_versions(model_dir)[:-keep]:
            shutil.rmtree(model_dir / str(v))
            removed.append(model_dir / str(v))
    return removed
