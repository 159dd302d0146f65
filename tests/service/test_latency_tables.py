"""Latency tables in the service: measured by a plan job whose search needs one, stored, reused by the
next plan of the model where it runs, measured again when the onnxruntime version (or device) differs,
and listed at GET /v1/models/{id}/latency-tables."""

from __future__ import annotations

import pytest
from sqlalchemy import update

from service.jobs.supervisor import _latency_table_key
from service.store.tables import LatencyTableRow
from tests.models import latency_mixed_data, latency_mixed_model, npz_bytes
from tests.service.helpers import assert_problem, sqlite_only, uploaded, wait_for

KEY = {
    "device_description": "test CPU (2 logical cores available)",
    "provider": "CPUExecutionProvider",
    "onnxruntime_version": "1.0.0",
    "batch_size": 1,
    "candidates": ["fp32", "w8a8"],
}


def test_the_supervisor_takes_well_formed_keys_only():
    assert _latency_table_key(KEY) == {**KEY, "candidates": "fp32,w8a8"}
    for bad in [
        None,
        [],
        {**KEY, "batch_size": True},
        {**KEY, "batch_size": 0},
        {**KEY, "provider": ""},
        {**KEY, "device_description": "x" * 301},
        {**KEY, "candidates": "fp32,w8a8"},
        {**KEY, "candidates": ["w8a8"] * 50},
        {k: v for k, v in KEY.items() if k != "onnxruntime_version"},
    ]:
        assert _latency_table_key(bad) is None, bad


def test_a_table_is_found_by_its_whole_key(app):
    db = app.state.db
    sha = "ab" * 32
    fields = _latency_table_key(KEY)
    row = LatencyTableRow(model_sha256=sha, table={"format": "mpq.latency_table/1"}, **fields)
    with db.sessions() as session, session.begin():
        session.add(row)
    assert db.find_latency_table(sha, **fields).id == row.id
    assert [r.id for r in db.latency_tables(sha)] == [row.id]
    for name, other in [
        ("onnxruntime_version", "1.0.1"),
        ("device_description", "another CPU"),
        ("provider", "CUDAExecutionProvider"),
        ("batch_size", 8),
        ("candidates", "fp32,w8a8,w4"),
    ]:
        assert db.find_latency_table(sha, **{**fields, name: other}) is None, name
    assert db.find_latency_table("cd" * 32, **fields) is None


def test_an_unknown_model_has_no_latency_tables(client):
    assert_problem(client.get("/v1/models/nope/latency-tables"), 404, "no model")


@pytest.mark.slow
@sqlite_only  # three plan jobs (about 2 min); the store's lookup runs on both backends above
def test_a_second_plan_reuses_the_table_and_another_onnxruntime_version_does_not(client, app):
    model_id, data_id = uploaded(
        client, latency_mixed_model().SerializeToString(), npz_bytes(**latency_mixed_data(count=8))
    )
    body = {
        "model_id": model_id,
        "calibration_dataset_id": data_id,
        "search": "bisection",
        "objective": "latency",
        "candidates": ["fp32", "w8a8"],
        "constraints": {"max_drop": 50.0},
        "method": "hawq_v2",
        "options": {"trace_max_probes": 4, "trace_min_probes": 2},
    }

    def planned() -> dict:
        submitted = client.post("/v1/plans", json=body)
        assert submitted.status_code == 202, submitted.text
        job = wait_for(client, submitted.json()["id"], timeout=300)
        assert job["status"] == "succeeded", (job["error"], job["log_tail"][-3000:])
        return client.get(f"/v1/plans/{job['result']['plan_id']}").json()

    first = planned()
    assert first["result"]["run"]["search"]["latency_table_reused"] is False
    tables = client.get(f"/v1/models/{model_id}/latency-tables").json()
    assert len(tables) == 1
    stored = tables[0]
    assert stored["candidates"] == "fp32,w8a8" and stored["table"] == first["result"]["run"]["search"]["latency_table"]
    assert set(stored["table"]["layers"]) == {"big.weight", "small0.weight", "small1.weight"}

    second = planned()
    assert second["result"]["run"]["search"]["latency_table_reused"] is True
    assert second["result"]["run"]["search"]["latency_table"] == stored["table"]
    assert len(client.get(f"/v1/models/{model_id}/latency-tables").json()) == 1

    with app.state.db.sessions() as session, session.begin():  # as if measured with another onnxruntime
        session.execute(update(LatencyTableRow).values(onnxruntime_version="0.0.0"))
    third = planned()
    assert third["result"]["run"]["search"]["latency_table_reused"] is False
    listed = client.get(f"/v1/models/{model_id}/latency-tables").json()
    assert [table["onnxruntime_version"] != "0.0.0" for table in listed] == [True, False]  # newest first


def test_the_model_page_shows_its_latency_tables(client, app):
    model_id, _ = uploaded(client, latency_mixed_model().SerializeToString(), npz_bytes(**latency_mixed_data(count=2)))
    sha = client.get(f"/v1/models/{model_id}").json()["sha256"]
    table = {
        "float_p50_ms": 0.25,
        "layers": {"big.weight": {"w8a8": {"ms": -0.1, "ratio": -0.4, "spread": 0.02}}, "small0.weight": {}},
    }
    with app.state.db.sessions() as session, session.begin():
        session.add(LatencyTableRow(model_sha256=sha, table=table, **_latency_table_key(KEY)))
    page = client.get(f"/models/{model_id}")
    assert page.status_code == 200
    assert "onnxruntime 1.0.0" in page.text and "-40.0 % ± 2.0" in page.text and "0.25 ms" in page.text
    listed = client.get(f"/v1/models/{model_id}/latency-tables").json()
    assert [row["table"] for row in listed] == [table]
