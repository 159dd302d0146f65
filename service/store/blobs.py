"""Content-addressed blob store: blobs are named by the sha256 of their bytes.

``BlobStore`` and ``BlobWriter`` are the interface (so object storage can be added later);
``LocalBlobStore`` keeps blobs on the local filesystem, and ``service.store.memory.MemoryBlobStore``
in a dict, for tests. Writes stream into a temporary file in the same
directory tree, hashing as they go, and become visible only by an atomic rename, so a
reader never sees a partial blob and an interrupted write leaves nothing behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol

from service.sandbox.child import process_alive

CHUNK_SIZE = 1 << 20
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BlobTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"blob exceeds the limit of {limit} bytes")
        self.limit = limit


class BlobCorrupted(Exception):
    pass


class BlobWriter(Protocol):
    """A blob being written: bytes in, hashed as they come; invisible to readers until ``commit``."""

    size: int  # bytes written so far

    def write(self, chunk: bytes) -> None: ...

    @property
    def path(self) -> Path:
        """The temporary file, complete once ``finish`` returned: readable for inspection before ``commit``."""

    def finish(self) -> str:
        """Flush to disk and return the sha256, without publishing yet."""

    def commit(self) -> str:
        """Make the blob visible; returns its sha256."""

    def abort(self) -> None: ...


class BlobStore(Protocol):
    """Blobs named by the sha256 of their bytes."""

    def writer(self, max_bytes: int) -> BlobWriter: ...

    def reference_lock(self) -> AbstractContextManager[None]:
        """Held (shared) from committing a blob until the row that references it is committed."""

    def collection_lock(self) -> AbstractContextManager[None]:
        """Held (exclusive) while deciding that a blob is unreferenced and deleting it."""

    def exists(self, sha256: str) -> bool: ...

    def size(self, sha256: str) -> int: ...

    def read(self, sha256: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Stream bytes [start, end); a full read verifies the hash and raises ``BlobCorrupted``."""

    def local_path(self, sha256: str) -> Path:
        """A path to the blob's bytes on this machine (workers open models from it)."""

    def delete(self, sha256: str) -> None: ...

    def check(self) -> None:
        """Raise if the store is not usable (for /readyz)."""


class LocalBlobWriter(BlobWriter):
    def __init__(self, temp_dir: Path, final_path_for: Callable[[str], Path], max_bytes: int) -> None:
        # named by the writing process, so that a restart can tell an abandoned write from a live one
        fd, name = tempfile.mkstemp(dir=temp_dir, prefix=f"upload-{os.getpid()}-")
        self._file: BinaryIO = os.fdopen(fd, "wb")
        self._path = Path(name)
        self._final_path_for = final_path_for
        self._hash = hashlib.sha256()
        self._max_bytes = max_bytes
        self.size = 0

    @property
    def path(self) -> Path:
        return self._path

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self._max_bytes:
            raise BlobTooLarge(self._max_bytes)
        self._hash.update(chunk)
        self._file.write(chunk)

    def finish(self) -> str:
        """Flush to disk and return the hash, without publishing yet."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        return self._hash.hexdigest()

    def commit(self) -> str:
        sha256 = self.finish()
        final = self._final_path_for(sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self._path, 0o644)  # readable through a descriptor by a sandboxed job; blobs/ itself is 0700
        os.replace(self._path, final)  # atomic; an existing identical blob is simply replaced
        return sha256

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._path.unlink(missing_ok=True)


class LocalBlobStore(BlobStore):
    """Blobs under ``root/blobs`` and writes in progress under ``root/tmp``, both private to the
    server's user (sandboxed processes get descriptors, never paths).

    Deleting a blob races with a new upload of the same bytes (the upload's rename lands, then the
    delete's "unreferenced?" check runs before the upload's row is committed): uploads hold
    ``reference_lock`` (shared) from rename to commit, and deletions hold ``collection_lock``
    (exclusive) from the check to the unlink. Both are ``flock``s on a file in the store, so they
    hold across the API processes and workers of one host.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._blobs = self.root / "blobs"
        self._temp = self.root / "tmp"
        for directory in (self.root, self._blobs, self._temp):
            directory.mkdir(parents=True, exist_ok=True)
        for directory in (self._blobs, self._temp):
            os.chmod(directory, 0o700)
        self._lock_path = self.root / ".references.lock"

    @contextmanager
    def reference_lock(self) -> Iterator[None]:
        with self._flock(fcntl.LOCK_SH):
            yield

    @contextmanager
    def collection_lock(self) -> Iterator[None]:
        with self._flock(fcntl.LOCK_EX):
            yield

    @contextmanager
    def _flock(self, mode: int) -> Iterator[None]:
        with self._lock_path.open("a") as handle:
            fcntl.flock(handle, mode)  # released when the descriptor closes
            yield

    def blob_hashes(self) -> list[str]:
        return [path.name for path in self._blobs.glob("*/*") if SHA256.match(path.name)]

    def remove_abandoned_writes(self) -> int:
        """Temporary files of writers whose process is gone (an upload cut by ``kill -9``)."""
        removed = 0
        for path in self._temp.glob("upload-*"):
            pid = path.name.split("-")[1]
            if pid.isdigit() and not process_alive(int(pid)):
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def _path(self, sha256: str) -> Path:
        if not SHA256.match(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self._blobs / sha256[:2] / sha256

    @property
    def temp_dir(self) -> Path:
        """Where writes begin (the same filesystem as the blobs, so a commit is a rename)."""
        return self._temp

    def writer(self, max_bytes: int) -> LocalBlobWriter:
        return LocalBlobWriter(self._temp, self._path, max_bytes)

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).is_file()

    def size(self, sha256: str) -> int:
        return self._path(sha256).stat().st_size

    def local_path(self, sha256: str) -> Path:
        return self._path(sha256)

    def read(self, sha256: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        path = self._path(sha256)
        total = path.stat().st_size
        end = total if end is None else min(end, total)
        verify = start == 0 and end == total
        digest = hashlib.sha256()
        with path.open("rb") as file:
            file.seek(start)
            remaining = end - start
            while remaining > 0:
                chunk = file.read(min(CHUNK_SIZE, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
                if verify:
                    digest.update(chunk)
                yield chunk
        if verify and digest.hexdigest() != sha256:
            raise BlobCorrupted(f"blob {sha256} does not match its hash")

    def verify(self, sha256: str) -> bool:
        try:
            for _ in self.read(sha256):
                pass
        except BlobCorrupted:
            return False
        return True

    def delete(self, sha256: str) -> None:
        self._path(sha256).unlink(missing_ok=True)

    def check(self) -> None:
        probe = self._temp / ".ready"
        probe.write_bytes(b"ok")
        probe.unlink()

    def blob_count(self) -> int:
        return sum(1 for p in self._blobs.rglob("*") if p.is_file())

    def temp_count(self) -> int:
        return sum(1 for p in self._temp.iterdir() if p.name != ".ready")
