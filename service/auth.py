"""Bearer API tokens. Only the sha256 of a token is stored; tokens are random 256-bit
secrets, so a fast hash is enough (there is nothing to brute-force)."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from fastapi import Request
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.errors import Problem
from service.settings import AuthMode
from service.tables import ApiToken, utcnow

TOKEN_PREFIX = "mpq_"


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


def require_token(request: Request) -> None:
    """FastAPI dependency on every /v1 route; a no-op when auth is off."""
    state = request.app.state
    if state.settings.auth is AuthMode.off:
        return
    token = _bearer(request) or request.cookies.get("mpq_token")
    challenge = {"WWW-Authenticate": 'Bearer realm="mpq"'}
    if not token:
        raise Problem(401, "missing API token: send 'Authorization: Bearer <token>' (create one with "
                           "`mpq token create --name NAME`)", headers=challenge)
    factory: sessionmaker[Session] = state.sessions
    with factory() as session, session.begin():
        if verify_token(session, token) is None:
            raise Problem(401, "the API token is unknown or revoked", headers=challenge)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None
