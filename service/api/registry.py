"""Models and datasets: upload, list, get, download, delete.

Both kinds are the same mechanism (an uploaded blob, inspected, plus a row), so one
router factory serves both, parametrised by a ``RegistryKind``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import State

from service.api.auth import request_owner
from service.api.errors import Problem
from service.api.transfer import DOWNLOAD_RESPONSES, UploadPace, blob_response, receive_upload
from service.inspection.checks import InvalidUpload
from service.store.blobs import BlobWriter
from service.store.sql_store import InUse, SqlStore
from service.store.storage import delete_if_unused
from service.store.tables import Dataset, Model

BINARY_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}

# Their content, application/problem+json, is added with the guard's errors (service/api/openapi.py).
UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "The upload was interrupted before it finished"},
    408: {"description": "The upload stalled or was too slow (MPQ_UPLOAD_IDLE_TIMEOUT_S, MPQ_UPLOAD_MIN_BYTES_PER_S)"},
    413: {"description": "The file passes MPQ_MAX_UPLOAD_BYTES, or the token's quota (MPQ_QUOTA_BYTES_PER_OWNER)"},
    422: {"description": "The file is not an acceptable model or dataset (the detail says why), or a parameter is not"},
    429: {"description": "This client already has MPQ_MAX_UPLOADS_PER_CLIENT uploads in progress"},
    503: {"description": "Every upload slot or inspector is busy; retry after Retry-After"},
    507: {"description": "The server's total quota is used up (MPQ_QUOTA_BYTES_TOTAL)"},
}


@dataclass(frozen=True)
class RegistryKind:
    noun: str  # "model" / "dataset"
    path: str  # "/models"
    table: type[Model] | type[Dataset]
    out: type[BaseModel]
    page: type[BaseModel]
    inspect: Callable[[Any, Path], dict[str, Any]]  # (inspector, temp path) -> row fields
    download_suffix: str
    unlisted: tuple[str, ...] = ()  # columns a list page leaves out (not even loaded): see ModelSummary


def registry_router(kind: RegistryKind) -> APIRouter:
    router = APIRouter(prefix=kind.path, tags=[kind.path.strip("/")])

    @router.post(
        "",
        status_code=201,
        response_model=kind.out,
        openapi_extra=BINARY_BODY,
        name=f"upload_{kind.noun}",
        summary=f"Upload a {kind.noun} as the raw request body",
        responses=UPLOAD_ERRORS,
    )
    async def upload(request: Request, name: Annotated[str | None, Query(max_length=200)] = None) -> BaseModel:
        row = await store_upload(request, kind, name)
        return await run_in_threadpool(kind.out.model_validate, row)  # up to 16,384 layers: off the event loop

    @router.get("", response_model=kind.page, name=f"list_{kind.noun}s", summary=f"List {kind.noun}s, newest first")
    def list_items(
        request: Request,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
        sha256: Annotated[str | None, Query(pattern="^[0-9a-f]{64}$")] = None,
    ) -> BaseModel:
        rows, total = request.app.state.db.list_uploads(
            kind.table, sha256=sha256, limit=limit, offset=offset, unlisted=kind.unlisted
        )
        return kind.page.model_validate({"items": rows, "total": total}, from_attributes=True)

    @router.get(
        "/{item_id}",
        response_model=kind.out,
        name=f"get_{kind.noun}",
        summary=f"One {kind.noun}",
        responses={404: {"description": f"No {kind.noun} with this id"}},
    )
    def get_item(request: Request, item_id: str) -> BaseModel:
        return kind.out.model_validate(_get_or_404(request.app.state.db, kind, item_id))

    @router.head("/{item_id}/file", include_in_schema=False)  # headers only: service/api/transfer.blob_response
    @router.get(
        "/{item_id}/file",
        name=f"download_{kind.noun}",
        summary=f"Download the {kind.noun}'s file",
        responses=DOWNLOAD_RESPONSES,
    )
    def download(request: Request, item_id: str) -> Response:
        row = _get_or_404(request.app.state.db, kind, item_id)
        filename = f"{row.name}{'' if row.name.endswith(kind.download_suffix) else kind.download_suffix}"
        return blob_response(request, request.app.state.store, row.sha256, filename, "application/octet-stream")

    @router.delete(
        "/{item_id}",
        status_code=204,
        name=f"delete_{kind.noun}",
        summary=f"Delete a {kind.noun}, the plans made from it and their artifacts",
        responses={
            404: {"description": f"No {kind.noun} with this id"},
            409: {"description": "Queued or running jobs use it"},
        },
    )
    def delete(request: Request, item_id: str) -> Response:
        state = request.app.state
        try:
            hashes = state.db.delete_upload(kind.table, item_id)
        except InUse as error:
            busy = error.job_ids
            raise Problem(
                409,
                f"{len(busy)} queued or running jobs use this {kind.noun} (e.g. {busy[0]}): cancel "
                "them (POST /v1/jobs/{id}/cancel) or wait for them to finish",
                jobs=busy,
            ) from None
        if hashes is None:
            raise Problem(404, f"no {kind.noun} with id {item_id!r}")
        delete_if_unused(state.db, state.store, *hashes)
        state.plan_cache.clear()  # the delete cascaded to the plans made from it
        return Response(status_code=204)

    return router


async def store_upload(request: Request, kind: RegistryKind, name: str | None) -> Model | Dataset:
    """Stream the request body into the store, inspect it and insert its row (the API's upload route and
    the dashboard's share this): within the client's upload slots and the owner's quota."""
    state = request.app.state
    if name is not None and any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise Problem(422, "the name must not contain control characters (NUL, newlines, ...)")
    owner = await run_in_threadpool(request_owner, request)
    async with state.uploads.slot(owner or _client_address(request)) as slot:
        declared = request.headers.get("content-length", "")
        await run_in_threadpool(check_quota, state, owner, int(declared) if declared.isdigit() else 0)
        writer = await receive_upload(
            request,
            state.store,
            state.settings.max_upload_bytes,
            UploadPace(state.settings.upload_idle_timeout_s, state.settings.upload_min_bytes_per_s),
            slot,
        )
        try:
            await run_in_threadpool(check_quota, state, owner, writer.size)
            fields = await run_in_threadpool(kind.inspect, state.inspector, writer.path)
        except InvalidUpload as error:
            writer.abort()
            raise Problem(422, str(error), title=f"Invalid {kind.noun}") from None
        except BaseException:
            writer.abort()
            raise
        return await run_in_threadpool(_store_row, state, kind, writer, name, owner, fields)


def _get_or_404(db: SqlStore, kind: RegistryKind, item_id: str) -> Model | Dataset:
    row = db.get(kind.table, item_id)
    if row is None:
        raise Problem(404, f"no {kind.noun} with id {item_id!r}")
    return row


def _store_row(
    state: State, kind: RegistryKind, writer: BlobWriter, name: str | None, owner: str | None, fields: dict[str, Any]
) -> Model | Dataset:
    """Publish the blob and insert the row; if the insert fails the blob goes too (unless shared)."""
    try:
        with state.store.reference_lock():  # a concurrent delete of the same bytes waits for our row
            sha256 = writer.commit()
            row = kind.table(
                name=(name or f"{kind.noun}-{sha256[:12]}"),
                sha256=sha256,
                size_bytes=writer.size,
                owner=owner,
                **fields,
            )
            state.db.insert(row)
            return row
    except BaseException:
        writer.abort()  # a write not yet renamed into the store
        delete_if_unused(state.db, state.store, writer.finish())
        raise


def check_quota(state: State, owner: str | None, incoming: int) -> None:
    """Refuse an upload that would take its owner past their quota (413) or the server past its
    total (507)."""
    settings, db = state.settings, state.db
    if owner is not None and settings.quota_bytes_per_owner is not None:
        used = db.stored_bytes(owner)
        if used + incoming > settings.quota_bytes_per_owner:
            raise Problem(
                413,
                f"this token stores {used} bytes; {incoming} more would pass its quota of "
                f"{settings.quota_bytes_per_owner} (MPQ_QUOTA_BYTES_PER_OWNER): delete models, "
                "datasets or plans first",
                headers={"Connection": "close"},
            )
    if settings.quota_bytes_total is not None:
        used = db.stored_bytes(everyone=True)
        if used + incoming > settings.quota_bytes_total:
            raise Problem(
                507,
                f"the server stores {used} bytes; {incoming} more would pass its total quota of "
                f"{settings.quota_bytes_total} (MPQ_QUOTA_BYTES_TOTAL)",
                headers={"Connection": "close"},
            )


def _client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"
