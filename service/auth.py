"""Bearer API tokens. Only the sha256 of a token is stored; tokens are random 256-bit
secrets, so a fast hash is enough (there is nothing to brute-force)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.errors import Problem
from service.settings import AuthMode
from service.tables import ApiToken, utcnow

TOKEN_PREFIX = "mpq_"
TOKEN_CACHE_S = 5.0


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, name: str) -> tuple[ApiToken, str]:
    """Returns the row and the secret, which is shown once and never stored."""
    if not name.strip():
        raise ValueError("a token needs a non-empty name")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(name=name.strip(), token_hash=hash_token(secret), prefix=secret[:10])
    session.add(row)
    session.flush()
    return row, secret


def verify_token(session: Session, token: str) -> ApiToken | None:
    digest = hash_token(token)
    row = session.scalars(select(ApiToken).where(ApiToken.token_hash == digest)).first()
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.token_hash, digest):
        return None
    row.last_used_at = utcnow()
    return row


async def require_token(request: Request) -> None:
    """FastAPI dependency on every /v1 route; a no-op when auth is off.

    Async so that requests do not hop through the threadpool just to be let in; a token seen
    valid recently is trusted for ``TOKEN_CACHE_S`` without a database round trip (a revoked
    token stops working within that time).
    """
    state = request.app.state
    if state.settings.auth is AuthMode.off:
        return
    token = _bearer(request) or request.cookies.get("mpq_token")
    challenge = {"WWW-Authenticate": 'Bearer realm="mpq"'}
    if not token:
        raise Problem(401, "missing API token: send 'Authorization: Bearer <token>' (create one with "
                           "`mpq token create --name NAME`)", headers=challenge)
    cache: dict[str, float] = state.__dict__.setdefault("_token_cache", {})
    digest = hash_token(token)
    if cache.get(digest, 0.0) > time.monotonic():
        return
    if not await run_in_threadpool(_token_is_valid, state.sessions, token):
        cache.pop(digest, None)
        raise Problem(401, "the API token is unknown or revoked", headers=challenge)
    if len(cache) > 10_000:
        cache.clear()
    cache[digest] = time.monotonic() + TOKEN_CACHE_S


def _token_is_valid(factory: sessionmaker[Session], token: str) -> bool:
    with factory() as session, session.begin():
        return verify_token(session, token) is not None


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def request_owner(request: Request) -> str | None:
    """The id of the API token that made the request (None with auth off): who owns what it stores."""
    if request.app.state.settings.auth is AuthMode.off:
        return None
    token = _bearer(request)
    if not token:
        return None
    with request.app.state.sessions() as session:
        return session.scalar(select(ApiToken.id).where(ApiToken.token_hash == hash_token(token)))
