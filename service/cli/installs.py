"""Which install each ``mpq`` command needs, and the one line a command says when it is missing.

A plain ``pip install mpq`` is the client: the command line, numpy, httpx and pydantic (a 122 MB
venv in 8 s, where the full install is 1.5 GB in 66 s: docs/benchmarks.md, "Client install"), enough
for every ``--server`` command, which never imports torch (docs/ci.md). Two extras add the rest:

- ``mpq[local]``: the libraries' stack (torch, onnx, onnxruntime, scipy, onnxscript), for ``mpq sensitivity``
  and ``mpq plan`` without ``--server``;
- ``mpq[server]``: that and the service's (FastAPI, uvicorn, SQLAlchemy, alembic, Celery, ...), for
  ``mpq serve``, ``worker``, ``demo``, ``db`` and ``token``.

A command checks its install before it imports anything of it (``importlib.util.find_spec`` finds a
package without importing it) and, when something is missing, says which extra to install and exits
2 (``ExitCode.BAD_INPUT``, as for any input the user must fix) instead of a ModuleNotFoundError's
traceback. ``tests/service/test_installs.py`` pins the module lists to pyproject's extras.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Install:
    """An extra of pyproject.toml: its name and the top-level modules its requirements provide."""

    extra: str
    modules: tuple[str, ...]

    def missing(self) -> list[str]:
        """The modules of this install that cannot be found (nothing is imported)."""
        return [name for name in self.modules if not _findable(name)]


LOCAL = Install("local", ("torch", "onnx", "onnxruntime", "scipy", "onnxscript"))
SERVER = Install(
    "server",
    (
        *LOCAL.modules,
        "fastapi",
        "fastapi_offline",
        "uvicorn",
        "sqlalchemy",
        "alembic",
        "psycopg",
        "jinja2",
        "plotly",
        "celery",
        "psutil",
        "sklearn",
    ),
)
# Commands that run the service, or read its database: they need the server install.
SERVER_COMMANDS = ("serve", "worker", "demo", "db", "token")
SHOWN_MODULES = 4  # the message names this many missing modules, then counts the rest


def missing_install(install: Install, command: str, alternative: str = "") -> str | None:
    """None when ``install`` is complete, else the one-line message: what ``command`` needs and how
    to get it (``alternative``: what else the user can do, such as give ``--server``)."""
    absent = install.missing()
    if not absent:
        return None
    named = ", ".join(absent[:SHOWN_MODULES]) + (
        f" and {len(absent) - SHOWN_MODULES} more" if len(absent) > SHOWN_MODULES else ""
    )
    return (
        f"{command} needs the {install.extra} install ({named} not installed): "
        f"pip install 'mpq[{install.extra}]'{alternative}"
    )


def _findable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a finder refusing the name, or a broken module left in sys.modules
        return False
