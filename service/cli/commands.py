"""The ``mpq`` command line."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from service.cli import demo, local_commands
from service.cli.installs import SERVER, SERVER_COMMANDS, missing_install
from service.cli.output import ExitCode
from service.cli.signals import reported_stops, stop
from service.settings import Settings, settings_help

if TYPE_CHECKING:  # loaded by the commands that use them, not by `mpq plan` or `mpq sensitivity`
    import socket

    import uvicorn
    from sqlalchemy import Engine

    from service.store.sql_store import SqlStore

Handler = Callable[[argparse.Namespace, Settings], int]


@reported_stops
def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return ExitCode.BAD_INPUT
    try:
        settings = Settings()
    except ValueError as error:
        print(f"mpq: invalid settings: {error}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    if (missing := getattr(args, "missing_install", None)) is not None and (message := missing()) is not None:
        print(f"mpq: {message}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    handler: Handler = args.handler
    return handler(args, settings)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpq", description="Mixed-precision quantization planner.")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the API server",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the HTTP API on the embedded defaults (SQLite, local artifact directory) "
        "or on the database and store the settings name.",
    )
    serve.add_argument("--host", help="override MPQ_HOST")
    serve.add_argument("--port", type=int, help="override MPQ_PORT")
    serve.add_argument("--upgrade-db", action="store_true", help="apply pending database migrations first")
    serve.add_argument(
        "--api-workers",
        type=int,
        default=1,
        metavar="N",
        help="API processes sharing the port (the job executor runs in one of them)",
    )
    serve.set_defaults(handler=_serve)

    worker = commands.add_parser(
        "worker",
        help="run a distributed (Celery) worker: one per GPU",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Take jobs from MPQ_BROKER_URL one at a time and run each in a spawned child process. "
        "All workers and the API share MPQ_DATABASE_URL and the artifact store.",
    )
    worker.add_argument("--gpu", help="GPU id this worker uses (sets CUDA_VISIBLE_DEVICES for its jobs)")
    worker.add_argument("--name", help="Celery node name (default: mpq-HOST-GPU)")
    worker.set_defaults(handler=_worker)

    demo.register(commands)
    local_commands.register(commands)

    db = commands.add_parser("db", help="database schema").add_subparsers(title="db commands", metavar="ACTION")
    db.add_parser("upgrade", help="apply all migrations").set_defaults(handler=_db_upgrade)
    db.add_parser("current", help="print the schema revision").set_defaults(handler=_db_current)

    token = commands.add_parser("token", help="API tokens").add_subparsers(title="token commands", metavar="ACTION")
    create = token.add_parser("create", help="create a token (printed once)")
    create.add_argument("--name", required=True)
    create.set_defaults(handler=_token_create)
    token.add_parser("list", help="list tokens").set_defaults(handler=_token_list)
    revoke = token.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("token_id")
    revoke.set_defaults(handler=_token_revoke)
    for name in SERVER_COMMANDS:  # checked in main() before the handler imports the server stack
        commands.choices[name].set_defaults(missing_install=functools.partial(missing_install, SERVER, f"mpq {name}"))
    return parser


def _engine(settings: Settings) -> Engine:
    from service.store.db import make_engine

    return make_engine(settings.resolved_database_url)


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from service.app import SERVER_OPTIONS, create_app

    updates = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = settings.model_copy(update=updates)
    try:
        settings.check_bind()
    except ValueError as error:
        print(f"mpq: {error}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    if not _schema_is_current(settings, upgrade_first=args.upgrade_db):
        return ExitCode.BAD_INPUT
    raise_open_file_limit()
    announcement = (
        f"mpq: serving on http://{settings.host}:{settings.port} (auth {settings.auth.value}, "
        f"database {_redacted(settings.resolved_database_url)})"
    )
    if args.api_workers > 1:
        # each worker process builds its own app from the environment (MPQ_* settings)
        os.environ.update({"MPQ_HOST": settings.host, "MPQ_PORT": str(settings.port)})
        config = uvicorn.Config(
            "service.cli.signals:api_worker_app",
            factory=True,
            workers=args.api_workers,
            host=settings.host,
            port=settings.port,
            log_level="info",
            **SERVER_OPTIONS,
        )
        listening = config.bind_socket()  # connections wait in its backlog until a worker accepts them
        print(announcement, file=sys.stderr, flush=True)
        return _supervise_api_workers(config, listening)
    config = uvicorn.Config(
        create_app(settings), host=settings.host, port=settings.port, log_level="info", **SERVER_OPTIONS
    )
    server = _announcing_server(config, announcement)
    server.run()
    return ExitCode.OK if server.started else ExitCode.BAD_INPUT


def _supervise_api_workers(config: uvicorn.Config, listening: socket.socket) -> int:
    """Run uvicorn's supervisor of API processes; stopped by a signal, end as that signal ends a command
    (uvicorn's supervisor catches SIGINT and SIGTERM itself, stops its processes and returns)."""
    from uvicorn.supervisors import Multiprocess

    stopped_by: list[int] = []

    class Supervisor(Multiprocess):
        def handle_int(self) -> None:
            stopped_by.append(signal.SIGINT)
            super().handle_int()

        def handle_term(self) -> None:
            stopped_by.append(signal.SIGTERM)
            super().handle_term()

    Supervisor(config, sockets=[listening]).run()
    if stopped_by:
        stop(stopped_by[0])
    return ExitCode.OK


def _announcing_server(config: uvicorn.Config, announcement: str) -> uvicorn.Server:
    """uvicorn's server, printing ``announcement`` once it listens and not before: a script that
    waits for the line can connect at once (the line used to come before the port was bound)."""
    import uvicorn

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                print(announcement, file=sys.stderr, flush=True)

    return AnnouncingServer(config)


def raise_open_file_limit() -> int:
    """Raise the soft limit on open files to the hard limit; returns the soft limit now in force.

    Every connection is a descriptor: at the usual soft limit of 1024, 1,100 slow connections left the
    server unable to accept more (its /healthz timed out). API worker processes inherit the limit.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20  # Linux refuses "unlimited" here
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):  # above fs.nr_open: keep what we have
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _schema_is_current(settings: Settings, upgrade_first: bool = False) -> bool:
    """Create the schema on a first start (or upgrade it when asked), then check that it matches
    this version; say what was done, or what to run."""
    from service.store.db import SchemaOutOfDate, prepare_schema

    engine = _engine(settings)
    try:
        done = prepare_schema(engine, upgrade_first=upgrade_first)
        if done:
            print(f"mpq: {done} ({_redacted(settings.resolved_database_url)})", file=sys.stderr)
        return True
    except SchemaOutOfDate as error:
        print(f"mpq: {error}", file=sys.stderr)
        return False
    finally:
        engine.dispose()


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from service.jobs.celery_app import run_worker

    if not _schema_is_current(settings):
        return ExitCode.BAD_INPUT
    stopped_by = run_worker(settings, args.gpu, args.name)
    if stopped_by is not None:
        stop(stopped_by)
    return ExitCode.OK


def _db_upgrade(_args: argparse.Namespace, settings: Settings) -> int:
    from service.store.db import current_revision, upgrade

    engine = _engine(settings)
    upgrade(engine)
    print(f"database at revision {current_revision(engine)}")
    engine.dispose()
    return ExitCode.OK


def _db_current(_args: argparse.Namespace, settings: Settings) -> int:
    from service.store.db import current_revision, head_revision

    engine = _engine(settings)
    print(f"current {current_revision(engine) or '(empty)'}, head {head_revision()}")
    engine.dispose()
    return ExitCode.OK


def _db(settings: Settings) -> SqlStore:
    # the database layer loads for the commands that use it, not for `mpq plan` or `mpq sensitivity`
    from service.store.db import session_factory
    from service.store.sql_store import SqlStore

    if not _schema_is_current(settings):
        raise SystemExit(ExitCode.BAD_INPUT)
    return SqlStore(session_factory(_engine(settings)))


def _token_create(args: argparse.Namespace, settings: Settings) -> int:
    from service.api.auth import create_token  # the API's, loaded only here

    try:
        row, secret = create_token(_db(settings), args.name)
    except ValueError as error:
        print(f"mpq: {error}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    print(json.dumps({"id": row.id, "name": row.name, "token": secret}))
    print("store the token now: it is not shown again", file=sys.stderr)
    return ExitCode.OK


def _token_list(_args: argparse.Namespace, settings: Settings) -> int:
    for row in _db(settings).tokens():
        state = "revoked" if row.revoked_at else "active"
        print(f"{row.id}  {row.prefix}…  {row.name}  {state}  created {row.created_at:%Y-%m-%d %H:%M}")
    return ExitCode.OK


def _token_revoke(args: argparse.Namespace, settings: Settings) -> int:
    if not _db(settings).revoke_token(args.token_id):
        print(f"mpq: no token with id {args.token_id!r}", file=sys.stderr)
        return ExitCode.FAILED
    print(f"revoked {args.token_id}")
    return ExitCode.OK
