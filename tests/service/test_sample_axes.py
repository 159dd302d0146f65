"""Per-input sample axes through the server (``sensitivity.samples``): a silero-vad-like model (x
[N, 6], a recurrent state [2, N, 4] with samples on axis 1, a rank-0 int64 sample rate shared by
every sample) uploads with its data, runs a sensitivity analysis and a plan whose artifact runs in
onnxruntime; a model whose declared shapes do not say where the samples lie takes ``sample_axes``;
wrong data is refused at submission in the words of the local run."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.models import loose_data, loosely_declared_stateful_model, npz_bytes, stateful_data, stateful_onnx_model
from tests.service.helpers import (
    assert_problem,
    call_mpq,
    post_json_text,
    snapshot,
    sqlite_only,
    upload,
    uploaded,
    wait_for,
)

pytestmark = pytest.mark.slow  # jobs, the job-request inspector and mpq processes, seconds each

SAMPLES = 24
AXES = {"state": 1, "sr": None}  # what the stateful model declares; the loosely declared one needs them given
SENSITIVITY_OPTIONS = {"max_probes": 4, "min_probes": 2, "seed": 1}
# BOPS per sample: 48 MACs (fc1) and 24 (fc2); 73,728 at fp32, at least 64 a MAC (w8a8): 4,608. A budget
# between them quantizes a layer; one below the fewest is refused at submission, counted on one sample
# (the state's axis 1 cut to 1: [2, 24, 4] taken as one sample would count fc2's MACs 12 times).
FEWEST_BOPS = 72 * 64
PLAN = {
    "candidates": ["fp32", "w8a8", "w4"],
    "constraints": {"max_bops": 40_000},
    "method": "hawq_v2",
    "options": {"trace_max_probes": 4, "trace_min_probes": 2, "batch_size": 8},
}


def finished(client, route: str, body: dict, timeout: float = 300) -> dict:
    submitted = client.post(route, json=body)
    assert submitted.status_code == 202, submitted.text
    job = wait_for(client, submitted.json()["id"], timeout=timeout)
    assert job["status"] == "succeeded", (job["error"], (job["log_tail"] or "")[-3000:])
    return job


def runs_in_onnxruntime(client, plan_id: str, data: dict[str, np.ndarray]) -> None:
    artifact = client.get(f"/v1/plans/{plan_id}/artifact")
    assert artifact.status_code == 200
    y, state = ort.InferenceSession(artifact.content, providers=["CPUExecutionProvider"]).run(None, data)
    assert y.shape == (5, 3) and state.shape == (2, 5, 4) and np.isfinite(y).all()


def test_a_stateful_model_runs_on_the_axes_its_shapes_declare(client):
    """No sample_axes given: the state's axis 1 and the shared rank-0 sr are read off the model."""
    model_id, dataset_id = uploaded(
        client, stateful_onnx_model().SerializeToString(), npz_bytes(**stateful_data(SAMPLES))
    )
    dataset = client.get(f"/v1/datasets/{dataset_id}").json()
    assert dataset["num_samples"] is None  # first dims 24, 2 and a scalar: counted against the model
    assert dataset["arrays"]["sr"] == {"shape": [], "dtype": "int64"}

    job = finished(
        client,
        "/v1/sensitivity",
        {"model_id": model_id, "dataset_id": dataset_id, "method": "hawq_v2", "options": SENSITIVITY_OPTIONS},
    )
    assert job["params"]["sample_axes"] == {}
    result = client.get(f"/v1/sensitivity/{job['result']['sensitivity_result_id']}").json()["result"]
    assert result["num_samples"] == SAMPLES
    assert [trace["name"] for trace in result["traces"]] == ["fc1.weight", "fc2.weight"]

    below = {**PLAN, "constraints": {"max_bops": FEWEST_BOPS - 1}}
    assert_problem(
        client.post("/v1/plans", json={"model_id": model_id, "calibration_dataset_id": dataset_id, **below}),
        422,
        f"fewest BOPS of any configuration of these candidates ({FEWEST_BOPS} at batch size 1)",
    )
    job = finished(client, "/v1/plans", {"model_id": model_id, "calibration_dataset_id": dataset_id, **PLAN})
    plan = client.get(f"/v1/plans/{job['result']['plan_id']}").json()
    assert plan["request"]["sample_axes"] == {} and plan["measured"]["num_samples"] == SAMPLES
    assert plan["predicted"]["meets_constraints"] and plan["predicted"]["bops"] <= 40_000
    assert set(plan["assignment"]) == {"fc1.weight", "fc2.weight"} and "w8a8" in plan["assignment"].values()
    runs_in_onnxruntime(client, plan["id"], stateful_data(5, seed=7))
    assert len(client.get(f"/v1/plans/{plan['id']}/latency").json()) == 1


@sqlite_only
def test_a_loosely_declared_model_takes_sample_axes(client, app):
    """The state declared [?, ?, ?] and sr [1]: the declared shapes put every input's samples on axis 0,
    which the data refutes (refused at submission); sample_axes put them right, key the stored
    sensitivity apart, reach the plan and the plan's latency measurements."""
    from planner.latency import measure_latency

    model_id, dataset_id = uploaded(
        client, loosely_declared_stateful_model().SerializeToString(), npz_bytes(**loose_data(SAMPLES))
    )
    before = snapshot(app)
    refused = client.post("/v1/plans", json={"model_id": model_id, "calibration_dataset_id": dataset_id, **PLAN})
    assert_problem(refused, 422, "calibration set", "different numbers of samples", "'state' 2 (axis 0")
    assert snapshot(app) == before

    body = {
        "model_id": model_id,
        "dataset_id": dataset_id,
        "method": "hawq_v2",
        "options": SENSITIVITY_OPTIONS,
        "sample_axes": AXES,
    }
    first = finished(client, "/v1/sensitivity", body)
    assert first["params"]["sample_axes"] == AXES and first["result"]["cached"] is False
    result = client.get(f"/v1/sensitivity/{first['result']['sensitivity_result_id']}").json()["result"]
    assert result["num_samples"] == SAMPLES
    again = finished(client, "/v1/sensitivity", body)
    assert again["result"]["cached"] is True  # same model, data, options and axes

    ids = {"model_id": model_id, "calibration_dataset_id": dataset_id, "sample_axes": AXES}
    below = {**PLAN, "constraints": {"max_bops": FEWEST_BOPS - 1}}
    assert_problem(client.post("/v1/plans", json={**ids, **below}), 422, f"({FEWEST_BOPS} at batch size 1)")
    job = finished(client, "/v1/plans", {**ids, "evaluation_dataset_id": dataset_id, **PLAN})
    plan = client.get(f"/v1/plans/{job['result']['plan_id']}").json()
    assert plan["request"]["sample_axes"] == AXES and plan["measured"]["num_samples"] == SAMPLES
    assert plan["predicted"]["meets_constraints"]
    runs_in_onnxruntime(client, plan["id"], loose_data(5))

    # the artifact keeps the loose declarations: measured without the plan's axes, the data do not fit
    artifact = client.get(f"/v1/plans/{plan['id']}/artifact").content
    with pytest.raises(ValueError, match="different numbers of samples"):
        measure_latency(artifact, loose_data(SAMPLES), repeats=1, warmup=0)
    remeasured = finished(client, f"/v1/plans/{plan['id']}/latency", {"repeats": 3, "warmup": 1, "batch_size": 4})
    assert remeasured["result"]["latency_measurement_id"]
    latency = client.get(f"/v1/plans/{plan['id']}/latency").json()
    assert len(latency) == 2 and latency[-1]["batch_size"] == 4 and latency[-1]["p50_ms"] > 0


SAMPLE_AXES_REFUSED = [
    ('{"state": -1}', "sample_axes.state"),
    ('{"state": 256}', "sample_axes.state"),
    ('{"state": true}', "sample_axes.state"),
    ('{"state": 1.0}', "sample_axes.state"),
    ('{"state": "1"}', "sample_axes.state"),
    ('{"": 1}', "sample_axes"),
    (json.dumps({f"input{i}": 0 for i in range(257)}), "sample_axes"),
    ('[["state", 1]]', "sample_axes"),
    # the library's own checks, in its words
    (
        '{"nope": 0}',
        "sample_axes names ['nope'], which are not inputs of the model; its inputs are ['x', 'state', 'sr']",
    ),
    ('{"state": 3}', "sample axis 3 of input 'state' is out of range: its declared shape [2, ?, 4] has rank 3"),
]


@sqlite_only
@pytest.mark.parametrize(("axes", "named"), SAMPLE_AXES_REFUSED, ids=[a[:30] for a, _ in SAMPLE_AXES_REFUSED])
def test_bad_sample_axes_are_refused_at_submission(client, app, axes: str, named: str):
    model_id, dataset_id = uploaded(
        client, stateful_onnx_model().SerializeToString(), npz_bytes(**stateful_data(SAMPLES))
    )
    before = snapshot(app)
    ids = f'"model_id": "{model_id}", "dataset_id": "{dataset_id}"'
    assert_problem(post_json_text(client, "/v1/sensitivity", f'{{{ids}, "sample_axes": {axes}}}'), 422, named)
    plan = (
        f'{{"model_id": "{model_id}", "calibration_dataset_id": "{dataset_id}", '
        f'"constraints": {{"max_size_bytes": 1000000}}, "sample_axes": {axes}}}'
    )
    assert_problem(post_json_text(client, "/v1/plans", plan), 422, named)
    assert snapshot(app) == before  # no job row, nothing stored


@pytest.fixture(scope="module")
def small_pt2(tmp_path_factory):
    from tests.pt2_archives import save_small_model

    return save_small_model(tmp_path_factory.mktemp("pt2") / "small.pt2").read_bytes()


@sqlite_only
def test_a_torch_export_archive_takes_samples_on_axis_0(client, app, small_pt2):
    ids = np.random.default_rng(0).integers(0, 12, (16, 5))
    model_id, dataset_id = uploaded(client, small_pt2, npz_bytes(ids=ids))
    uneven = upload(client, "/v1/datasets", npz_bytes(ids=ids, labels=np.zeros(15, np.int64))).json()["id"]
    before = snapshot(app)
    given = client.post(
        "/v1/sensitivity", json={"model_id": model_id, "dataset_id": dataset_id, "sample_axes": {"ids": 1}}
    )
    assert_problem(given, 422, "sample_axes applies to ONNX models; a torch.export archive takes samples on axis 0")
    assert_problem(
        client.post("/v1/sensitivity", json={"model_id": model_id, "dataset_id": uneven}),
        422,
        "calibration set: the per-sample arrays hold different numbers of samples: 'ids' 16 (axis 0 of "
        "shape (16, 5)), 'labels' 15 (axis 0 of shape (15,))",
    )
    assert snapshot(app) == before


@sqlite_only
def test_datasets_are_described_whatever_their_first_dims(client):
    """num_samples is the first dim every array of rank >= 1 shares (a rank-0 array is one shared
    value), None when they differ; nothing about sample axes is refused before a model is known."""
    scalar = np.array(16000, np.int64)
    cases = [
        ({"x": np.zeros((3, 2), np.float32), "labels": np.zeros(3, np.int64)}, 3),
        ({"x": np.zeros((3, 2), np.float32), "sr": scalar}, 3),
        ({"x": np.zeros((3, 2), np.float32), "y": np.zeros((4, 2), np.float32)}, None),
        ({"sr": scalar}, None),
        (stateful_data(SAMPLES), None),
    ]
    for arrays, count in cases:
        response = upload(client, "/v1/datasets", npz_bytes(**arrays))
        assert response.status_code == 201, response.text
        assert response.json()["num_samples"] == count, arrays.keys()
    page = client.get("/models")  # the dashboard's list shows an uncounted dataset as a dash
    assert page.status_code == 200 and "—" in page.text


def _with(array: np.ndarray, index: tuple[int, ...], value: float = np.nan) -> np.ndarray:
    changed = array.copy()
    changed[index] = value
    return changed


# Wrong data, as the local run and the server say it: (model, arrays, sample_axes, words of the message)
WRONG_DATA = {
    "state counted on the declared axis 0": (
        loosely_declared_stateful_model,
        loose_data(SAMPLES),
        {},
        "'state' 2 (axis 0 of shape (2, 24, 4))",
    ),
    "a vector for the shared sr": (
        stateful_onnx_model,
        loose_data(SAMPLES),
        {},
        "'sr' has shape (1,), the model expects rank 0",
    ),
    "one state fewer": (
        stateful_onnx_model,
        {**stateful_data(SAMPLES), "state": np.zeros((2, 23, 4), np.float32)},
        {},
        "'state' 23 (axis 1 of shape (2, 23, 4))",
    ),
    "sr as float": (
        stateful_onnx_model,
        {**stateful_data(SAMPLES), "sr": np.array(16000.0, np.float32)},
        {},
        "'sr' has dtype float32, the model expects int64",
    ),
    "an axis for an input the model lacks": (
        stateful_onnx_model,
        stateful_data(SAMPLES),
        {"nope": 0},
        "sample_axes names ['nope']",
    ),
    "a state on axis 0 given": (
        loosely_declared_stateful_model,
        loose_data(SAMPLES),
        {"state": 0, "sr": None},
        "'state' 2 (axis 0",
    ),
    "x as float64 (numpy's default)": (
        stateful_onnx_model,
        {**stateful_data(SAMPLES), "x": stateful_data(SAMPLES)["x"].astype(np.float64)},
        {},
        "'x' has dtype float64, the model expects float32",
    ),
    # NaN and infinity: found at upload (where along each axis), refused at submission on the sample axis
    "NaN in x": (
        stateful_onnx_model,
        {**stateful_data(SAMPLES), "x": _with(stateful_data(SAMPLES)["x"], (3, 1))},
        {},
        "calibration array 'x' holds NaN or infinite values in 1 of 24 samples (first: sample 3)",
    ),
    "infinity in the state's sample 5": (
        stateful_onnx_model,
        {**stateful_data(SAMPLES), "state": _with(stateful_data(SAMPLES)["state"], (1, 5, 2), np.inf)},
        {},
        "calibration array 'state' holds NaN or infinite values in 1 of 24 samples (first: sample 5)",
    ),
}


def _axis_options(axes: dict) -> list[str]:
    return [part for name, axis in axes.items() for part in ("--sample-axis", f"{name}={axis}".replace("None", "none"))]


@sqlite_only
@pytest.mark.parametrize("case", WRONG_DATA)
def test_wrong_data_reads_the_same_locally_and_on_the_server(client, capsys, tmp_path, monkeypatch, case):
    make_model, arrays, axes, words = WRONG_DATA[case]
    monkeypatch.chdir(tmp_path)
    model = make_model()
    onnx.save(model, tmp_path / "model.onnx")
    np.savez(tmp_path / "data.npz", **arrays)
    model_id, dataset_id = uploaded(client, model.SerializeToString(), (tmp_path / "data.npz").read_bytes())

    status, _, err = call_mpq(
        "plan",
        "model.onnx",
        "--data",
        "data.npz",
        "--candidates",
        "fp32,w8a8,w4",
        "--max-size-mb",
        "1",
        "--device",
        "cpu",
        "--no-cache",
        *_axis_options(axes),
        capsys=capsys,
    )
    assert status == 2 and "Traceback" not in err, err
    local = err.strip().splitlines()[-1].removeprefix("mpq: ")
    assert words in local, local
    served = client.post(
        "/v1/plans",
        json={
            "model_id": model_id,
            "calibration_dataset_id": dataset_id,
            "candidates": ["fp32", "w8a8", "w4"],
            "sample_axes": axes,
            "constraints": {"max_size_bytes": 2**20},
        },
    )
    assert_problem(served, 422)
    assert served.json()["detail"] == local

    # mpq sensitivity names the file (--data 'data.npz') where the server names the set; the rest is the same
    status, _, err = call_mpq(
        "sensitivity",
        "model.onnx",
        "--data",
        "data.npz",
        "--device",
        "cpu",
        "--no-cache",
        *_axis_options(axes),
        capsys=capsys,
    )
    assert status == 2, err
    local = err.strip().splitlines()[-1].removeprefix("mpq: ")
    served = client.post("/v1/sensitivity", json={"model_id": model_id, "dataset_id": dataset_id, "sample_axes": axes})
    assert_problem(served, 422, words)
    assert served.json()["detail"].removeprefix("calibration set") == local.removeprefix("--data 'data.npz'")


def test_the_remote_cli_cancels_a_job_whose_server_dropped_the_sample_axes(capsys):
    """A server from before sample_axes drops the field: the CLI says so instead of planning on the wrong axes."""
    from service.cli.remote import _check_sample_axes_kept

    class Server:
        def __init__(self) -> None:
            self.cancelled: list[str] = []

        def cancel(self, job_id: str) -> dict:
            self.cancelled.append(job_id)
            return {}

    server = Server()
    _check_sample_axes_kept(server, {"id": "j1", "params": {"sample_axes": AXES}}, {"sample_axes": AXES})
    _check_sample_axes_kept(server, {"id": "j2", "params": {}}, {"sample_axes": {}})
    assert server.cancelled == []
    with pytest.raises(ValueError, match="ignores --sample-axis"):
        _check_sample_axes_kept(server, {"id": "j3", "params": {}}, {"sample_axes": AXES})
    assert server.cancelled == ["j3"]


def test_the_body_sample_axes_reach_the_library_request():
    """PlanRequestIn.sample_axes becomes PlanRequest.sample_axes; plans stored before the field have none."""
    from service.api.plans import PlanRequestIn
    from service.inspection.model_files import plan_request

    fields = {"model_id": "m", "calibration_dataset_id": "c", "constraints": {"max_size_bytes": 10_000}}
    body = PlanRequestIn(**fields, sample_axes=AXES).model_dump()
    assert plan_request(body).sample_axes == AXES
    assert plan_request({k: v for k, v in body.items() if k != "sample_axes"}).sample_axes == {}
