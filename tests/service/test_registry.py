"""Models and datasets over HTTP, on SQLite and PostgreSQL, including every bad input."""

from __future__ import annotations

import hashlib
import io
import zipfile

import numpy as np
import onnx
import pytest

from tests.models import npz_bytes, tiny_onnx_model
from tests.service.helpers import assert_problem, enable_auth, snapshot, upload

# ------------------------------------------------------------------ happy paths


@pytest.mark.slow
def test_model_round_trip(client, app, tiny_model_bytes):
    response = upload(client, "/v1/models", tiny_model_bytes, name="tiny")
    assert response.status_code == 201, response.text
    model = response.json()
    assert model["format"] == "onnx" and model["opset"] == 17 and model["name"] == "tiny"
    assert model["sha256"] == hashlib.sha256(tiny_model_bytes).hexdigest()
    assert [(layer["name"], layer["op_type"], layer["num_params"]) for layer in model["layers"]] == [
        ("fc1.weight", "Gemm", 48),
        ("fc2.weight", "MatMul", 18),
    ]
    assert [(layer["node_name"], layer["scope"]) for layer in model["layers"]] == [("fc1", ""), ("fc2", "")]
    assert model["details"]["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 8]}]

    assert client.get(f"/v1/models/{model['id']}").json() == model
    listing = client.get("/v1/models").json()
    assert listing["total"] == 1 and listing["items"][0]["id"] == model["id"]
    assert client.get("/v1/models", params={"sha256": model["sha256"]}).json()["total"] == 1
    assert client.get("/v1/models", params={"sha256": "0" * 64}).json()["total"] == 0

    download = client.get(f"/v1/models/{model['id']}/file")
    assert download.status_code == 200 and download.content == tiny_model_bytes
    assert download.headers["etag"] == f'"{model["sha256"]}"'
    assert "tiny.onnx" in download.headers["content-disposition"]
    partial = client.get(f"/v1/models/{model['id']}/file", headers={"range": "bytes=10-19"})
    assert partial.status_code == 206 and partial.content == tiny_model_bytes[10:20]
    cached = client.get(f"/v1/models/{model['id']}/file", headers={"if-none-match": f'"{model["sha256"]}"'})
    assert cached.status_code == 304

    assert client.delete(f"/v1/models/{model['id']}").status_code == 204
    assert client.get(f"/v1/models/{model['id']}").status_code == 404
    assert snapshot(app)["blobs"] == 0


@pytest.mark.slow
def test_shared_blob_survives_deleting_one_of_two_rows(client, app, tiny_model_bytes):
    first = upload(client, "/v1/models", tiny_model_bytes).json()
    second = upload(client, "/v1/models", tiny_model_bytes).json()
    assert first["sha256"] == second["sha256"] and first["id"] != second["id"]
    client.delete(f"/v1/models/{first['id']}")
    assert client.get(f"/v1/models/{second['id']}/file").content == tiny_model_bytes
    client.delete(f"/v1/models/{second['id']}")
    assert snapshot(app)["blobs"] == 0


def test_dataset_round_trip(client, tiny_dataset_bytes):
    response = upload(client, "/v1/datasets", tiny_dataset_bytes, name="calib")
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["num_samples"] == 16 and dataset["has_labels"] is True
    assert dataset["arrays"]["x"] == {"shape": [16, 8], "dtype": "float32"}
    assert client.get(f"/v1/datasets/{dataset['id']}/file").content == tiny_dataset_bytes
    assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204


@pytest.mark.slow
def test_onnx_archive_with_external_data_inside_the_upload(client, tmp_path):
    model = tiny_onnx_model()
    onnx.save_model(
        model,
        tmp_path / "model.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(tmp_path / "model.onnx", "model/model.onnx")
        zf.write(tmp_path / "weights.bin", "model/weights.bin")
    response = upload(client, "/v1/models", archive.getvalue())
    assert response.status_code == 201, response.text
    assert response.json()["format"] == "onnx_archive"
    assert len(response.json()["layers"]) == 2


def test_lists_of_models_count_their_layers_and_one_model_has_them(client):
    model_id = upload(client, "/v1/models", tiny_onnx_model().SerializeToString()).json()["id"]
    listed = client.get("/v1/models").json()["items"][0]
    one = client.get(f"/v1/models/{model_id}").json()
    assert "layers" not in listed
    assert listed["layer_count"] == one["layer_count"] == len(one["layers"]) > 0


@pytest.mark.slow
def test_torch_export_archive_is_listed_not_loaded(client, app, tmp_path):
    import torch

    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(module, (torch.randn(1, 4),)), path)
    response = upload(client, "/v1/models", path.read_bytes())
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["format"] == "torch_export"
    assert [layer["name"] for layer in body["layers"]] == ["0.weight", "2.weight"]
    # described as fully as an ONNX upload, from the checked program JSON: ops, FX nodes, inputs
    assert [(layer["op_type"], layer["node_name"]) for layer in body["layers"]] == [
        ("Gemm", "linear"),
        ("Gemm", "linear_1"),
    ]
    assert body["details"]["inputs"] == [{"name": "input", "dtype": "float32", "shape": [1, 4]}]
    assert body["details"]["outputs"][0]["shape"] == [1, 2] and body["details"]["node_count"] == 3
    page = client.get(f"/models/{body['id']}").text
    assert "<code>input</code> [1, 4] float32" in page and "Gemm" in page and "linear_1" in page

    app.state.settings = app.state.settings.model_copy(update={"allow_torch_uploads": False})
    app.state.inspector.limits = app.state.inspector.limits.__class__(
        **{**app.state.inspector.limits.__dict__, "allow_torch": False}
    )
    try:
        before = snapshot(app)
        assert_problem(upload(client, "/v1/models", path.read_bytes()), 422, "disabled")
        assert snapshot(app) == before
    finally:
        app.state.inspector.limits = app.state.inspector.limits.__class__(
            **{**app.state.inspector.limits.__dict__, "allow_torch": True}
        )


# ------------------------------------------------------------------ bad input leaves nothing behind


def _escaping_archive(tmp_path) -> bytes:
    model = tiny_onnx_model()
    for init in model.graph.initializer:
        if init.name == "fc1.weight":
            init.data_location = onnx.TensorProto.EXTERNAL
            del init.external_data[:]
            entry = init.external_data.add()
            entry.key, entry.value = "location", "../../etc/passwd"
            init.ClearField("raw_data")
            init.ClearField("float_data")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("model.onnx", model.SerializeToString())
    return archive.getvalue()


def _zip_slip() -> bytes:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../evil.onnx", tiny_onnx_model().SerializeToString())
    return archive.getvalue()


def _pickled_npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.array([{"a": 1}, None], dtype=object))
    return buffer.getvalue()


def _single_file_with_external_data() -> bytes:
    model = tiny_onnx_model()
    init = model.graph.initializer[0]
    init.data_location = onnx.TensorProto.EXTERNAL
    entry = init.external_data.add()
    entry.key, entry.value = "location", "weights.bin"
    init.ClearField("raw_data")
    init.ClearField("float_data")
    return model.SerializeToString()


BAD_MODELS = {
    "random bytes": (lambda tmp: np.random.default_rng(1).bytes(4096), "not a model"),
    "truncated onnx": (lambda tmp: tiny_onnx_model().SerializeToString()[:150], ""),
    "external data escaping the archive": (_escaping_archive, "outside the upload"),
    "zip slip member": (lambda tmp: _zip_slip(), "outside the archive"),
    "external data missing from a single file": (lambda tmp: _single_file_with_external_data(), "external data"),
    "dataset uploaded as a model": (lambda tmp: npz_bytes(x=np.zeros((2, 2))), "one .onnx"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_MODELS)
def test_bad_models_are_rejected_and_leave_nothing(client, app, tmp_path, case):
    make, words = BAD_MODELS[case]
    before = snapshot(app)
    assert_problem(upload(client, "/v1/models", make(tmp_path)), 422, words)
    assert snapshot(app) == before


BAD_DATASETS = {
    "pickled object array": (_pickled_npz(), "pickle"),
    "not an npz": (b"hello world", ".npz"),
    # arrays whose first dims differ are accepted (per-input sample axes): tests/service/test_sample_axes.py
    "float labels": (npz_bytes(x=np.zeros((3, 2), np.float32), labels=np.zeros(3)), "labels"),
    "truncated npz": (npz_bytes(x=np.zeros((64, 64), np.float32))[:5000], "truncated"),
    "string array": (npz_bytes(x=np.array(["a", "b"])), "dtype"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_DATASETS)
def test_bad_datasets_are_rejected_and_leave_nothing(client, app, case):
    body, words = BAD_DATASETS[case]
    before = snapshot(app)
    assert_problem(upload(client, "/v1/datasets", body), 422, words)
    assert snapshot(app) == before


def test_empty_body(client, app):
    before = snapshot(app)
    assert_problem(upload(client, "/v1/models", b""), 422, "empty")
    assert snapshot(app) == before


def test_declared_oversize_is_refused_before_reading(client, app):
    limit = app.state.settings.max_upload_bytes
    before = snapshot(app)
    response = client.post(
        "/v1/models",
        content=b"x" * 10,
        headers={"content-length": str(limit + 1), "content-type": "application/octet-stream"},
    )
    assert_problem(response, 413, "limit")
    assert snapshot(app) == before


def test_streamed_oversize_is_cut_early(app, live_server):
    """A chunked upload without Content-Length: the server stops reading at the limit and answers 413."""
    import socket
    from urllib.parse import urlsplit

    limit = app.state.settings.max_upload_bytes
    chunk = b"\0" * 65536
    address = urlsplit(live_server)
    before = snapshot(app)
    sent = 0
    with socket.create_connection((address.hostname, address.port), timeout=10) as connection:
        connection.sendall(
            b"POST /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        connection.settimeout(0.5)
        try:
            while sent < 16 * limit:
                connection.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
        except OSError:
            pass  # the server closed the connection: the stream was cut
        connection.settimeout(10)
        reply = b""
        try:
            while b"\r\n\r\n" not in reply:
                data = connection.recv(65536)
                if not data:
                    break
                reply += data
        except OSError:
            pass
    assert sent < 16 * limit, "the server kept reading far past the limit"
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert snapshot(app) == before


def test_unknown_ids_are_404(client):
    for path in ("/v1/models/nope", "/v1/models/nope/file", "/v1/datasets/" + "f" * 32):
        assert_problem(client.get(path), 404, "no ")
    assert_problem(client.delete("/v1/models/nope"), 404, "no model")
    assert_problem(client.get("/v1/nothing-here"), 404, "no route")


def test_invalid_query_is_problem_json(client):
    assert_problem(client.get("/v1/models", params={"limit": -1}), 422, "limit")


# ------------------------------------------------------------------ auth


@pytest.mark.slow
def test_every_v1_route_requires_a_token_when_auth_is_on(client, app, tiny_model_bytes, monkeypatch):
    from service.api import auth
    from service.api.auth import create_token

    monkeypatch.setattr(auth, "TOKEN_CACHE_S", 0.0)  # see the revocation at once
    enable_auth(app)
    before = snapshot(app)
    paths = app.openapi()["paths"]
    v1_routes = [(method.upper(), path) for path, ops in paths.items() if path.startswith("/v1") for method in ops]
    assert len(v1_routes) >= 10
    for method, path in v1_routes:
        response = client.request(method, path.replace("{item_id}", "x"))
        assert_problem(response, 401, "token")
        assert response.headers["www-authenticate"].startswith("Bearer")
    wrong = upload(client, "/v1/models", tiny_model_bytes, authorization="Bearer mpq_wrong")
    assert_problem(wrong, 401, "unknown")
    assert snapshot(app) == before

    row, secret = create_token(app.state.db, "ci")
    ok = upload(client, "/v1/models", tiny_model_bytes, authorization=f"Bearer {secret}")
    assert ok.status_code == 201
    assert client.get("/healthz").status_code == 200  # health stays public

    with app.state.sessions() as session, session.begin():
        from service.store.tables import ApiToken, utcnow

        session.get(ApiToken, row.id).revoked_at = utcnow()
    assert_problem(client.get("/v1/models", headers={"authorization": f"Bearer {secret}"}), 401, "revoked")


def test_health(client):
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz").json()
    assert ready["checks"] == {"database": "ok", "store": "ok"}


def test_interrupted_upload_leaves_nothing(app, live_server):
    """The client sends half a body and hangs up: no row, no blob, no temporary file."""
    import socket
    import time
    from urllib.parse import urlsplit

    address = urlsplit(live_server)
    before = snapshot(app)
    with socket.create_connection((address.hostname, address.port), timeout=10) as connection:
        connection.sendall(
            b"POST /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: 1000000\r\n\r\n" + b"\0" * 300_000
        )
        deadline = time.monotonic() + 10
        while app.state.store.temp_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert app.state.store.temp_count() == 1, "the server should be writing the upload by now"
    deadline = time.monotonic() + 10
    while snapshot(app) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert snapshot(app) == before


def test_nul_bytes_are_a_clear_4xx_on_every_backend(client, app, tiny_model_bytes):
    """Found by schemathesis: PostgreSQL cannot store NUL in text; that must be a 4xx, not a 500."""
    before = snapshot(app)
    assert_problem(upload(client, "/v1/models", tiny_model_bytes, name="bad\x00name"), 422, "control characters")
    assert snapshot(app) == before
    assert_problem(
        client.post(
            "/v1/plans", json={"model_id": "\x00", "calibration_dataset_id": "x", "constraints": {"max_size_bytes": 1}}
        ),
        422,
        "no model",
    )
    assert_problem(client.get("/v1/jobs", params={"type": "a\x00b"}), 422, "type")
    assert_problem(client.get("/v1/models/%00"), 404, "no model")


@pytest.mark.slow
def test_a_revoked_token_stops_working_within_the_cache_window(client, app, monkeypatch):
    from service.api import auth
    from service.store.tables import ApiToken, utcnow

    monkeypatch.setattr(auth, "TOKEN_CACHE_S", 0.5)
    enable_auth(app)
    row, secret = auth.create_token(app.state.db, "short-lived")
    headers = {"authorization": f"Bearer {secret}"}
    assert client.get("/v1/models", headers=headers).status_code == 200
    with app.state.sessions() as session, session.begin():
        session.get(ApiToken, row.id).revoked_at = utcnow()
    assert client.get("/v1/models", headers=headers).status_code == 200  # still cached
    import time

    time.sleep(0.6)
    assert_problem(client.get("/v1/models", headers=headers), 401, "revoked")
