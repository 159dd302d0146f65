"""Engine, sessions and the schema version check."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

import mpq_migrations

MIGRATIONS_DIR = Path(mpq_migrations.__file__).parent
T = TypeVar("T")


class SchemaOutOfDate(RuntimeError):
    pass


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, json_serializer=strict_json
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # pool_pre_ping: a connection the server dropped is replaced instead of failing a request.
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10, json_serializer=strict_json)


def strict_json(value: Any) -> str:
    """JSON columns never hold NaN or infinity: json.dumps writes them as bare NaN/Infinity, which no
    JSON client reads (a NaN result once made `mpq sensitivity --server` fail with a TypeError and the
    dashboard page with a JSON error). Storing one raises ValueError, so the job fails, naming it."""
    return json.dumps(value, allow_nan=False)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:  # a DB-API connection: untyped
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    with factory() as session, session.begin():
        yield session


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.connect() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    if head is None:
        raise RuntimeError(f"the migrations in {MIGRATIONS_DIR} define no head revision")
    return head


def check_schema(engine: Engine) -> None:
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise SchemaOutOfDate(
            f"database schema is at revision {current or '(empty)'} but this version of mpq needs {head}: "
            "run `mpq db upgrade` (or start with `mpq serve --upgrade-db`)"
        )


def prepare_schema(engine: Engine, *, upgrade_first: bool = False) -> str | None:
    """Bring the schema to what this version needs where that is safe, and say what was done.

    A database with no tables at all (a first start on a new data directory or an empty
    PostgreSQL database) is created at the head revision, as MLflow's server does. An existing
    schema at another revision is upgraded only with ``upgrade_first`` (``--upgrade-db``, or
    ``mpq db upgrade``); otherwise ``SchemaOutOfDate`` says what to run. None: nothing to do.
    """
    current, head = current_revision(engine), head_revision()
    if current is None and not inspect(engine).get_table_names():
        try:
            upgrade(engine)
        except Exception:
            # another process (a worker started beside the server) may have created it meanwhile
            if current_revision(engine) != head:
                raise
        return f"created the database schema at revision {head}"
    if upgrade_first and current != head:
        upgrade(engine)
        return f"upgraded the database schema from revision {current} to {head}"
    check_schema(engine)
    return None


def retrying(
    operation: Callable[[], T], *, deadline_s: float = 30.0, first_delay_s: float = 0.2, max_delay_s: float = 2.0
) -> T:
    """Run ``operation()`` again when the database connection drops (OperationalError /
    DBAPI disconnects), with exponential backoff capped at ``max_delay_s``, until ``deadline_s``
    has passed since the first try; other errors propagate at once.

    A deadline rather than a count of tries: a server restart or fail-over takes seconds, and five
    quick tries gave up after 3 s.
    """
    give_up_at = time.monotonic() + deadline_s
    delay = first_delay_s
    while True:
        try:
            return operation()
        except (OperationalError, DBAPIError) as error:
            transient = isinstance(error, OperationalError) or error.connection_invalidated
            if not transient or time.monotonic() + delay > give_up_at:
                raise
            time.sleep(delay)
            delay = min(2 * delay, max_delay_s)
