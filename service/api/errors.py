"""Every 4xx/5xx answer is ``application/problem+json`` (RFC 9457), never a stack trace.

Unexpected exceptions are answered (500) by ``service.api.guard.Guard``, which keeps the connection open.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_MEDIA_TYPE = "application/problem+json"


class InvalidField(BaseModel):
    loc: list[str | int] = Field(description="where: body, query, path or header, then the field's path")
    msg: str


class ProblemDocument(BaseModel):
    """What ``problem_response`` sends, for the API's schema (service/api/openapi.py): RFC 9457's members,
    and the extension members some answers add."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "type": "about:blank",
                    "title": "Unprocessable Content",
                    "status": 422,
                    "detail": "invalid request: body.constraints.max_drop: Input should be less than or equal to 100",
                    "instance": "/v1/plans",
                    "errors": [
                        {
                            "loc": ["body", "constraints", "max_drop"],
                            "msg": "Input should be less than or equal to 100",
                        }
                    ],
                },
                {
                    "type": "about:blank",
                    "title": "Not Found",
                    "status": 404,
                    "detail": "no job with id 'c0ffee'",
                    "instance": "/v1/jobs/c0ffee",
                },
            ]
        },
    )
    type: str = Field(description="always about:blank: the status and title say what kind of problem it is")
    title: str
    status: int
    detail: str = Field(description="what is wrong, in words that say how to fix it")
    instance: str | None = Field(None, description="the request's path")
    errors: list[InvalidField] | None = Field(None, description="a request that is not valid (422): each field")
    code: str | None = Field(None, description="a job request refused (422): bad_input, or infeasible constraints")
    jobs: list[str] | None = Field(None, description="a delete refused (409): the jobs that use the upload")
    checks: dict[str, str] | None = Field(None, description="/readyz (503): each check and its state")


class Problem(Exception):
    """Raise to answer with a problem document."""

    def __init__(
        self, status: int, detail: str, *, title: str | None = None, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.headers = headers
        self.extra = extra


def problem_response(
    status: int,
    detail: str,
    *,
    title: str | None = None,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(
            exc.status, exc.detail, title=exc.title, instance=request.url.path, headers=exc.headers, **exc.extra
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}; see /docs for the API"
        if exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
        return problem_response(
            exc.status_code, detail, instance=request.url.path, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        summary = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:5])
        return problem_response(422, f"invalid request: {summary}", instance=request.url.path, errors=errors)

    @app.exception_handler(DataError)
    async def _data(request: Request, exc: DataError) -> JSONResponse:
        # e.g. a NUL byte in a text field, which PostgreSQL cannot store
        return problem_response(
            422,
            "the request holds a value the database cannot store (control characters "
            "such as NUL bytes are not allowed in names and ids)",
            instance=request.url.path,
        )
