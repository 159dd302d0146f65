"""The OpenAPI document (``/openapi.json``, shown by ``/docs`` and ``/redoc``), completed to say what the
server does:

- operation ids are the routes' names (``create_plan``, ``get_job``, ``upload_model``): readable, unique
  (tests/service/test_openapi.py) and stable, since a client generator names its methods after them;
- the bearer scheme is declared, and required (``security``, with a 401) on every /v1 operation while the
  server runs with MPQ_AUTH=token. The setting is read on each request, as the guard reads it, so a
  server with auth off does not claim to need a token;
- every error is ``application/problem+json`` (``service.api.errors.ProblemDocument``): the 422 of
  FastAPI's request validation (answered by ``service.api.errors``, never as FastAPI's own
  HTTPValidationError) and the errors the guard answers before any route runs (400, 403, 413, 500)
  included. Routes declare their own errors by status and description only; the content is added here.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic.json_schema import models_json_schema

from service.api.errors import PROBLEM_MEDIA_TYPE, ProblemDocument
from service.settings import AuthMode

BEARER_SCHEME = "bearerAuth"
REF = "#/components/schemas/"
SAFE_METHODS = frozenset({"get", "head", "options"})
# FastAPI's schemas for its own 422 body, which this server never sends
FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")

INVALID_REQUEST = (
    "The request is not valid: a parameter or body field (`errors` names each), or what the server "
    "checked in it (an id that names nothing, a request the libraries refuse, with `code`)"
)
GUARD_ERRORS = {  # service/api/guard.py: before any route runs
    "400": "The Host header is not a name of this server (MPQ_ALLOWED_HOSTS)",
    "500": "An unexpected error; the server log has the details",
}
CROSS_SITE = "A browser's cross-site request (Origin, Referer or Sec-Fetch-Site of another site)"
BODY_TOO_LARGE = "The request body passes MPQ_MAX_REQUEST_BODY_BYTES"
NO_TOKEN = "Missing, unknown or revoked API token (`Authorization: Bearer <token>`)"


def operation_id(route: APIRoute) -> str:
    """The route's name: its function's, or the one a route gives where one function serves several
    (service/api/registry.py)."""
    return route.name


class DocumentedApp(FastAPI):
    """FastAPI, whose ``openapi()`` is the completed document (see the module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._documents: dict[bool, tuple[dict[str, Any], dict[str, Any]]] = {}  # auth on -> (FastAPI's, ours)

    def openapi(self) -> dict[str, Any]:
        generated = super().openapi()  # cached by FastAPI, and made anew when the routes change
        auth_on = self.state.settings.auth is AuthMode.token
        made = self._documents.get(auth_on)
        if made is None or made[0] is not generated:
            made = (generated, completed(generated, auth_on))
            self._documents[auth_on] = made
        return made[1]


def completed(generated: dict[str, Any], auth_on: bool) -> dict[str, Any]:
    document = copy.deepcopy(generated)
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in FASTAPI_VALIDATION_SCHEMAS:
        schemas.pop(name, None)
    schemas.update(problem_schemas())
    components["securitySchemes"] = {BEARER_SCHEME: bearer_scheme(auth_on)}
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            guarded = auth_on and (path == "/v1" or path.startswith("/v1/"))
            operation["responses"] = error_responses(operation, method, guarded)
            if guarded:
                operation["security"] = [{BEARER_SCHEME: []}]
    return document


def problem_schemas() -> dict[str, Any]:
    """ProblemDocument and the schemas it refers to, as components."""
    _, top = models_json_schema([(ProblemDocument, "serialization")], ref_template=REF + "{model}")
    definitions: dict[str, Any] = top["$defs"]
    return definitions


def bearer_scheme(auth_on: bool) -> dict[str, Any]:
    state = (
        "This server runs with MPQ_AUTH=token: every /v1 operation needs it."
        if auth_on
        else "This server runs with MPQ_AUTH=off: no operation needs it."
    )
    return {
        "type": "http",
        "scheme": "bearer",
        "description": "An API token, created on the server with `mpq token create --name NAME` (shown once). "
        "With MPQ_AUTH=token every /v1 route needs it; /healthz, /readyz and these docs never do. " + state,
    }


def error_responses(operation: dict[str, Any], method: str, guarded: bool) -> dict[str, Any]:
    """The operation's responses with the guard's errors added, and every 4xx/5xx as problem+json. Routes
    declare an error by status and description (``responses={404: {"description": ...}}``); one the guard
    also answers for every route (400, 500) gets both reasons."""
    responses: dict[str, Any] = dict(operation.get("responses", {}))
    if is_fastapi_validation(responses.get("422")):  # its schema is not what service.api.errors sends
        responses["422"] = {"description": INVALID_REQUEST}
    for status, description in GUARD_ERRORS.items():  # every operation's, besides its own reasons
        own = responses.get(status, {}).get("description")
        responses[status] = {
            "description": f"{own}; or {description[0].lower()}{description[1:]}" if own else description
        }
    added: dict[str, str] = {}
    if guarded:
        added["401"] = NO_TOKEN
    if method not in SAFE_METHODS:
        added["403"] = CROSS_SITE
    if "requestBody" in operation:
        added["413"] = BODY_TOO_LARGE
    for status, description in added.items():
        responses.setdefault(status, {"description": description})
    for status, response in responses.items():
        if status[0] in "45":
            response["content"] = {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": REF + ProblemDocument.__name__}}}
    return dict(sorted(responses.items()))


def is_fastapi_validation(response: dict[str, Any] | None) -> bool:
    """Whether a response is the 422 that FastAPI adds to every operation with parameters or a body."""
    schema = (response or {}).get("content", {}).get("application/json", {}).get("schema", {})
    return bool(schema.get("$ref") == REF + FASTAPI_VALIDATION_SCHEMAS[0])
