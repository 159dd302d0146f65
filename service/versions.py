"""The version of the installed mpq, looked up in one place.

Read from the package metadata only (no library imported: the API process never loads torch or
onnxruntime), with the fallback of ``sensitivity.versions``, the one lookup the libraries' results record their
versions with (which the API process does not import: it loads no library); this one is what the service reports as itself (the OpenAPI document, the
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
