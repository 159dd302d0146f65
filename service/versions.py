"""The version of the installed mpq, looked up in one place.

Read from the package metadata only (no library imported: the API process never loads torch or
onnxruntime), with one fallback, the one ``planner.export.versions`` uses, for a tree run without being
installed. The libraries' ``versions()`` (``planner.export``, ``sensitivity.run``) describe the packages a
result was computed with; this one is what the service reports as itself (the OpenAPI document, the
dashboard's footer) and what keys the local CLI's sensitivity cache.
"""

from __future__ import annotations

import importlib.metadata

UNKNOWN = "unknown"


def mpq_version() -> str:
    try:
        return importlib.metadata.version("mpq")
    except importlib.metadata.PackageNotFoundError:
        return UNKNOWN
