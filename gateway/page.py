"""The chat page at ``/``: static files shipped in the package, no build step, nothing from a CDN.

``/`` is ``static/index.html``; ``/static/`` serves its script, style sheet and the vendored
Markdown renderer. The page calls the same API as any client (its keys are sent as Bearer
headers), so it needs no route of its own. A Content-Security-Policy limits it to the gateway's
own origin: even markup that got past the renderer's escaping could load nothing and run no
inline script.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

STATIC_DIR = Path(__file__).resolve().parent / "static"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    """The chat page."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=_HEADERS)


class _StaticFiles(StaticFiles):
    """Static files with the page's security headers."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(_HEADERS)
        return response


def install_page(app: FastAPI) -> None:
    """Serve the chat page at ``/`` and its files under ``/static/``."""
    app.include_router(router)
    app.mount("/static", _StaticFiles(directory=STATIC_DIR), name="static")
