"""The FastAPI application: REST API under /v1, health checks, problem+json errors."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from service import api_jobs, api_plans, dashboard, schemas
from service.auth import require_token
from service.db import make_engine, session_factory
from service.errors import install_error_handlers, problem_response
from service.executor import ExecutorLock, make_executor
from service.inspection import Limits
from service.inspector import Inspector, InspectorBusy
from service.registry import RegistryKind, registry_router
from service.storage import collect_garbage
from service.sandbox import SandboxLimits, check_sandbox_user, remove_stale_workdirs
from service.settings import Settings
from service.store import LocalBlobStore
from service.supervisor import hidden_paths
from service.transfer import UploadSlots
from service.tables import Dataset, Model

MODELS = RegistryKind("model", "/models", Model, schemas.ModelOut, schemas.ModelPage, Inspector.model, ".onnx")
# uvicorn's default event loop is uvloop, which starves some keep-alive connections once the process is
# saturated: at 200 connections a trivial FastAPI endpoint had p99 797 ms (and wrk timeouts) under
# uvloop and 53 ms under the standard loop at the same throughput. See docs/benchmarks.md, "Service".
SERVER_OPTIONS: dict[str, str] = {"loop": "asyncio", "http": "httptools"}

DATASETS = RegistryKind("dataset", "/datasets", Dataset, schemas.DatasetOut, schemas.DatasetPage,
                        Inspector.dataset, ".npz")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    check_sandbox_user(settings.sandbox_user)
    engine = make_engine(settings.resolved_database_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        lock = ExecutorLock(settings.resolved_artifact_dir / ".executor.lock")
        runs_executor = lock.acquire()
        if runs_executor:  # one process per deployment cleans what a killed one left, then runs the jobs
            await run_in_threadpool(_clean_up, app.state.sessions, app.state.store)
            app.state.executor.start()
        yield
        if runs_executor:
            app.state.executor.stop()
            lock.release()
        app.state.inspector.close()
        engine.dispose()

    app = FastAPI(title="mpq", version=_version(), lifespan=lifespan,
                  description="Mixed-precision quantization planner: upload models and calibration data, "
                              "get Hessian-based sensitivities, Pareto-optimal bit allocations and quantized ONNX.")
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = session_factory(engine)
    app.state.store = LocalBlobStore(settings.resolved_artifact_dir)
    app.state.inspector = make_inspector(settings)
    app.state.uploads = UploadSlots(settings.max_uploads_per_client, settings.max_concurrent_uploads)
    app.state.executor = make_executor(settings, app.state.sessions)
    app.state.plan_cache = api_plans.ResponseCache()
    install_error_handlers(app)
    app.add_exception_handler(InspectorBusy, _inspector_busy)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_token)])
    v1.include_router(registry_router(MODELS))
    v1.include_router(registry_router(DATASETS))
    v1.include_router(api_jobs.router)
    v1.include_router(api_plans.router)
    app.include_router(v1)
    app.include_router(dashboard.router)
    _add_health_routes(app)
    return app


async def _inspector_busy(request: Request, error: Exception) -> Response:
    return problem_response(503, str(error), headers={"Retry-After": "10"})


def _clean_up(sessions, store: LocalBlobStore) -> None:
    collect_garbage(sessions, store)
    remove_stale_workdirs()


def make_inspector(settings: Settings) -> Inspector:
    limits = Limits(max_bytes=settings.max_upload_bytes, max_decompressed_bytes=settings.max_decompressed_bytes,
                    max_archive_members=settings.max_archive_members, max_dataset_arrays=settings.max_dataset_arrays,
                    allow_torch=settings.allow_torch_uploads)
    # CPU time: the inspection's own limit plus the interpreter's start and imports (~2 s with torch)
    sandbox = SandboxLimits(memory_bytes=settings.inspect_memory_bytes, cpu_time_s=int(settings.inspect_time_limit_s) + 30,
                            file_size_bytes=settings.max_decompressed_bytes + (64 << 20), user=settings.sandbox_user)
    return Inspector(limits, sandbox, processes=settings.inspector_processes, timeout_s=settings.inspect_time_limit_s,
                     hide=hidden_paths(settings))


def _add_health_routes(app: FastAPI) -> None:
    @app.get("/healthz", response_model=schemas.Health, tags=["health"], summary="The process is up")
    async def healthz():
        return schemas.Health(status="ok")

    @app.get("/readyz", response_model=schemas.Health, tags=["health"],
             responses={503: {"description": "database or store unreachable"}},
             summary="The database and the artifact store are reachable")
    def readyz(request: Request):
        checks: dict[str, str] = {}
        try:
            with request.app.state.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as error:  # any driver error means "not ready"
            checks["database"] = f"unreachable: {type(error).__name__}"
        try:
            request.app.state.store.check()
            checks["store"] = "ok"
        except OSError as error:
            checks["store"] = f"unusable: {error.strerror or type(error).__name__}"
        if any(value != "ok" for value in checks.values()):
            return problem_response(503, "not ready: " + ", ".join(f"{k} {v}" for k, v in checks.items()),
                                    checks=checks)
        return schemas.Health(status="ok", checks=checks)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mpq")
    except PackageNotFoundError:
        return "0+unknown"
