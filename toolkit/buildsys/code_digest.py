"""The code a stage runs: its module's source plus the package modules it imports, for the cache key.

A stage's cache key must change when the code that makes its artifact changes, and only then: an
edit to ``toolkit/quality/fidelity.py`` reruns the stages that import it (directly or through another toolkit
module) and nothing else. Imports are read from the source with :mod:`ast`, without importing, so
imports inside functions and ``TYPE_CHECKING`` blocks count too. Package data a module reads at
run time (:data:`MODULE_FILES`) is hashed with that module.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from pathlib import Path

# Modules whose edits never change an artifact, left out so that editing them reruns nothing:
# the pipeline, stage and report machinery, the CLI, and the config models (a stage is keyed on its
# config sections' resolved values, so a changed default that matters changes the key anyway).
EXCLUDED = frozenset({"", "stages.pipeline", "buildsys.stage_api", "buildsys.report", "cli", "buildsys.config"})

# Files a module reads or copies at run time, as globs relative to the package root. Python files
# among them are followed like modules: the Triton model.py imports the serving code it runs.
MODULE_FILES: dict[str, tuple[str, ...]] = {
    "datasets.records": ("datasets/*.json", "datasets/*.jsonl"),  # the demo dataset, the control prompts
    "repository.writer": ("runtime/triton_model/*.py",),  # copied into the repository
}


class SourceHasher:
    """Digests of module closures in one package; memoises per file, so make one per build."""

    def __init__(self, package: str, root: Path) -> None:
        self.package = package
        self.root = root
        self._files: dict[Path, tuple[str, tuple[str, ...]]] = {}

    def digest(self, module: str) -> str:
        """sha256 over the relative paths and contents of `module`'s source closure."""
        digest = hashlib.sha256()
        for path in self.closure(module):
            digest.update(f"{path.relative_to(self.root).as_posix()}\0{self._file(path)[0]}\n".encode())
        return digest.hexdigest()

    def closure(self, module: str) -> list[Path]:
        """The files of `module` and every non-excluded package module it imports, transitively; sorted."""
        seen: set[Path] = set()
        todo = list(self._files_of(module))
        while todo:
            path = todo.pop()
            if path in seen:
                continue
            seen.add(path)
            for name in self._file(path)[1]:
                todo.extend(self._files_of(name))
        return sorted(seen)

    def _relative(self, module: str) -> str | None:
        """`module` relative to the package ("" for the package itself), or None outside it."""
        if module == self.package:
            return ""
        if module.startswith(self.package + "."):
            return module[len(self.package) + 1:]
        return None

    def _files_of(self, module: str) -> Iterable[Path]:
        """The source file of `module` (with its parent packages' __init__), plus its MODULE_FILES."""
        rel = self._relative(module)
        if rel is None or rel in EXCLUDED:
            return []
        parts = rel.split(".")
        out = [self.root.joinpath(*parts[:i], "__init__.py") for i in range(1, len(parts))]
        out += [self.root.joinpath(*parts).with_suffix(".py"), self.root.joinpath(*parts, "__init__.py")]
        out += [p for pattern in MODULE_FILES.get(rel, ()) for p in self.root.glob(pattern)]
        return [p for p in out if p.is_file()]

    def _file(self, path: Path) -> tuple[str, tuple[str, ...]]:
        """(sha256 of the content, package modules a Python file imports) for one file, memoised."""
        if path not in self._files:
            data = path.read_bytes()
            imports = _imports(data, *self._module_name(path)) if path.suffix == ".py" else []
            self._files[path] = (hashlib.sha256(data).hexdigest(), tuple(
                name for name in imports if self._relative(name) is not None))
        return self._files[path]

    def _module_name(self, path: Path) -> tuple[str, bool]:
        """(dotted name, whether it is a package's __init__) of a file under the root."""
        parts = path.relative_to(self.root).with_suffix("").parts
        is_package = bool(parts) and parts[-1] == "__init__"
        return ".".join((self.package, *parts[: -1 if is_package else None])), is_package


def _imports(source: bytes, module: str, is_package: bool) -> list[str]:
    """Every module name `source` may import: ``import a.b``, ``from a import b`` (a, and a.b in case b
    is a submodule), relative imports resolved against `module`."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []  # the content hash still covers it; the import itself will fail loudly
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x: relative to the module's package (itself, for an __init__)
                parts = module.split(".")
                anchor = parts[: len(parts) - node.level + is_package]
                base = ".".join([*anchor, *([base] if base else [])])
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
    return names

