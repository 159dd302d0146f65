"""Blobs and the rows that reference them: storing a job's file, deleting blobs nothing references any
more (the one place that decides so), and collecting what a crash left behind. The rows are asked
through ``SqlStore``; the locks of the blob store order the two."""

from __future__ import annotations

import logging
from typing import IO

from service.store.blobs import BlobStore, LocalBlobStore
from service.store.sql_store import SqlStore

logger = logging.getLogger("mpq.blobs")


def delete_if_unused(db: SqlStore, store: BlobStore, *hashes: str) -> list[str]:
    """Delete the blobs no row references any more; returns those deleted."""
    deleted = []
    with store.collection_lock():
        unused = [sha256 for sha256 in dict.fromkeys(hashes) if not db.blob_in_use(sha256)]
        for sha256 in unused:
            store.delete(sha256)
            deleted.append(sha256)
    return deleted


def store_file(store: BlobStore, file: IO[bytes]) -> tuple[str, int]:
    """Copy a file (from its start) into the store; returns (sha256, size). Call under
    ``store.reference_lock()`` until the referencing row is committed."""
    file.seek(0)
    writer = store.writer(max_bytes=1 << 62)
    try:
        while chunk := file.read(1 << 20):
            writer.write(chunk)
        return writer.commit(), writer.size
    except BaseException:
        writer.abort()
        raise


def collect_garbage(db: SqlStore, store: LocalBlobStore) -> dict[str, int]:
    """At start-up: remove blobs no row references (their rows' deletion was cut short) and the
    temporary files of uploads whose process died."""
    with store.collection_lock():
        referenced = db.referenced_blobs()
        orphans = [sha256 for sha256 in store.blob_hashes() if sha256 not in referenced]
        for sha256 in orphans:
            store.delete(sha256)
    removed = {"blobs": len(orphans), "temporary_files": store.remove_abandoned_writes()}
    if any(removed.values()):
        logger.info("start-up clean-up removed %s", removed)
    return removed
