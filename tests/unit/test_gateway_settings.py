"""Gateway settings: environment variables, key sources, and start-up validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.settings import GatewaySettings


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
    key_file.write_text("# team keys\nfile-key-000001\n\n  file-key-000002  \n")
    monkeypatch.setenv("GATEWAY_API_KEYS", "env-key-0000001")
    monkeypatch.setenv("GATEWAY_API_KEYS_FILE", str(key_file))
    settings = GatewaySettings(repository=repo)
    assert settings.accepted_keys() == {"env-key-0000001", "file-key-000001", "file-key-000002"}
    assert settings.admin_keys() == settings.accepted_keys()
    assert "file-key" not in repr(settings)  # secrets are not printed


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"triton_urls": []}, "at least one Triton"),
        ({"triton_urls": ["localhost"]}, "host:port"),
        ({"triton_urls": ["a:1", "a:1"]}, "twice"),
        ({"repository": "/nonexistent/repo"}, "is not a directory"),
        ({"api_keys": ["short"]}, "at least 8 characters"),
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
