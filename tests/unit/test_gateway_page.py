"""The chat page's files and ``GET /v1/models/{name}/versions``, over the fake Triton pool.

The page itself runs in a real browser in tests/integration/test_chat_page.py; here: what the
gateway serves, with which headers, and the build facts the models panel reads.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi.testclient import TestClient

from gateway.page import STATIC_DIR
from tests.unit.gateway_fakes import ADMIN, KEY, FakePool, make_client, write_repository
from toolkit.repository.manifest import BuildFacts, GateSummary, ModelManifest


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """Version 1 without build facts (an older build), version 2 with them."""
    root = write_repository(tmp_path / "repo")
    old = ModelManifest.load(root / "chat" / "1")
    shutil.copytree(root / "chat" / "1", root / "chat" / "2")
    facts = BuildFacts(metrics={"fact_accuracy_en_after": 0.8, "retention_after": 0.9167, "bleu4_after": 0.0762},
                       gates=[GateSummary(stage="evaluate", name="retention", passed=True, value=0.9167,
                                          threshold=0.75),
                              GateSummary(stage="quantize", name="int8_agreement", passed=False, blocking=False)])
    old.model_copy(update={"version": 2, "build": facts}).save(root / "chat" / "2")
    return root


def _raw_status(client: TestClient, path: str) -> int:
    """The status of ``GET path`` given to the app exactly as written, as a server passes a raw request line."""
    sent: list[dict[str, Any]] = []
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        while not sent or sent[-1].get("more_body", True):  # the client stays until the response is complete
            await anyio.sleep(0.01)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"localhost")], "client": ("127.0.0.1", 50000), "server": ("localhost", 80)}
    assert client.portal is not None, "only inside `with client`"
    client.portal.call(client.app, scope, receive, send)
    return int(next(m["status"] for m in sent if m["type"] == "http.response.start"))


def test_page_and_its_files_come_from_the_gateway_with_a_strict_policy(repository: Path) -> None:
    with make_client(repository, FakePool([5])) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert sources and all(s.startswith("/static/") or s.startswith("data:") for s in sources), sources
        for source in (s for s in sources if s.startswith("/static/")):
            response = client.get(source)
            assert response.status_code == 200, source
            assert "content-security-policy" in response.headers
        assert "marked v18.2.1" in client.get("/static/vendor/marked-18.2.1.umd.js").text
        # httpx removes a literal "/../" before sending; a raw client need not. Both spellings reach the app.
        assert _raw_status(client, "/static/../settings.py") == 404
        assert client.get("/static/%2e%2e/settings.py").status_code == 404  # httpx keeps this one as it is
        assert _raw_status(client, "/static/../static/chat.css") == 200  # the raw request itself works
    # Nothing in the page may reach another origin: no absolute URL in any of its own files.
    for path in (STATIC_DIR / "index.html", STATIC_DIR / "chat.js", STATIC_DIR / "chat.css"):
        assert not re.search(r"https?://", path.read_text()), path


def test_versions_list_every_version_with_its_build_facts(repository: Path) -> None:
    with make_client(repository, FakePool([5]), api_keys=[KEY], admin_api_keys=[ADMIN]) as client:
        assert client.get("/v1/models/chat/versions").status_code == 401
        response = client.get("/v1/models/chat/versions", headers={"Authorization": f"Bearer {KEY}"})
        assert response.status_code == 200, response.text
        one, two = response.json()["data"]
        assert (one["version"], one["build"]) == (1, None)
        assert two["build"]["metrics"]["retention_after"] == 0.9167
        assert [g["passed"] for g in two["build"]["gates"]] == [True, False]
        # The registry loaded the newest version at start-up: that is the one serving, and the default.
        assert (one["serving"], two["serving"], two["default"]) == (False, True, True)
        missing = client.get("/v1/models/nope/versions", headers={"Authorization": f"Bearer {KEY}"})
        assert missing.status_code == 404 and "not a chat model" in missing.json()["error"]["message"]


def test_old_manifest_loads_and_a_manifest_without_facts_keeps_its_old_form(repository: Path) -> None:
    manifest = ModelManifest.load(repository / "chat" / "1")
    assert manifest.build is None
    assert '"build"' not in (repository / "chat" / "1" / "manifest.json").read_text()
    assert ModelManifest.load(repository / "chat" / "2").build is not None
