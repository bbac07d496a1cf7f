"""The toolkit's exceptions: one root, a few children.

The CLI catches :class:`ToolkitError`, prints its message (one line with what to do) and exits
non-zero; anything else is a bug and keeps its traceback.
"""


class ToolkitError(Exception):
    """Root of every error the toolkit raises on purpose."""

    exit_code = 1


class ConfigError(ToolkitError):
    """The build config (or a CLI option) is invalid."""

    exit_code = 2


class DataError(ToolkitError):
    """A dataset file is missing or malformed."""

    exit_code = 2


class StageError(ToolkitError):
    """A build stage could not produce its artifact."""

    exit_code = 3


class GateError(ToolkitError):
    """A fidelity gate failed: the artifact does not behave like its source."""

    exit_code = 4


class ServingError(ToolkitError):
    """Triton could not be started, or a model could not be loaded."""

    exit_code = 5
