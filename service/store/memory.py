"""An in-memory ``BlobStore``: the test double beside the protocol (as httpx's ``MockTransport`` is beside
its transports). Same contract as ``LocalBlobStore``: blobs named by their sha256, invisible until
committed, bounded writes, verified full reads. ``path`` and ``local_path``, which promise a file, write
the bytes to a private scratch directory when asked."""

from __future__ import annotations

import hashlib
import itertools
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service.store.blobs import CHUNK_SIZE, SHA256, BlobCorrupted, BlobStore, BlobTooLarge, BlobWriter


class MemoryBlobWriter(BlobWriter):
    def __init__(self, store: MemoryBlobStore, max_bytes: int) -> None:
        self._store = store
        self._max_bytes = max_bytes
        self._chunks: list[bytes] = []
        self._path = store.scratch_path()
        self.size = 0

    @property
    def path(self) -> Path:
        self._path.write_bytes(b"".join(self._chunks))
        return self._path

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self._max_bytes:
            raise BlobTooLarge(self._max_bytes)
        self._chunks.append(bytes(chunk))

    def finish(self) -> str:
        return hashlib.sha256(b"".join(self._chunks)).hexdigest()

    def commit(self) -> str:
        sha256 = self.finish()
        self._store.blobs[sha256] = b"".join(self._chunks)
        self.abort()
        return sha256

    def abort(self) -> None:
        self._chunks.clear()
        self._path.unlink(missing_ok=True)


class MemoryBlobStore(BlobStore):
    """Blobs in a dict (``blobs``: sha256 -> bytes); the locks are in-process."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self._scratch = Path(tempfile.mkdtemp(prefix="mpq-memory-blobs-"))
        weakref.finalize(self, shutil.rmtree, self._scratch, ignore_errors=True)  # removed with the store
        self._names = itertools.count()
        self._lock = threading.RLock()

    def scratch_path(self) -> Path:
        return self._scratch / f"write-{next(self._names)}"

    def writer(self, max_bytes: int) -> MemoryBlobWriter:
        return MemoryBlobWriter(self, max_bytes)

    @contextmanager
    def reference_lock(self) -> Iterator[None]:
        with self._lock:
            yield

    @contextmanager
    def collection_lock(self) -> Iterator[None]:
        with self._lock:
            yield

    def exists(self, sha256: str) -> bool:
        return self._checked(sha256) in self.blobs

    def size(self, sha256: str) -> int:
        return len(self._bytes(sha256))

    def read(self, sha256: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        data = self._bytes(sha256)
        end = len(data) if end is None else min(end, len(data))
        if start == 0 and end == len(data) and hashlib.sha256(data).hexdigest() != sha256:
            raise BlobCorrupted(f"blob {sha256} does not match its hash")
        for offset in range(start, end, CHUNK_SIZE):
            yield data[offset : min(offset + CHUNK_SIZE, end)]

    def local_path(self, sha256: str) -> Path:
        path = self._scratch / self._checked(sha256)
        path.write_bytes(self._bytes(sha256))
        return path

    def delete(self, sha256: str) -> None:
        self.blobs.pop(self._checked(sha256), None)

    def check(self) -> None:
        return None  # memory is always usable

    def _bytes(self, sha256: str) -> bytes:
        try:
            return self.blobs[self._checked(sha256)]
        except KeyError:
            raise FileNotFoundError(f"no blob {sha256}") from None

    @staticmethod
    def _checked(sha256: str) -> str:
        if not SHA256.match(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return sha256
