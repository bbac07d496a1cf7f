"""Gateway settings: environment variables, key sources, and start-up validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.unit.gateway_fakes import write_repository


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "repo").mkdir()
    return tmp_path / "repo"


def test_env_prefix_lists_as_json_or_commas(monkeypatch: pytest.MonkeyPatch, repo: Path) -> None:
    monkeypatch.setenv("GATEWAY_REPOSITORY", str(repo))
    monkeypatch.setenv("GATEWAY_TRITON_URLS", '["a:8001", "b:8001"]')
    assert GatewaySettings().triton_urls == ["a:8001", "b:8001"]
    monkeypatch.setenv("GATEWAY_TRITON_URLS", "a:8001, grpc://c:9001")
    monkeypatch.setenv("GATEWAY_MAX_IN_FLIGHT", "3")
    settings = GatewaySettings()
    assert settings.triton_urls == ["a:8001", "c:9001"]
    assert settings.max_in_flight == 3
    assert not settings.auth_enabled


def test_keys_from_env_and_file(monkeypatch: pytest.MonkeyPatch, repo: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nfile-key-0123456789\n\n  file-key-9876543210  \n")
    monkeypatch.setenv("GATEWAY_API_KEYS", "env-key-0123456789")
    monkeypatch.setenv("GATEWAY_API_KEYS_FILE", str(key_file))
    settings = GatewaySettings(repository=repo)
    assert settings.accepted_keys() == {"env-key-0123456789", "file-key-0123456789", "file-key-9876543210"}
    assert settings.admin_keys() == frozenset()  # never a fallback to the API keys
    assert "file-key" not in repr(settings)  # secrets are not printed


def test_admin_keys_are_separate(repo: Path, tmp_path: Path) -> None:
    (tmp_path / "admin").write_text("admin-key-0123456789\n")
    settings = GatewaySettings(repository=repo, api_keys=["api-key-0123456789"], admin_api_keys_file=tmp_path / "admin")
    assert settings.admin_keys() == {"admin-key-0123456789"}
    with pytest.raises(ValidationError, match="both an API key and an admin key"):
        GatewaySettings(repository=repo, api_keys=["same-key-0123456789"], admin_api_keys=["same-key-0123456789"])


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("short-key-123", "at least 16 characters"),
        ("change-me-0123456789abcdef", "placeholder"),
        ("your-api-key-goes-here-0123", "placeholder"),
        ("aaaaaaaaaaaaaaaaaaaaaaaaaaaa", "distinct characters"),
    ],
)
def test_weak_keys_are_refused_without_echoing_them(repo: Path, key: str, message: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("GATEWAY_API_KEYS", "GATEWAY_ADMIN_API_KEYS", "GATEWAY_TRITON_ADMIN_KEY"):
        monkeypatch.setenv(variable, key)
        with pytest.raises(ValidationError, match=message) as raised:
            GatewaySettings(repository=repo)
        assert key not in str(raised.value) and variable in str(raised.value)
        monkeypatch.delenv(variable)


def test_python_m_gateway_reports_a_bad_setting_in_one_line(repo: Path) -> None:
    """The start-up command of `toolkit serve` and the image: one line, exit code 2, no key echoed."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "GATEWAY_REPOSITORY": str(repo), "GATEWAY_API_KEYS": "change-me-0123456789abcdef"}
    done = subprocess.run([sys.executable, "-m", "gateway"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: invalid gateway setting api_keys: ") and "placeholder" in done.stderr
    assert "change-me-0123456789abcdef" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"triton_urls": []}, "at least one Triton"),
        ({"triton_urls": ["localhost"]}, "host:port"),
        ({"triton_urls": ["a:1", "a:1"]}, "twice"),
        ({"repository": "/nonexistent/repo"}, "is not a directory"),
        ({"api_keys": ["short"]}, "at least 16 characters"),
        ({"api_keys_file": "/nonexistent/keys"}, "cannot read GATEWAY_API_KEYS_FILE"),
        ({"max_in_flight": 0}, "greater than 0"),
        ({"max_body_bytes": -1}, "greater than 0"),
        ({"port": 70000}, "less than or equal to 65535"),
        ({"max_in_fligth": 3}, "Extra inputs are not permitted"),
    ],
)
def test_bad_settings_fail_at_construction(repo: Path, overrides: dict, message: str) -> None:
    values = {"repository": repo, **overrides}
    with pytest.raises(ValidationError, match=message):
        GatewaySettings(**values)


def test_empty_key_file_is_an_error(repo: Path, tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("# nothing\n")
    with pytest.raises(ValidationError, match="holds no key"):
        GatewaySettings(repository=repo, api_keys_file=tmp_path / "keys")


def test_a_gateway_bound_above_what_triton_holds_is_named_at_start_up(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The fake repository's config.pbtxt sets no limits: one instance holds the defaults' 32 active + 256 queued."""
    repository = write_repository(tmp_path / "repo")
    for bound, warned in ((288, False), (289, True)):
        caplog.clear()
        create_app(GatewaySettings(repository=repository, triton_urls=["a:8001"], max_in_flight=bound))
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert bool(warnings) is warned, warnings
    assert "GATEWAY_MAX_IN_FLIGHT=289" in warnings[0]
    assert "(max_active_sequences 32 + max_queue 256) = 288" in warnings[0]
    caplog.clear()  # two Triton URLs hold twice as many
    create_app(GatewaySettings(repository=repository, triton_urls=["a:8001", "b:8001"], max_in_flight=576))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
