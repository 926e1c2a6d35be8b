"""The app factory. The composition root builds the ledger, queue and inference backend and hands
them in; nothing here is global, so tests and the embedded deployment can build as many apps as
they like."""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from sqlalchemy.orm import Session, sessionmaker

from api.auth import load_api_keys
from api.errors import install_error_handler
from api.metrics import ApiMetrics
from api.routes import admin, docs, edits, generate, health, openai, ui
from service.config import Settings
from service.inference import InferenceBackend
from service.queue import OperationQueue

# Entered in order at start-up and left in reverse order at shutdown, e.g. starting the embedded
# worker or closing an HttpBackend's connections.
LifespanHook = Callable[[FastAPI], AbstractAsyncContextManager[object]]
VERSION = "0.1.0"
DESCRIPTION = """Live knowledge patching: POST fact edits, which are recorded in the edit ledger and
applied in order by the worker (AlphaEdit); generate from the patched model, each answer stating the
model version (ledger seq) that served it. Authenticate with `Authorization: Bearer <key>`."""


def _lifespan(hooks: Sequence[LifespanHook]) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            for hook in hooks:
                await stack.enter_async_context(hook(app))
            yield

    return lifespan


def create_app(settings: Settings, *, session_factory: sessionmaker[Session], queue: OperationQueue,
               backend: InferenceBackend | None, lifespan_hooks: Sequence[LifespanHook] | None = None) -> FastAPI:
    """The API over a migrated ledger, a queue and (optionally) an inference backend.

    Raises InvalidRequest when settings.api_keys is malformed, so a bad key file stops start-up.
    """
    app = FastAPI(title="knowpatch", version=VERSION, description=DESCRIPTION,
                  lifespan=_lifespan(list(lifespan_hooks or ())), docs_url=None, redoc_url=None)  # served offline: api.routes.docs
    app.state.settings = settings
    app.state.ledger = session_factory
    app.state.queue = queue
    app.state.backend = backend
    app.state.api_keys = load_api_keys(settings.api_keys)
    app.state.metrics = ApiMetrics(session_factory, queue)
    install_error_handler(app)
    for router in (health.router, edits.router, generate.router, openai.router, admin.router, ui.router,
                   docs.router):
        app.include_router(router)
    app.mount(ui.ASSETS_URL, StaticFiles(directory=ui.STATIC_DIR), name="ui-assets")
    app.mount(docs.ASSETS_URL, StaticFiles(directory=docs.ASSETS_DIR), name="docs-assets")
    return app
