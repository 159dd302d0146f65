"""`mpq sensitivity` / `mpq plan` with --server: real CLI processes against a live server with
auth on. Same JSON and exit codes as the local run."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from service.api.auth import create_token
from tests.models import tiny_onnx_model
from tests.service.helpers import enable_auth

# The CLI's logic does not depend on the database; the API routes it calls run on both backends
# in test_plans.py and test_jobs.py. Each CLI process costs seconds of imports, so SQLite only.
pytestmark = [pytest.mark.parametrize("backend_settings", ["sqlite"], indirect=True), pytest.mark.slow]


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    model = tmp_path / "tiny.onnx"
    model.write_bytes(tiny_onnx_model().SerializeToString())
    data = tmp_path / "calib.npz"
    np.savez(data, x=rng.standard_normal((32, 8)).astype(np.float32), labels=rng.integers(0, 3, 32))
    return model, data


@pytest.fixture
def token(app):
    enable_auth(app)
    return create_token(app.state.db, "ci")[1]


def mpq(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **({"MPQ_TOKEN": token} if token else {})}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_remote_plan_round_trip(app, live_server, files, token, tmp_path, client):
    model, data = files
    out = tmp_path / "q.onnx"
    args = [
        "plan",
        str(model),
        "--data",
        str(data),
        "--server",
        live_server,
        "--candidates",
        "fp32,w8a8,w4",
        "--max-bops",
        "30000",
        "--method",
        "hawq_v2",
        "--max-probes",
        "16",
        "--exclude",
        "fc2",
        "--out",
        str(out),
        "--json",
    ]
    result = mpq(*args, token=token)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert set(document["plan"]["layers"]) == {"fc1.weight", "fc2.weight"}
    # --exclude (the node name fc2) reaches the server's request and every point it searched and stored
    assert document["request"]["exclude"] == ["fc2"]
    assert all(point["layers"]["fc2.weight"] == "fp32" for point in [document["plan"], *document["frontier"]])
    assert [(e["layer"], e["reason"]) for e in document["excluded"]] == [("fc2.weight", "exclude pattern 'fc2'")]
    assert document["layer_nodes"]["fc1.weight"] == {"node_name": "fc1", "scope": ""}
    stored = client.get(f"/v1/plans/{document['plan_id']}", headers={"authorization": f"Bearer {token}"}).json()
    assert stored["request"]["exclude"] == ["fc2"] and stored["result"]["excluded"] == document["excluded"]
    # the document is the stored result's, through the function the local command uses
    assert document["frontier"] == stored["result"]["frontier"] and document["plan"] == stored["result"]["plan"]
    assert document["evaluations"] == stored["result"]["run"]["evaluations"]
    assert document["meets_constraints"] is True and document["frontier"]
    assert set(document["activation_terms"]) == {"fc1.weight", "fc2.weight"}  # stored with the plan
    assert hashlib.sha256(out.read_bytes()).hexdigest() == document["artifact_sha256"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.zeros((2, 8), np.float32)})[0].shape == (2, 3)

    again = mpq(*args, token=token)  # the files are already on the server: uploads are skipped
    assert again.returncode == 0, again.stderr
    # the request's own Idempotency-Key: the re-run attaches to the first run's job and plan
    assert json.loads(again.stdout)["plan_id"] == document["plan_id"]
    headers = {"authorization": f"Bearer {token}"}
    assert client.get("/v1/models", headers=headers).json()["total"] == 1
    assert client.get("/v1/datasets", headers=headers).json()["total"] == 1


def test_remote_exit_codes(app, live_server, files, token):
    model, data = files
    base = ["plan", str(model), "--data", str(data), "--server", live_server]
    assert mpq(*base, "--max-size-mb", "1", token="mpq_wrong").returncode == 2  # 401
    bad = mpq(*base, "--candidates", "w3a3", "--max-size-mb", "1", token=token)
    assert bad.returncode == 2 and "w3a3" in bad.stderr
    impossible = mpq(*base, "--max-size-mb", "0.00001", token=token)
    assert impossible.returncode == 3, impossible.stderr
    # with --json every exit code prints one document: `jq -e` in a pipeline reads why
    refused = json.loads(mpq(*base, "--max-size-mb", "0.00001", "--json", token=token).stdout)
    assert refused["exit_code"] == 3 and refused["problem"] == "infeasible" and "max_size_bytes" in refused["error"]
    unknown = json.loads(mpq(*base, "--candidates", "w3a3", "--max-size-mb", "1", "--json", token=token).stdout)
    assert unknown["exit_code"] == 2 and "w3a3" in unknown["error"]


def test_remote_sensitivity_matches_local(app, live_server, files, token):
    model, data = files
    args = ["sensitivity", str(model), "--data", str(data), "--method", "hawq_v2", "--max-probes", "16", "--json"]
    local = mpq(*args)
    remote = mpq(*args, "--server", live_server, token=token)
    assert local.returncode == remote.returncode == 0, (local.stderr, remote.stderr)
    local_layers = json.loads(local.stdout)["layers"]
    remote_layers = json.loads(remote.stdout)["layers"]
    assert [layer["name"] for layer in remote_layers] == [layer["name"] for layer in local_layers]
    for ours, theirs in zip(local_layers, remote_layers):
        assert theirs["trace"] == pytest.approx(ours["trace"], rel=1e-6)
        assert theirs["probes"] == ours["probes"]


def test_remote_measured_sensitivity_takes_its_candidates_and_quantity(app, live_server, files, token):
    model, data = files
    args = ["sensitivity", str(model), "--data", str(data), "--method", "measured", "--json"]
    args += ["--candidates", "w8,fp16", "--quantity", "loss", "--device", "cpu"]
    local, remote = mpq(*args, "--no-cache"), mpq(*args, "--server", live_server, token=token)
    assert local.returncode == remote.returncode == 0, (local.stderr, remote.stderr)
    ours, theirs = json.loads(local.stdout)["measured"], json.loads(remote.stdout)["measured"]
    assert theirs["candidates"] == ["w8", "fp16"] and theirs["quantity"] == "loss"
    assert theirs["labels"] == ours["labels"]
    assert theirs["loss_change"] == pytest.approx(ours["loss_change"], rel=1e-6, abs=1e-12)


def test_remote_runs_take_sample_axes(app, live_server, token, tmp_path, client):
    """--sample-axis reaches the server from mpq sensitivity and mpq plan: a model whose declared shapes
    do not say where the samples lie (tests/service/test_sample_axes.py), the same traces as locally."""
    import onnx

    from tests.models import loose_data, loosely_declared_stateful_model

    model, data, out = tmp_path / "state.onnx", tmp_path / "state.npz", tmp_path / "q.onnx"
    onnx.save(loosely_declared_stateful_model(), model)
    np.savez(data, **loose_data(24))
    axes = ["--sample-axis", "state=1", "--sample-axis", "sr=none"]
    args = [
        "sensitivity",
        str(model),
        "--data",
        str(data),
        "--method",
        "hawq_v2",
        "--max-probes",
        "4",
        "--device",
        "cpu",
        "--json",
        *axes,
    ]
    local, remote = mpq(*args, "--no-cache"), mpq(*args, "--server", live_server, token=token)
    assert local.returncode == remote.returncode == 0, (local.stderr, remote.stderr)
    local_layers, remote_layers = json.loads(local.stdout)["layers"], json.loads(remote.stdout)["layers"]
    assert (
        [layer["name"] for layer in remote_layers]
        == [layer["name"] for layer in local_layers]
        == ["fc1.weight", "fc2.weight"]
    )
    for ours, theirs in zip(local_layers, remote_layers):
        assert theirs["trace"] == pytest.approx(ours["trace"], rel=1e-6)

    plan = mpq(
        "plan",
        str(model),
        "--data",
        str(data),
        "--candidates",
        "fp32,w8a8,w4",
        "--max-bops",
        "40000",
        "--method",
        "hawq_v2",
        "--max-probes",
        "4",
        "--out",
        str(out),
        "--json",
        *axes,
        "--server",
        live_server,
        token=token,
    )
    assert plan.returncode == 0, plan.stderr
    document = json.loads(plan.stdout)
    assert document["request"]["sample_axes"] == {"state": 1, "sr": None}
    assert document["plan"]["measured"]["num_samples"] == 24 and document["meets_constraints"] is True
    stored = client.get(f"/v1/plans/{document['plan_id']}", headers={"authorization": f"Bearer {token}"}).json()
    assert stored["request"]["sample_axes"] == {"state": 1, "sr": None}
    y, state = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, loose_data(5))
    assert y.shape == (5, 3) and state.shape == (2, 5, 4)
