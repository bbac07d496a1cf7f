"""The repository layout: model directories, their versions, and which models a server must load.

A repository holds, per build, a generation model ``NAME`` (python backend; its version directory
holds ``manifest.json``, ``model.py`` and ``tokenizer/``) and its core models ``NAME_<precision>``
(``onnx_fp32``, ``onnx_int8``, ``trt_fp16``, ``trt_int8``), all with numeric version directories.
A generation model on the ``bls`` runner calls its core model through Triton, so both must be
loaded; on the ``onnxruntime`` runner it reads the core model's ``model.onnx`` itself.
"""

from __future__ import annotations

from pathlib import Path

from toolkit.errors import ServingError
from toolkit.repository import contract
from toolkit.repository.manifest import MANIFEST_FILE


def core_model_name(model_name: str, precision: str) -> str:
    """Repository name of a core model, e.g. ``smollm2-chat_onnx_fp32``."""
    return f"{model_name}_{precision}"


def existing_versions(model_dir: Path) -> list[int]:
    """The numeric version directories of a repository model, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def latest_version_dir(model_dir: Path) -> Path:
    """The highest numeric version directory of a repository model."""
    versions = existing_versions(model_dir)
    if not versions:
        raise ServingError(f"{model_dir} has no numeric version directory")
    return model_dir / str(versions[-1])


def next_version(output: Path, model_name: str) -> int:
    """One above the highest version of any model of this name: all models of a build share it."""
    dirs = [p for p in output.iterdir() if p.is_dir() and (p.name == model_name or p.name.startswith(f"{model_name}_"))]
    return max((v for d in dirs for v in existing_versions(d)), default=0) + 1


def generation_models(repository: Path) -> list[str]:
    """The toolkit's generation models of `repository` (the newest version holds a manifest), sorted.

    Their core models have no manifest and are not listed. None at all is a ServingError.
    """
    if not repository.is_dir():
        raise ServingError(f"model repository {repository} does not exist; run `toolkit build` first")
    found = []
    for model_dir in sorted(p for p in repository.iterdir() if p.is_dir()):
        versions = existing_versions(model_dir)
        if versions and (model_dir / str(versions[-1]) / MANIFEST_FILE).is_file():
            found.append(model_dir.name)
    if not found:
        raise ServingError(f"{repository} has no generation model (a <name>/<N>/ with {MANIFEST_FILE}); "
                           "run `toolkit build`")
    return found


def model_parameters(repository: Path, name: str) -> dict[str, str]:
    """The ``parameters`` of a model's ``config.pbtxt`` ({} when it has none); a bad config is a ConfigError."""
    # protobuf is imported here, not at the top: the generation model imports this module inside
    # Triton's python backend for the versions above, and protobuf is not installed there.
    from toolkit.repository.pbtxt import model_parameters as parameters_of
    from toolkit.repository.pbtxt import read_config

    path = repository / name / contract.CONFIG_FILE
    return parameters_of(read_config(path)) if path.is_file() else {}


def generation_instances(repository: Path, name: str) -> int:
    """How many Triton instances of model `name` its ``config.pbtxt`` asks for (1 when it names none)."""
    from toolkit.repository.pbtxt import read_config

    path = repository / name / contract.CONFIG_FILE
    if not path.is_file():
        return 1
    return sum(group.count or 1 for group in read_config(path).instance_group) or 1


def bls_core_model(repository: Path, name: str) -> str | None:
    """The core model generation model `name` calls through Triton, or None when it runs onnxruntime itself."""
    params = model_parameters(repository, name)
    if params.get(contract.PARAM_RUNNER) != contract.RUNNER_BLS:
        return None
    return params.get(contract.PARAM_CORE_MODEL, "")


def models_to_load(repository: Path) -> list[str]:
    """The generation models, each followed by its core model when it runs the BLS runner.

    Under explicit model control a BLS generation model's core model must be loaded too.
    """
    out: list[str] = []
    for name in generation_models(repository):
        out.append(name)
        core = bls_core_model(repository, name)
        if core is not None:
            if not (repository / core / contract.CONFIG_FILE).is_file():
                raise ServingError(f"{name} runs the BLS runner over core model {core!r}, which is not in {repository}")
            out.append(core)
    return list(dict.fromkeys(out))
