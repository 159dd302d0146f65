"""Storage: deletes that race uploads lose nothing, deletes refuse rows that jobs use and take what was
derived from them, a killed server's leftovers are cleaned at start-up, quotas, and upload slots."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from service.api.auth import create_token
from service.api.transfer import UploadSlots
from service.store.storage import delete_if_unused, store_file
from service.store.tables import Artifact, Model
from tests.models import npz_bytes, tiny_onnx_model
from tests.service.helpers import (
    assert_problem,
    enable_auth,
    free_port,
    slow_inputs,
    snapshot,
    upload,
    uploaded,
    wait_for,
)

pytestmark = pytest.mark.slow  # each test runs jobs, real servers or concurrent uploads

# ---------------------------------------------------------------- deletes racing uploads


def test_a_delete_waits_for_the_row_of_an_upload_of_the_same_bytes(app, tmp_path):
    """The interleaving that lost files: the upload's rename lands, the delete finds no row and unlinks,
    then the upload's row is committed. The reference lock makes the delete wait for that row."""
    store, sessions = app.state.store, app.state.sessions
    source = tmp_path / "model.onnx"
    source.write_bytes(tiny_onnx_model().SerializeToString())
    committed, deleted = threading.Event(), threading.Event()

    def delete() -> None:
        committed.wait(10)
        delete_if_unused(app.state.db, store, sha256_box[0])
        deleted.set()

    sha256_box: list[str] = []
    deleter = threading.Thread(target=delete)
    deleter.start()
    with store.reference_lock(), source.open("rb") as file:
        sha256, size = store_file(store, file)
        sha256_box.append(sha256)
        committed.set()
        assert not deleted.wait(0.5)  # the delete is blocked until the row exists
        with sessions() as session, session.begin():
            session.add(Model(name="again", format="onnx", sha256=sha256, size_bytes=size))
    deleter.join(10)
    assert deleted.is_set() and store.exists(sha256)


def test_deleting_while_the_same_bytes_are_uploaded_again_never_loses_the_file(app, live_server):
    """The review's race over HTTP (7 of 150 tries lost the file): upload, then delete it while
    uploading the same bytes again; the new model must always download. (15 tries: 1 - (143/150)^15 =
    51% to catch the old race here; the test above forces its interleaving every time.)"""
    body = tiny_onnx_model().SerializeToString()
    with httpx.Client(base_url=live_server, timeout=30) as client, ThreadPoolExecutor(2) as pool:
        for _ in range(15):
            first = upload(client, "/v1/models", body).json()["id"]
            deleting = pool.submit(client.delete, f"/v1/models/{first}")
            again = pool.submit(upload, client, "/v1/models", body)
            assert deleting.result().status_code == 204
            second = again.result()
            assert second.status_code == 201, second.text
            download = client.get(f"/v1/models/{second.json()['id']}/file")
            assert download.status_code == 200 and download.content == body
            client.delete(f"/v1/models/{second.json()['id']}")


# ---------------------------------------------------------------- deletes and jobs


def test_a_model_or_dataset_in_use_by_a_job_is_not_deleted(client, app):
    model_id, dataset_id = slow_inputs(client)
    job = client.post(
        "/v1/sensitivity",
        json={
            "model_id": model_id,
            "dataset_id": dataset_id,
            "method": "hawq_v2",
            "options": {"tolerance": 1e-9, "min_probes": 500, "max_probes": 500},
        },
    )
    job_id = job.json()["id"]
    wait_for(client, job_id, statuses=("running",), timeout=60)
    for route in (f"/v1/models/{model_id}", f"/v1/datasets/{dataset_id}"):
        refused = client.delete(route)
        assert_problem(refused, 409, "cancel")
        assert refused.json()["jobs"] == [job_id]
    client.post(f"/v1/jobs/{job_id}/cancel")
    assert wait_for(client, job_id, timeout=60)["status"] == "cancelled"
    assert client.delete(f"/v1/models/{model_id}").status_code == 204
    assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 204
    assert app.state.store.blob_count() == 0


def test_deleting_a_model_takes_its_plans_and_their_artifacts(client, app):
    rng = np.random.default_rng(0)
    data = npz_bytes(x=rng.standard_normal((32, 8)).astype(np.float32), labels=rng.integers(0, 3, 32))
    model_id, dataset_id = uploaded(client, tiny_onnx_model().SerializeToString(), data)
    job = client.post(
        "/v1/plans",
        json={
            "model_id": model_id,
            "calibration_dataset_id": dataset_id,
            "candidates": ["fp32", "w8a8"],
            "constraints": {"max_size_bytes": 10**6},
            "method": "hawq_v2",
            "options": {"trace_max_probes": 16},
        },
    ).json()
    done = wait_for(client, job["id"], timeout=180)
    assert done["status"] == "succeeded", (done["error"], done["log_tail"])
    with app.state.sessions() as session:
        assert session.query(Artifact).count() == 1
    assert app.state.store.blob_count() == 3  # model, dataset, artifact
    assert client.delete(f"/v1/models/{model_id}").status_code == 204
    assert client.get(f"/v1/plans/{done['result']['plan_id']}").status_code == 404
    with app.state.sessions() as session:
        assert session.query(Artifact).count() == 0
    assert app.state.store.blob_count() == 1  # the dataset's


# ---------------------------------------------------------------- what a killed server leaves


def test_a_killed_server_leaves_nothing_after_its_restart(own_postgres_url, tmp_path):
    """kill -9 mid-upload: the inspectors die with the server, and the next start removes the upload's
    temporary file and any blob no row references."""
    store = tmp_path / "store"
    env = {**os.environ, "MPQ_DATABASE_URL": own_postgres_url, "MPQ_ARTIFACT_DIR": str(store)}
    subprocess.run([sys.executable, "-m", "service.cli", "db", "upgrade"], env=env, check=True, capture_output=True)
    port = free_port()
    server = _serve(env, port, tmp_path / "first.log")
    try:
        _wait_ready(port)
        with socket.create_connection(("127.0.0.1", port)) as stalled:
            stalled.sendall(
                b"POST /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000\r\n\r\n" + b"\0" * 1000
            )
            _until(lambda: list((store / "tmp").glob("upload-*")), "the upload never began")
            inspectors = _children(server.pid)
            assert inspectors, "the inspector's spare processes should be running"
            orphan = store / "blobs" / "ab" / ("ab" * 32)
            orphan.parent.mkdir(parents=True, exist_ok=True)
            orphan.write_bytes(b"no row references this blob")
            server.send_signal(signal.SIGKILL)
            server.wait(10)
        _until(lambda: not any(_alive(pid) for pid in inspectors), "inspectors outlived their server")
        assert list((store / "tmp").glob("upload-*")) and orphan.exists()
        server = _serve(env, port, tmp_path / "second.log")
        _wait_ready(port)
        assert not list((store / "tmp").glob("upload-*"))
        assert not orphan.exists()
    finally:
        server.kill()
        server.wait(10)


def _serve(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def _wait_ready(port: int) -> None:
    def ready() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
        except httpx.TransportError:
            return False

    _until(ready, "the server did not start", timeout=60)


def _until(condition, message: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.1)


def _children(pid: int) -> list[int]:
    import psutil

    return [child.pid for child in psutil.Process(pid).children(recursive=True)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------- quotas and upload slots


def test_quotas_per_token_and_in_total(client, app):
    model = tiny_onnx_model().SerializeToString()
    size = len(model)
    enable_auth(app)
    _, first = create_token(app.state.db, "first")
    _, second = create_token(app.state.db, "second")
    app.state.settings = app.state.settings.model_copy(update={"quota_bytes_per_owner": 2 * size + 10})
    as_first, as_second = {"Authorization": f"Bearer {first}"}, {"Authorization": f"Bearer {second}"}
    assert upload(client, "/v1/models", model, **as_first).status_code == 201
    assert upload(client, "/v1/models", model, **as_first).status_code == 201
    before = snapshot(app)
    assert_problem(upload(client, "/v1/models", model, **as_first), 413, "quota")
    assert snapshot(app) == before
    assert upload(client, "/v1/models", model, **as_second).status_code == 201  # another token's own quota
    app.state.settings = app.state.settings.model_copy(update={"quota_bytes_total": 3 * size + 10})
    assert_problem(upload(client, "/v1/models", model, **as_second), 507, "total quota")


@pytest.fixture
def tight_uploads(app):
    """Two uploads per client, three in all, and a one-second idle timeout."""
    original = app.state.uploads
    app.state.uploads = UploadSlots(per_client=2, total=3)
    app.state.settings = app.state.settings.model_copy(update={"upload_idle_timeout_s": 1.0})
    yield
    app.state.uploads = original


def test_a_client_gets_its_share_of_upload_slots_and_stalled_uploads_are_cut(app, live_server, tight_uploads):
    address = urlsplit(live_server)
    stalled = [_begin_upload(address) for _ in range(2)]
    try:
        with httpx.Client(base_url=live_server, timeout=10) as client:
            time.sleep(0.3)
            assert_problem(upload(client, "/v1/models", b"x"), 429, "MPQ_MAX_UPLOADS_PER_CLIENT")
            replies = [_read_reply(connection) for connection in stalled]  # cut after a second of silence
            assert all(reply.startswith(b"HTTP/1.1 408") for reply in replies), replies
            assert upload(client, "/v1/models", tiny_onnx_model().SerializeToString()).status_code == 201
    finally:
        for connection in stalled:
            connection.close()
    assert app.state.store.temp_count() == 0


def test_a_trickling_upload_is_cut_and_frees_its_slot(app, live_server, tight_uploads):
    """A byte every 0.3 s never trips the one-second idle timeout; the minimum pace cuts it."""
    app.state.settings = app.state.settings.model_copy(update={"upload_min_bytes_per_s": 1000.0})
    address = urlsplit(live_server)
    trickles = [_begin_upload(address) for _ in range(2)]
    started = time.monotonic()
    try:
        replies = [b"", b""]
        while not all(replies) and time.monotonic() - started < 10:
            time.sleep(0.3)
            for index, connection in enumerate(trickles):
                if not replies[index]:
                    connection.setblocking(False)
                    try:
                        replies[index] = connection.recv(4096)
                    except BlockingIOError:
                        connection.sendall(b"\0")
        assert all(reply.startswith(b"HTTP/1.1 408") for reply in replies), replies
        assert b"MPQ_UPLOAD_MIN_BYTES_PER_S" in replies[0]
        assert time.monotonic() - started < 4  # one window of a second, plus a chunk's wait
        with httpx.Client(base_url=live_server, timeout=10) as client:
            assert upload(client, "/v1/models", tiny_onnx_model().SerializeToString()).status_code == 201
    finally:
        for connection in trickles:
            connection.close()
    assert app.state.store.temp_count() == 0


def test_when_every_slot_is_taken_the_slowest_upload_makes_room(app, live_server):
    """Three stalled uploads hold every slot: an honest upload takes the slowest one's (503 for it)."""
    original = app.state.uploads
    app.state.uploads = UploadSlots(per_client=4, total=3, shed_after_s=0.5)
    address = urlsplit(live_server)
    stalled = [_begin_upload(address) for _ in range(3)]
    try:
        time.sleep(0.8)
        with httpx.Client(base_url=live_server, timeout=10) as client:
            assert upload(client, "/v1/models", tiny_onnx_model().SerializeToString()).status_code == 201
        replies = []
        for connection in stalled:
            connection.settimeout(0.5)
            try:
                replies.append(connection.recv(4096))
            except TimeoutError:
                replies.append(b"")
        shed = [reply for reply in replies if reply]
        assert len(shed) == 1 and shed[0].startswith(b"HTTP/1.1 503") and b"the slowest" in shed[0], replies
    finally:
        app.state.uploads = original
        for connection in stalled:
            connection.close()
    time.sleep(0.2)
    assert app.state.store.temp_count() == 0


def _begin_upload(address) -> socket.socket:
    connection = socket.create_connection((address.hostname, address.port), timeout=10)
    connection.sendall(b"POST /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n" + b"\0" * 10)
    return connection


def _read_reply(connection: socket.socket) -> bytes:
    return connection.recv(4096)
