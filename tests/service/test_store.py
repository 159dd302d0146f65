"""The content-addressed blob store: atomic, hashed, verified, bounded."""

from __future__ import annotations

import hashlib

import pytest

from service.store.blobs import BlobCorrupted, BlobTooLarge, LocalBlobStore


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
