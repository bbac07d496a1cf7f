"""What a build stage is: the context it runs in, the result it returns, the record it leaves behind.

A stage is a module of :mod:`toolkit.stages` with one function ``run(ctx: StageContext) ->
StageResult`` and, optionally, ``cache_inputs(config) -> dict`` (inputs of its cache key beyond its
config sections, see :mod:`toolkit.stages.pipeline`). Stages import this module; the pipeline imports the
stages. So the dependency runs one way, and no stage imports another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from toolkit.buildsys.config import BuildConfig
from toolkit.buildsys.report import GateResult, StageStatus
from toolkit.errors import StageError

RECORD = ".stage.json"  # beside a stage's artifacts: key, digest, metrics, gates, files


class Stage(Protocol):
    """A stage module: ``run`` makes the stage's artifact in ``ctx.out_dir``."""

    __name__: str

    def run(self, ctx: StageContext) -> StageResult: ...


@dataclass
class StageRecord:
    """What a finished stage left: its directory, metrics and artifact digest."""

    name: str
    dir: Path
    key: str
    digest: str
    metrics: dict[str, Any]
    artifacts: dict[str, str]
    data: dict[str, Any]

    def path(self, artifact: str) -> Path:
        """The recorded artifact; a stage that recorded none is named, with the command that remakes it."""
        if artifact not in self.artifacts:
            raise StageError(f"stage {self.name} recorded no {artifact!r} artifact in {self.dir}; "
                             f"rerun it with --force --stages {self.name}")
        return self.dir / self.artifacts[artifact]


@dataclass
class StageResult:
    """What a stage's ``run`` returns."""

    metrics: dict[str, Any] = field(default_factory=dict)
    gates: list[GateResult] = field(default_factory=list)
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> path relative to out_dir
    status: StageStatus = StageStatus.RAN  # or UNAVAILABLE: nothing could be made here, and that is no error
    note: str = ""
    external: list[str] = field(default_factory=list)  # paths outside out_dir that must exist for a skip


@dataclass
class StageContext:
    """A stage's inputs: the config, a fresh output directory and the records of the stages it depends on."""

    config: BuildConfig
    out_dir: Path
    inputs: dict[str, StageRecord]
    workspace: Path
