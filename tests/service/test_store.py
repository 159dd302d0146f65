"""The content-addressed blob store: atomic, hashed, verified, bounded; the in-memory double keeps the same
contract."""

from __future__ import annotations

import hashlib
import io

import pytest

from service.store.blobs import BlobCorrupted, BlobStore, BlobTooLarge, BlobWriter, LocalBlobStore
from service.store.db import make_engine, session_factory
from service.store.memory import MemoryBlobStore
from service.store.sql_store import SqlStore
from service.store.storage import delete_if_unused, store_file
from service.store.tables import Base, Model


def test_write_commit_read(tmp_path):
    store = LocalBlobStore(tmp_path)
    writer = store.writer(max_bytes=1000)
    for part in (b"hello ", b"world"):
        writer.write(part)
    assert not store.exists(hashlib.sha256(b"hello world").hexdigest())  # invisible until committed
    sha = writer.commit()
    assert sha == hashlib.sha256(b"hello world").hexdigest()
    assert store.exists(sha) and store.size(sha) == 11
    assert b"".join(store.read(sha)) == b"hello world"
    assert b"".join(store.read(sha, 6, 9)) == b"wor"
    assert store.temp_count() == 0


def test_limit_and_abort_leave_nothing(tmp_path):
    store = LocalBlobStore(tmp_path)
    writer = store.writer(max_bytes=4)
    writer.write(b"1234")
    with pytest.raises(BlobTooLarge):
        writer.write(b"5")
    writer.abort()
    assert store.temp_count() == 0 and store.blob_count() == 0


def test_corruption_is_detected_on_read(tmp_path):
    store = LocalBlobStore(tmp_path)
    writer = store.writer(max_bytes=100)
    writer.write(b"precious bytes")
    sha = writer.commit()
    store.local_path(sha).write_bytes(b"precious bytez")
    with pytest.raises(BlobCorrupted):
        b"".join(store.read(sha))
    assert store.verify(sha) is False


def test_names_must_be_hashes(tmp_path):
    store = LocalBlobStore(tmp_path)
    with pytest.raises(ValueError, match="sha256"):
        store.exists("../../etc/passwd")


# ---------------------------------------------------------------- the BlobStore contract, on both stores


@pytest.fixture(params=["local", "memory"])
def any_store(request, tmp_path) -> BlobStore:
    return LocalBlobStore(tmp_path) if request.param == "local" else MemoryBlobStore()


def test_both_stores_keep_the_contract(any_store: BlobStore):
    writer: BlobWriter = any_store.writer(max_bytes=100)
    writer.write(b"hello ")
    writer.write(b"world")
    sha256 = hashlib.sha256(b"hello world").hexdigest()
    assert writer.finish() == sha256 and writer.size == 11
    assert writer.path.read_bytes() == b"hello world"  # readable before the commit
    assert not any_store.exists(sha256)  # and invisible until then
    assert writer.commit() == sha256
    assert any_store.exists(sha256) and any_store.size(sha256) == 11
    assert b"".join(any_store.read(sha256)) == b"hello world"
    assert b"".join(any_store.read(sha256, 6, 9)) == b"wor"
    assert any_store.local_path(sha256).read_bytes() == b"hello world"
    with any_store.reference_lock():
        pass
    with any_store.collection_lock():
        pass
    any_store.check()
    any_store.delete(sha256)
    assert not any_store.exists(sha256)
    with pytest.raises(ValueError, match="sha256"):
        any_store.exists("../../etc/passwd")


def test_both_stores_bound_writes(any_store: BlobStore):
    writer = any_store.writer(max_bytes=4)
    writer.write(b"1234")
    with pytest.raises(BlobTooLarge):
        writer.write(b"5")
    writer.abort()


def test_the_memory_store_detects_corruption():
    store = MemoryBlobStore()
    writer = store.writer(max_bytes=100)
    writer.write(b"precious bytes")
    sha256 = writer.commit()
    store.blobs[sha256] = b"precious bytez"
    with pytest.raises(BlobCorrupted):
        b"".join(store.read(sha256))


def test_unused_blobs_go_and_referenced_ones_stay(tmp_path):
    """storage.store_file and delete_if_unused against the in-memory store and a real SqlStore."""
    engine = make_engine(f"sqlite:///{tmp_path / 'mpq.db'}")
    Base.metadata.create_all(engine)
    db, store = SqlStore(session_factory(engine)), MemoryBlobStore()
    kept, dropped = (store_file(store, io.BytesIO(data)) for data in (b"model bytes", b"orphan bytes"))
    db.insert(Model(name="m", format="onnx", sha256=kept[0], size_bytes=kept[1]))
    assert delete_if_unused(db, store, kept[0], dropped[0]) == [dropped[0]]
    assert set(store.blobs) == {kept[0]}
    engine.dispose()
