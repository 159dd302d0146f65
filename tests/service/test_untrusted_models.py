"""Hostile models through the service: refused by name, nothing they carry ever runs, and jobs end
within their limits."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from service.store.tables import Job, Model
from tests.models import npz_bytes
from tests.pt2_archives import (
    pickled_sample_inputs,
    pickled_weight,
    save_small_model,
)
from tests.service.helpers import assert_problem, slow_inputs, snapshot, sqlite_only, upload, uploaded, wait_for

pytestmark = pytest.mark.slow  # each test runs a sandboxed job

HOSTILE = {
    "pickled_weight": (pickled_weight, "model_weights_config.json (weight 'fc.weight')"),
    "pickled_sample_inputs": (pickled_sample_inputs, "data/sample_inputs/model.pt"),
}


@pytest.fixture(scope="module")
def benign_pt2(tmp_path_factory) -> Path:
    return save_small_model(tmp_path_factory.mktemp("pt2") / "small.pt2")


@pytest.fixture
def marker_dir() -> Iterator[Path]:
    """Where a payload would write its marker: world-writable, so that a sandboxed job running as
    another user could write it too (the test must not pass merely because the sandbox lacks rights)."""
    with tempfile.TemporaryDirectory(prefix="mpq-marker-") as directory:
        Path(directory).chmod(0o777)
        yield Path(directory)


def hostile(name: str, benign: Path, directory: Path) -> tuple[bytes, Path]:
    build, _entry = HOSTILE[name]
    archive, marker = directory / f"{name}.pt2", directory / f"{name}-MARKER"
    build(benign, archive, marker)
    return archive.read_bytes(), marker


@sqlite_only
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_pt2_is_refused_at_upload_naming_the_entry(name, client, app, benign_pt2, marker_dir):
    archive, marker = hostile(name, benign_pt2, marker_dir)
    before = snapshot(app)
    response = upload(client, "/v1/models", archive)
    assert response.status_code == 422, response.text
    assert HOSTILE[name][1] in response.json()["detail"]
    assert snapshot(app) == before
    assert not marker.exists()


@sqlite_only
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_pt2_stored_earlier_is_refused_at_job_submission(name, client, app, benign_pt2, marker_dir):
    """An archive that reached the store before the upload checks existed: submitting a job refuses it by name."""
    model_id, dataset_id, marker = _stored_earlier(name, client, app, benign_pt2, marker_dir)
    before = snapshot(app)
    refused = client.post("/v1/sensitivity", json={"model_id": model_id, "dataset_id": dataset_id})
    assert_problem(refused, 422, HOSTILE[name][1])
    assert snapshot(app) == before
    assert not marker.exists()


@sqlite_only
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_pt2_queued_earlier_is_refused_by_its_job(name, client, app, benign_pt2, marker_dir):
    """And a job queued before the checks existed: its sandboxed process refuses the archive by name."""
    model_id, dataset_id, marker = _stored_earlier(name, client, app, benign_pt2, marker_dir)
    job = Job(
        type="sensitivity", params={"model_id": model_id, "dataset_id": dataset_id, "method": "hawq_v2", "options": {}}
    )
    with app.state.sessions() as session, session.begin():
        session.add(job)
    app.state.executor.submit(job.id)
    final = wait_for(client, job.id)
    assert final["status"] == "failed" and final["result"]["error_code"] == "bad_input", final
    assert HOSTILE[name][1] in final["error"]
    assert "sandbox: user" in final["log_tail"]
    assert not marker.exists()


@sqlite_only
def test_a_benign_pt2_runs_in_the_sandbox(client, benign_pt2):
    ids = np.random.default_rng(0).integers(0, 12, (16, 5))
    model_id, dataset_id = uploaded(client, benign_pt2.read_bytes(), npz_bytes(ids=ids))
    job = client.post(
        "/v1/sensitivity",
        json={"model_id": model_id, "dataset_id": dataset_id, "method": "hawq_v2", "options": {"max_probes": 16}},
    ).json()
    final = wait_for(client, job["id"])
    assert final["status"] == "succeeded", (final["error"], final["log_tail"])
    result = client.get(f"/v1/sensitivity/{final['result']['sensitivity_result_id']}").json()["result"]
    assert {trace["name"] for trace in result["traces"]} == {"embedding.weight", "conv.weight", "fc.weight"}


@sqlite_only
def test_a_job_past_its_time_limit_fails_and_frees_its_slot(client, app, tiny_model_bytes, tiny_dataset_bytes):
    settings = app.state.executor.settings
    app.state.executor.settings = settings.model_copy(update={"job_time_limit_s": 3.0})
    try:
        model_id, dataset_id = slow_inputs(client)
        slow = client.post(
            "/v1/sensitivity",
            json={
                "model_id": model_id,
                "dataset_id": dataset_id,
                "method": "hawq_v2",
                "options": {"tolerance": 1e-9, "min_probes": 1000, "max_probes": 1000},
            },
        ).json()
        final = wait_for(client, slow["id"], timeout=60)
    finally:
        app.state.executor.settings = settings
    assert final["status"] == "failed" and final["error"].startswith("time limit"), final
    assert final["result"]["error_code"] == "time_limit"
    tiny_model, tiny_data = uploaded(client, tiny_model_bytes, tiny_dataset_bytes)
    quick = client.post("/v1/sensitivity", json={"model_id": tiny_model, "dataset_id": tiny_data}).json()
    done = wait_for(client, quick["id"], timeout=60)
    assert done["status"] == "succeeded", (done["error"], done["log_tail"])


def _stored_earlier(name: str, client, app, benign_pt2, marker_dir):
    """A hostile archive stored without today's checks, a dataset for it, and the payload's marker."""
    archive, marker = hostile(name, benign_pt2, marker_dir)
    dataset = upload(client, "/v1/datasets", npz_bytes(ids=np.random.default_rng(0).integers(0, 12, (8, 5))))
    return _store_without_checks(app, archive), dataset.json()["id"], marker


def _store_without_checks(app, data: bytes) -> str:
    writer = app.state.store.writer(len(data))
    writer.write(data)
    sha256 = writer.commit()
    row = Model(
        name="stored-earlier.pt2", format="torch_export", sha256=sha256, size_bytes=len(data), details={}, layers=[]
    )
    with app.state.sessions() as session, session.begin():
        session.add(row)
    return row.id
