"""/ui: the operators' ledger page. A static page (api/static: HTML, one script, one style sheet)
whose script calls the JSON API with the key the operator types in; the server adds nothing to it.

The page builds every element from text (no HTML from data), and its Content-Security-Policy allows
only this origin's scripts and styles, so text from API users (subjects, prompts, metadata) can
never run as code even if a later change forgot that."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
ASSETS_URL = "/ui/assets"
PAGE_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/ui")
def ledger_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "ledger.html", media_type="text/html", headers=PAGE_HEADERS)
