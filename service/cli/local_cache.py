"""A cache of finished sensitivity results for the local CLI, keyed like the server's stored results.

`mpq plan` spent 529 of 637 s on the orientation classifier computing a sensitivity that an
earlier `mpq sensitivity` (or plan) on the same model, data and settings had already computed;
the server reuses its stored result in that case, and now the local CLI does too. A result is
found by the SHA-256 of the model file, of the calibration file and of the analysis configuration
(canonical JSON) with the mpq version; entries are JSON written by ``SensitivityResult.to_dict``
and read back through ``from_dict`` (never pickle). An unreadable entry is a miss, not an error.

The folder is ``$MPQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/mpq/sensitivity``, else
``~/.cache/mpq/sensitivity``; at most ``max_entries`` results are kept (the least recently used
go first). ``--no-cache`` on `mpq sensitivity` and `mpq plan` neither reads nor writes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.versions import mpq_version

if TYPE_CHECKING:
    from sensitivity.results import SensitivityResult  # loads torch: for the types only

MAX_ENTRIES = 256  # an interlayer result of a 100-layer model is about 1 MB of JSON


def default_folder() -> Path:
    explicit = os.environ.get("MPQ_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mpq" / "sensitivity"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class SensitivityCache:
    """Finished sensitivity results on disk (see the module docstring)."""

    def __init__(self, folder: Path | None = None, max_entries: int = MAX_ENTRIES) -> None:
        self.folder = folder or default_folder()
        self.max_entries = max_entries

    @staticmethod
    def key(model_sha256: str, data_sha256: str, config: Mapping[str, Any]) -> str:
        identity = {"model": model_sha256, "data": data_sha256, "config": dict(config), "mpq": mpq_version()}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> SensitivityResult | None:
        from sensitivity.results import SensitivityResult

        path = self.folder / f"{key}.json"
        try:
            result = SensitivityResult.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):  # missing, torn or from an older format: a miss
            return None
        os.utime(path)  # recently used
        return result

    def put(self, key: str, result: SensitivityResult) -> Path | None:
        """Store ``result`` atomically; None (and nothing left behind) when it cannot be written."""
        temporary: str | None = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
            with os.fdopen(handle, "w") as file:
                json.dump(result.to_dict(), file, allow_nan=False)
            target = self.folder / f"{key}.json"
            os.replace(temporary, target)
            temporary = None
        except (OSError, ValueError):
            return None
        finally:
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)
        self._prune()
        return target

    def _prune(self) -> None:
        entries = sorted(self.folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        for stale in entries[self.max_entries :]:
            stale.unlink(missing_ok=True)
