"""The FastAPI application: REST API under /v1, health checks, problem+json errors."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from service.api import docs as api_docs
from service.api import jobs as api_jobs
from service.api import plans as api_plans
from service.api import schemas
from service.api.errors import install_error_handlers, problem_response
from service.api.guard import Guard, HeaderTimeoutProtocol
from service.api.openapi import DocumentedApp, operation_id
from service.api.registry import RegistryKind, registry_router
from service.api.transfer import UploadSlots
from service.dashboard import pages as dashboard
from service.inspection.checks import Limits
from service.inspection.inspector import Inspector, InspectorBusy
from service.jobs.executor import ExecutorLock, make_executor
from service.jobs.supervisor import hidden_paths
from service.sandbox.child import SandboxLimits, check_sandbox_user, remove_stale_workdirs
from service.settings import Settings
from service.store.blobs import BlobStore, LocalBlobStore
from service.store.db import make_engine, session_factory
from service.store.sql_store import SqlStore
from service.store.storage import collect_garbage
from service.store.tables import Dataset, Model
from service.versions import mpq_version

MODELS = RegistryKind(
    "model", "/models", Model, schemas.ModelOut, schemas.ModelPage, Inspector.model, ".onnx", unlisted=("layers",)
)
# uvicorn's default event loop is uvloop, which starves some keep-alive connections once the process is
# saturated: at 200 connections a trivial FastAPI endpoint had p99 797 ms (and wrk timeouts) under
# uvloop and 53 ms under the standard loop at the same throughput. See docs/benchmarks.md, "Service".
# HeaderTimeoutProtocol is uvicorn's httptools protocol with a header-read timeout (service/api/guard.py).
SERVER_OPTIONS: dict[str, Any] = {"loop": "asyncio", "http": HeaderTimeoutProtocol}

DATASETS = RegistryKind(
    "dataset", "/datasets", Dataset, schemas.DatasetOut, schemas.DatasetPage, Inspector.dataset, ".npz"
)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    check_sandbox_user(settings.sandbox_user)
    engine = make_engine(settings.resolved_database_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        lock = ExecutorLock(settings.resolved_artifact_dir / ".executor.lock")
        app.state.inspector.start()
        runs_executor = lock.acquire()
        if runs_executor:  # one process per deployment cleans what a killed one left, then runs the jobs
            await run_in_threadpool(_clean_up, app.state.db, app.state.store)
            app.state.executor.start()
        yield
        if runs_executor:
            app.state.executor.stop()
            lock.release()
        app.state.inspector.close()
        engine.dispose()

    app = DocumentedApp(  # its OpenAPI document: service/api/openapi.py
        title="mpq",
        version=mpq_version(),
        lifespan=lifespan,
        description="Mixed-precision quantization planner: upload models and calibration data, "
        "get Hessian-based sensitivities, Pareto-optimal bit allocations and quantized ONNX. "
        "Errors are application/problem+json (RFC 9457).",
        generate_unique_id_function=operation_id,
        docs_url=None,  # FastAPI's pages load their scripts from a CDN; service/api/docs.py serves them
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = session_factory(engine)
    app.state.db = SqlStore(app.state.sessions)  # every query of the routes and the executor
    app.state.store = LocalBlobStore(settings.resolved_artifact_dir)
    app.state.inspector = make_inspector(settings)
    app.state.uploads = UploadSlots(settings.max_uploads_per_client, settings.max_concurrent_uploads)
    app.state.executor = make_executor(settings, app.state.db)
    app.state.plan_cache = api_plans.ResponseCache()
    app.state.token_cache = {}  # service.api.auth.token_is_valid
    app.state.registry_kinds = {kind.path.strip("/"): kind for kind in (MODELS, DATASETS)}  # the dashboard's uploads
    install_error_handlers(app)
    app.add_exception_handler(InspectorBusy, _inspector_busy)
    # Outermost but for Starlette's own error middleware: Host, Origin and the /v1 token are checked, and
    # request bodies bounded, before any route runs (service/api/guard.py).
    app.add_middleware(Guard, state=app.state)

    v1 = APIRouter(prefix="/v1")  # Guard requires the bearer token on every /v1 path when auth is on
    v1.include_router(registry_router(MODELS))
    v1.include_router(registry_router(DATASETS))
    v1.include_router(api_jobs.router)
    v1.include_router(api_plans.router)
    app.include_router(v1)
    app.include_router(dashboard.router)
    app.include_router(api_docs.router)
    _add_health_routes(app)
    return app


async def _inspector_busy(request: Request, error: Exception) -> Response:
    return problem_response(503, str(error), headers={"Retry-After": "10"})


def _clean_up(db: SqlStore, store: LocalBlobStore) -> None:
    collect_garbage(db, store)
    remove_stale_workdirs()


def make_inspector(settings: Settings) -> Inspector:
    limits = Limits(
        max_bytes=settings.max_upload_bytes,
        max_decompressed_bytes=settings.max_decompressed_bytes,
        max_archive_members=settings.max_archive_members,
        max_dataset_arrays=settings.max_dataset_arrays,
        allow_torch=settings.allow_torch_uploads,
    )
    # CPU time: the inspection's own limit plus the interpreter's start and imports (~2 s with torch)
    sandbox = SandboxLimits(
        memory_bytes=settings.inspect_memory_bytes,
        cpu_time_s=int(settings.inspect_time_limit_s) + 30,
        file_size_bytes=settings.max_decompressed_bytes + (64 << 20),
        user=settings.sandbox_user,
    )
    return Inspector(
        limits,
        sandbox,
        processes=settings.inspector_processes,
        timeout_s=settings.inspect_time_limit_s,
        hide=hidden_paths(settings),
    )


def _add_health_routes(app: FastAPI) -> None:
    @app.get("/healthz", response_model=schemas.Health, tags=["health"], summary="The process is up")
    async def healthz() -> schemas.Health:
        return schemas.Health(status="ok")

    @app.get(
        "/readyz",
        response_model=schemas.Health,
        tags=["health"],
        responses={503: {"description": "The database does not take writes, or the store is unusable or full"}},
        summary="The database takes writes and the artifact store has room",
    )
    def readyz(request: Request) -> schemas.Health | Response:
        state = request.app.state
        checks = {
            "database": state.db.readiness(),
            "store": store_check(state.store, state.settings.resolved_artifact_dir, state.settings.min_free_bytes),
        }
        if any(value != "ok" for value in checks.values()):
            return problem_response(
                503, "not ready: " + ", ".join(f"{k} {v}" for k, v in checks.items() if v != "ok"), checks=checks
            )
        return schemas.Health(status="ok", checks=checks)


def store_check(store: BlobStore, root: os.PathLike[str], min_free_bytes: int) -> str:
    """The store takes a file, and its file system has MPQ_MIN_FREE_BYTES free (uploads and artifacts
    would fail part-way otherwise)."""
    try:
        store.check()
        stats = os.statvfs(root)
    except OSError as error:
        return f"unusable: {error.strerror or type(error).__name__}"
    free = stats.f_bavail * stats.f_frsize
    if free < min_free_bytes:
        return f"full: {free} bytes free, below MPQ_MIN_FREE_BYTES ({min_free_bytes})"
    return "ok"
