"""The web console: ``GET /`` sends a browser to ``console/``, whose static files (``server/console/``:
HTML, JavaScript and CSS, no framework, no build step, shipped in the package) call the same HTTP API
as any other client (``/tasks``, ``/classify``, ``/metrics``) with the user's token, if any.

The files hold no task data and are served without a token, with a strict Content-Security-Policy:
scripts, styles and requests from this origin only, images also from ``blob:`` (the preview of a
dropped image); nothing from a CDN, so the console works air-gapped."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import RedirectResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

__all__ = ["CONSOLE_DIR", "ConsoleFiles", "router"]

CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"

HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated (ETag): a new release's page is never mixed with an old script
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> RedirectResponse:
    # relative: behind a proxy that serves the API under a path prefix, the console is under it too
    return RedirectResponse("console/", status_code=307)


class ConsoleFiles(StaticFiles):
    """``server/console/`` with the console's security headers on every answer."""

    def __init__(self) -> None:
        super().__init__(directory=CONSOLE_DIR, html=True)

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response
