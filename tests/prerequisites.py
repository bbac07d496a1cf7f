"""Prerequisites that a whole test area needs: missing, they skip a developer's run and fail CI's.

`make test` installs every one of them (Chromium, Prometheus, the embedded SmolLM2), so under
``CI=true`` a missing one is a broken CI machine, and a skip there would hide the whole area behind
a green run. Elsewhere (a laptop without root for `apt-get install chromium`) they skip, saying why.
(A module of its own rather than tests/conftest.py: test modules import tests/integration/conftest.py
as ``conftest``, so a name in the top-level one could not be imported.)
"""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    """``CI`` set to true, as .ci/run, GitHub Actions and GitLab CI set it."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def require(condition: bool, reason: str) -> None:
    """Skip the calling test, fixture or module (at import) unless `condition`; under ``CI=true``, fail instead."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing prerequisite fails instead of skipping)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)
