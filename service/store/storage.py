"""What is stored and who owns it: blobs and the rows that reference them.

Storing a job's file, deleting an upload with what was derived from it, deleting blobs nothing
references any more (the one place that decides so), collecting what a crash left behind, and
the bytes each owner stores (for quotas).
"""

from __future__ import annotations

import logging
from typing import IO

from sqlalchemy import func, select, union
from sqlalchemy.orm import Session, sessionmaker

from service.job_status import JobStatus
from service.store.blobs import BlobStore, LocalBlobStore
from service.store.tables import Artifact, Dataset, FrontierPoint, Job, Model, Plan

logger = logging.getLogger("mpq.blobs")
REFERENCING_TABLES = (Model, Dataset, Artifact)


def blob_in_use(session: Session, sha256: str) -> bool:
    """Whether any row still references the blob (uploads are deduplicated by content)."""
    return any(
        session.scalar(select(func.count()).select_from(table).where(table.sha256 == sha256))
        for table in REFERENCING_TABLES
    )


def delete_if_unused(sessions: sessionmaker[Session], store: BlobStore, *hashes: str) -> list[str]:
    """Delete the blobs no row references any more; returns those deleted."""
    deleted = []
    with store.collection_lock():
        with sessions() as session:
            unused = [sha256 for sha256 in dict.fromkeys(hashes) if not blob_in_use(session, sha256)]
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


def collect_garbage(sessions: sessionmaker[Session], store: LocalBlobStore) -> dict[str, int]:
    """At start-up: remove blobs no row references (their rows' deletion was cut short) and the
    temporary files of uploads whose process died."""
    with store.collection_lock():
        with sessions() as session:
            referenced = set(session.scalars(union(*(select(table.sha256) for table in REFERENCING_TABLES))))
        orphans = [sha256 for sha256 in store.blob_hashes() if sha256 not in referenced]
        for sha256 in orphans:
            store.delete(sha256)
    removed = {"blobs": len(orphans), "temporary_files": store.remove_abandoned_writes()}
    if any(removed.values()):
        logger.info("start-up clean-up removed %s", removed)
    return removed


def stored_bytes(session: Session, owner: str | None = None, *, everyone: bool = False) -> int:
    """Bytes of the models, datasets and artifacts ``owner`` stored (all owners with ``everyone``);
    a blob shared by two rows counts twice: each owner pays for what they stored."""
    total = 0
    for table in REFERENCING_TABLES:
        query = select(func.coalesce(func.sum(table.size_bytes), 0))
        if not everyone:
            query = query.where(table.owner.is_(None) if owner is None else table.owner == owner)
        total += int(session.scalar(query) or 0)
    return total


def jobs_using(session: Session, table: type[Model] | type[Dataset], row_id: str) -> list[str]:
    """Ids of the queued and running jobs that read this model or dataset (directly, or through a
    plan whose artifact they measure)."""
    keys = ("model_id",) if table is Model else ("dataset_id", "calibration_dataset_id", "evaluation_dataset_id")
    plan_column = Plan.model_id if table is Model else Plan.calibration_dataset_id
    plans = set(session.scalars(select(Plan.id).where(plan_column == row_id)))
    active = session.scalars(select(Job).where(Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)))).all()
    return [
        job.id
        for job in active
        if any(job.params.get(key) == row_id for key in keys) or job.params.get("plan_id") in plans
    ]


def delete_upload(session: Session, row: Model | Dataset) -> list[str]:
    """Delete a model or dataset with the plans made from it (the database cascades them) and those
    plans' artifacts (which it would orphan); returns the blobs that may now be unused."""
    plan_column = Plan.model_id if isinstance(row, Model) else Plan.calibration_dataset_id
    plan_ids = list(session.scalars(select(Plan.id).where(plan_column == row.id)))
    artifact_ids = set(session.scalars(select(Plan.artifact_id).where(Plan.id.in_(plan_ids))))
    artifact_ids |= set(session.scalars(select(FrontierPoint.artifact_id).where(FrontierPoint.plan_id.in_(plan_ids))))
    artifacts = session.scalars(select(Artifact).where(Artifact.id.in_(artifact_ids - {None}))).all()
    hashes = [row.sha256, *(artifact.sha256 for artifact in artifacts)]
    session.delete(row)
    session.flush()  # the plans go first: they reference the artifacts
    for artifact in artifacts:
        session.delete(artifact)
    return hashes
