"""The versions a result records: one lookup, one fallback, for the sensitivity and the plan alike.

Torch-free at import. ``service.versions.mpq_version`` is the service's own (the API process imports
no library) and shares the fallback.
"""

from __future__ import annotations

import importlib.metadata
import sys

UNKNOWN = "unknown"


def versions(*names: str) -> dict[str, str]:
    """name -> version of each module or distribution named (``"mpq"``, ``"torch"``, ...)."""
    return {name: version_of(name) for name in names}


def version_of(name: str) -> str:
    """The imported module's ``__version__`` (what actually ran), else the installed distribution's
    (``onnxruntime`` is the ``onnxruntime-gpu`` distribution on CUDA machines), else ``unknown``
    (a tree run without being installed)."""
    found = getattr(sys.modules.get(name), "__version__", None)
    if isinstance(found, str):
        return found
    for distribution in (name, *importlib.metadata.packages_distributions().get(name, ())):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return UNKNOWN
