"""Bearer API tokens. Only the sha256 of a token is stored; tokens are random 256-bit
secrets, so a fast hash is enough (there is nothing to brute-force)."""

from __future__ import annotations

import hashlib
import secrets
import time

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, State
from starlette.requests import Request

from service.api.errors import Problem
from service.settings import AuthMode
from service.store.sql_store import SqlStore
from service.store.tables import ApiToken

TOKEN_PREFIX = "mpq_"
TOKEN_CACHE_S = 5.0
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="mpq"'}


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(db: SqlStore, name: str) -> tuple[ApiToken, str]:
    """Returns the row and the secret, which is shown once and never stored."""
    if not name.strip():
        raise ValueError("a token needs a non-empty name")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = db.add_token(ApiToken(name=name.strip(), token_hash=hash_token(secret), prefix=secret[:10]))
    return row, secret


async def token_is_valid(state: State, token: str) -> bool:
    """Whether ``token`` is a live API token (the bearer header on /v1, the dashboard's cookie).

    A token seen valid recently is trusted for ``TOKEN_CACHE_S`` without a database round trip
    (a revoked token stops working within that time); the lookup itself runs in a thread so that
    the event loop never waits on the database.
    """
    cache: dict[str, float] = state.token_cache
    digest = hash_token(token)
    if cache.get(digest, 0.0) > time.monotonic():
        return True
    if await run_in_threadpool(state.db.use_token, digest) is None:
        cache.pop(digest, None)
        return False
    if len(cache) > 10_000:
        cache.clear()
    cache[digest] = time.monotonic() + TOKEN_CACHE_S
    return True


async def require_bearer(state: State, headers: Headers) -> None:
    """The /v1 check, run by ``service.api.guard`` before any body byte is read; a no-op when auth is off.

    Only the ``Authorization: Bearer`` header counts. The dashboard's cookie does not: a browser
    attaches cookies to requests that other sites' pages make, so accepting it here would let any
    page drive the API with the logged-in user's rights (CSRF).
    """
    if state.settings.auth is AuthMode.off:
        return
    token = bearer_token(headers)
    if not token:
        raise Problem(
            401,
            "missing API token: send 'Authorization: Bearer <token>' (create one with `mpq token create --name NAME`)",
            headers=CHALLENGE,
        )
    if not await token_is_valid(state, token):
        raise Problem(401, "the API token is unknown or revoked", headers=CHALLENGE)


def bearer_token(headers: Headers) -> str | None:
    scheme, _, value = headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def request_owner(request: Request) -> str | None:
    """The id of the API token that made the request (None with auth off): who owns what it stores.
    /v1 requests carry it as the bearer header (the guard checked it); the dashboard's, as its cookie."""
    if request.app.state.settings.auth is AuthMode.off:
        return None
    token = bearer_token(request.headers) or request.cookies.get("mpq_token")
    if not token:
        return None
    db: SqlStore = request.app.state.db
    return db.token_id(hash_token(token))
