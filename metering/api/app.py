"""The API's composition root."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from billing import endpoints as billing
from metering import __version__
from metering.api import admin, limits, stats
from metering.api.auth import KeyCache
from metering.api.envelope import install_error_handlers, ok
from metering.core.settings import Settings, get_settings
from metering.dashboard import endpoints as dashboard
from metering.gateway.server import build_admission, build_registry
from metering.live.service import LiveCounts
from metering.live.wiring import datacenter_readers


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.key_cache = KeyCache(settings.key_cache_ttl.total_seconds())
        readers = datacenter_readers(settings)
        app.state.live_counts = LiveCounts(
            readers,
            liveness_timeout=settings.liveness_timeout.total_seconds(),
            reuse=settings.count_cache_ttl.total_seconds(),
        )
        # GET /v1/admission answers from these copies, kept current by their own threads.
        registry = build_registry(settings)
        admission = build_admission(settings, registry)
        await asyncio.to_thread(registry.start)
        await asyncio.to_thread(admission.start)
        app.state.registry, app.state.admission = registry, admission
        # Everything made at startup lives as long as the process: move it out of the cyclic
        # GC's reach, so full collections under load do not walk it again and again.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await asyncio.to_thread(admission.close)
            await asyncio.to_thread(registry.close)
            for reader in readers.values():
                await reader.client.aclose()

    app = FastAPI(
        title="Metering engine",
        version=__version__,
        summary="Usage metering and billing-limit enforcement for a realtime platform",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    # The hot endpoints first: routes are matched in order.
    app.include_router(admin.router)
    app.include_router(limits.admission_router)
    app.include_router(stats.router)
    app.include_router(limits.router)
    app.include_router(billing.router)
    app.include_router(dashboard.router)

    @app.get("/healthz", tags=["ops"], summary="Liveness of the API process")
    async def healthz() -> dict[str, object]:
        return ok({"status": "ok"})

    return app
