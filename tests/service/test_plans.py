"""Plans end to end through HTTP on the embedded executor: upload the trained digits CNN,
plan, wait, read, download; the artifact runs in onnxruntime and measures what the plan says."""

from __future__ import annotations

import hashlib

import onnxruntime as ort
import pytest

from tests.service.helpers import (
    artifact_accuracy,
    assert_problem,
    post_json_text,
    pt2_cases,
    pt2_plan_body,
    snapshot,
    sqlite_only,
    upload,
    uploaded,
    wait_for,
)


@pytest.mark.slow
def test_plan_round_trip(client, digits_files):
    model_bytes, calib, evaluation, data = digits_files
    model_id, calib_id = uploaded(client, model_bytes, calib)
    eval_id = upload(client, "/v1/datasets", evaluation).json()["id"]
    float_size = len(model_bytes)
    body = {
        "model_id": model_id,
        "calibration_dataset_id": calib_id,
        "evaluation_dataset_id": eval_id,
        "method": "hawq_v2",
        "search": "pareto",
        "candidates": ["fp32", "w8a8", "w4a8"],
        "constraints": {"max_size_bytes": float_size // 3},
        "options": {"trace_max_probes": 32, "batch_size": 128},
    }
    submitted = client.post("/v1/plans", json=body)
    assert submitted.status_code == 202, submitted.text
    job = wait_for(client, submitted.json()["id"], timeout=300)
    assert job["status"] == "succeeded", (job["error"], job["log_tail"][-3000:])
    plan_id = job["result"]["plan_id"]
    sensitivity = client.get(f"/v1/sensitivity/{job['result']['sensitivity_result_id']}").json()
    assert sensitivity["method"] == "hawq_v2" and sensitivity["result"].get("interlayer") is None  # only what it needs
    first = sensitivity["result"]["layers"][0]
    assert (first["name"], first["node_name"], first["scope"]) == ("conv1.weight", "/conv1/Conv", "/conv1")

    plan = client.get(f"/v1/plans/{plan_id}").json()
    assert set(plan["assignment"]) == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}
    assert plan["predicted"]["size_bytes"] <= float_size // 3 and plan["predicted"]["meets_constraints"]
    assert plan["measured"]["metric_name"] and 80 < plan["measured"]["metric"] <= 100
    assert plan["measured"]["baseline"] - plan["measured"]["metric"] == pytest.approx(plan["measured"]["drop"])
    assert set(plan["result"]["uniform"]) >= {"w8a8", "w4a8"}
    assert plan["result"]["layer_nodes"]["fc2.weight"] == {"node_name": "/fc2/Gemm", "scope": "/fc2"}
    assert plan["result"]["excluded"] == [] and plan["request"]["exclude"] == []
    # the planner's result document, less the sensitivity (its own resource); measurements only in measured
    assert plan["result"]["plan"]["measured"] == plan["measured"] and "sensitivity" not in plan["result"]
    assert plan["result"]["run"]["versions"] == plan["versions"] and plan["result"]["run"]["evaluations"] >= 1
    assert not set(plan["measured"]) & {"uniform", "evaluations", "search", "timings", "excluded", "layer_nodes"}

    frontier = client.get(f"/v1/plans/{plan_id}/frontier").json()
    assert len(frontier) >= 2
    sizes = [p["size_bytes"] for p in frontier]
    assert sizes == sorted(sizes) or sizes == sorted(sizes, reverse=True)

    download = client.get(f"/v1/plans/{plan_id}/artifact")
    assert download.status_code == 200
    assert hashlib.sha256(download.content).hexdigest() == plan["artifact"]["sha256"]
    assert download.headers["etag"] == f'"{plan["artifact"]["sha256"]}"'
    assert "attachment" in download.headers["content-disposition"]
    session = ort.InferenceSession(download.content, providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": data.test_x})[0]
    accuracy = 100.0 * float((logits.argmax(1) == data.test_y).mean())
    assert accuracy == pytest.approx(plan["measured"]["metric"], abs=1e-6)

    measured = client.get(f"/v1/plans/{plan_id}/latency").json()
    assert len(measured) == 1 and measured[0]["p50_ms"] > 0 and measured[0]["device_description"]
    again = wait_for(client, client.post(f"/v1/plans/{plan_id}/latency", json={"repeats": 5}).json()["id"])
    assert again["status"] == "succeeded", again
    assert len(client.get(f"/v1/plans/{plan_id}/latency").json()) == 2


@pytest.mark.slow
@sqlite_only
@pytest.mark.parametrize("index", [0, 1], ids=["cnn-dynamic-pareto", "transformer-fixed-bisection"])
def test_a_pt2_plan_round_trip(client, index):
    """A torch.export archive is planned like an ONNX model: exported to ONNX in its job, its layers named
    by their parameters; the downloaded artifact measures in onnxruntime what the plan reports."""
    case = pt2_cases()[index]
    model_id, calib_id = uploaded(client, case.model, case.calibration)
    eval_id = upload(client, "/v1/datasets", case.evaluation).json()["id"]
    submitted = client.post("/v1/plans", json=pt2_plan_body(case, model_id, calib_id, eval_id))
    assert submitted.status_code == 202, submitted.text
    job = wait_for(client, submitted.json()["id"], timeout=300)
    assert job["status"] == "succeeded", (job["error"], job["log_tail"][-3000:])
    assert "exported to ONNX by torch.onnx.export" in job["log_tail"]
    plan = client.get(f"/v1/plans/{job['result']['plan_id']}").json()
    assert set(plan["assignment"]) == case.layers and plan["predicted"]["meets_constraints"]
    assert set(plan["assignment"].values()) != {"fp32"}
    sensitivity = client.get(f"/v1/sensitivity/{job['result']['sensitivity_result_id']}").json()
    assert {layer["name"] for layer in sensitivity["result"]["layers"]} == case.layers  # one vocabulary
    download = client.get(f"/v1/plans/{job['result']['plan_id']}/artifact")
    assert hashlib.sha256(download.content).hexdigest() == plan["artifact"]["sha256"]
    assert plan["measured"]["metric_name"] == "top1_accuracy"
    assert artifact_accuracy(case, download.content) == pytest.approx(plan["measured"]["metric"], abs=1e-6)


@pytest.mark.slow
def test_plan_requests_are_validated_up_front(client, digits_files):
    model_bytes, calib, _, _ = digits_files
    model_id, calib_id = uploaded(client, model_bytes, calib)
    base = {"model_id": model_id, "calibration_dataset_id": calib_id}
    cases = [
        # the library's rules between fields, in its words (planner.request.PlanRequest)
        ({**base, "search": "bisection", "constraints": {"max_size_bytes": 10**6}}, "bisection needs max_drop"),
        (
            {**base, "search": "bisection", "constraints": {"max_latency_ms": 5.0, "max_drop": 1.0}},
            "not max_latency_ms",
        ),
        ({**base, "constraints": {"max_size_bytes": 100, "max_bops": 100}}, "at most one budget"),
        ({**base, "constraints": {"max_size_bytes": 100}}, "below the smallest"),
        ({**base, "candidates": ["w3a3"], "constraints": {"max_size_bytes": 10**6}}, "w3a3"),
        # a pattern matching no layer or node name is named, with some of the model's layers to compare
        (
            {**base, "exclude": ["fc1.weight", "/conv9/*"], "constraints": {"max_size_bytes": 10**6}},
            "['/conv9/*'] match no layer name or node name",
        ),
    ]
    for body, words in cases:
        assert_problem(client.post("/v1/plans", json=body), 422, words)
    assert client.get("/v1/jobs").json()["total"] == 0
    assert_problem(client.get("/v1/plans/nope"), 404, "no plan")
    assert_problem(client.get("/v1/plans/nope/artifact"), 404, "no plan")


BUDGET = '"constraints": {"max_size_bytes": 1000000}'
# The hostile review's plan cases (body fields as JSON text, the field the answer must name): each
# passed submission and failed in the worker. Infinity is what Python's json (and so the API) reads.
# (max_size_bytes and max_drop Infinity were already refused: an int field, and max_drop <= 100.)
HOSTILE_PLAN_FIELDS = [
    ('"constraints": {"max_bops": Infinity}', "max_bops"),
    ('"constraints": {"max_bops": 123456789.5}', "max_bops"),
    ('"constraints": {"max_latency_ms": Infinity}', "max_latency_ms"),
    (f'{BUDGET}, "options": {{"bits": [8]}}', "bits"),
    (f'{BUDGET}, "options": {{"type": "TraceConfig"}}', "type"),
    (f'{BUDGET}, "options": {{"seed": {2**70}}}', "seed"),
    (f'{BUDGET}, "options": {{"seed": true}}', "seed"),
    (f'{BUDGET}, "options": {{"batch_size": Infinity}}', "batch_size"),
    (f'{BUDGET}, "options": {{"trace_max_probes": 1e9}}', "trace_max_probes"),
    (f'{BUDGET}, "exclude": "fc1.weight"', "exclude"),
    (f'{BUDGET}, "exclude": [1]', "exclude"),
    (f'{BUDGET}, "exclude": [""]', "exclude"),
    (f'{BUDGET}, "exclude": ["{"x" * 1025}"]', "exclude"),
    (f'{BUDGET}, "baseline": "bf16"', "baseline"),
    (f'{BUDGET}, "baseline": 16', "baseline"),
    (f'{BUDGET}, "baseline": null', "baseline"),
]


@pytest.mark.slow
@sqlite_only
@pytest.mark.parametrize(("fields", "named"), HOSTILE_PLAN_FIELDS, ids=[f for f, _ in HOSTILE_PLAN_FIELDS])
def test_hostile_plan_requests_are_refused_at_submission(
    client, app, tiny_model_bytes, tiny_dataset_bytes, fields: str, named: str
):
    model_id, dataset_id = uploaded(client, tiny_model_bytes, tiny_dataset_bytes)
    before = snapshot(app)
    body = f'{{"model_id": "{model_id}", "calibration_dataset_id": "{dataset_id}", {fields}}}'
    assert_problem(post_json_text(client, "/v1/plans", body), 422, named)
    assert snapshot(app) == before  # no job row, nothing stored


def test_the_api_schema_states_the_library_bounds():
    """The API process does not import the libraries, so its schema repeats their bounds: the same ones."""
    import importlib

    from service.api.jobs import SensitivityRequest
    from service.api.plans import Constraints, LatencyRequest, PlanRequestIn

    def schema(model, name: str) -> dict:
        field = model.model_json_schema()["properties"][name]
        return next((s for s in field.get("anyOf", [field]) if s.get("type") != "null"), field)

    library = importlib.import_module("planner.request")

    for name in ("max_size_bytes", "max_bops"):
        assert schema(Constraints, name) == {"type": "integer", "exclusiveMinimum": 0, "maximum": library.MAX_COST}
    assert schema(Constraints, "max_latency_ms")["maximum"] == library.MAX_LATENCY_MS
    assert schema(Constraints, "max_drop")["maximum"] == library.MAX_DROP
    assert schema(PlanRequestIn, "candidates")["maxItems"] == library.MAX_CANDIDATE_NAMES
    assert tuple(schema(PlanRequestIn, "metric")["enum"]) == library.METRICS  # planner.evaluate's, imported there
    assert tuple(schema(PlanRequestIn, "baseline")["enum"]) == library.BASELINES
    exclude = importlib.import_module("planner.exclude")
    assert schema(PlanRequestIn, "exclude")["maxItems"] == exclude.MAX_EXCLUDE_PATTERNS
    assert schema(PlanRequestIn, "exclude")["items"]["maxLength"] == exclude.MAX_EXCLUDE_PATTERN_LENGTH
    samples = importlib.import_module("sensitivity.samples")
    for model in (PlanRequestIn, SensitivityRequest):
        axes = model.model_json_schema()["properties"]["sample_axes"]
        assert axes["maxProperties"] == samples.MAX_SAMPLE_AXES
        assert axes["propertyNames"]["maxLength"] == samples.MAX_INPUT_NAME_LENGTH
        assert axes["additionalProperties"]["anyOf"] == [
            {"type": "integer", "minimum": 0, "maximum": samples.MAX_SAMPLE_AXIS},
            {"type": "null"},
        ]
    latency = {name: schema(LatencyRequest, name)["maximum"] for name in ("batch_size", "repeats", "warmup")}
    assert latency == {
        "batch_size": library.MAX_LATENCY_BATCH_SIZE,
        "repeats": library.MAX_LATENCY_REPEATS,
        "warmup": library.MAX_LATENCY_WARMUP,
    }


@sqlite_only
@pytest.mark.parametrize("fields", ['"repeats": true', '"batch_size": 2.0', '"warmup": "5"'])
def test_latency_requests_take_json_ints_only(client, fields: str):
    """Checked before the plan is looked up: a bad body is a 422 naming the field, not a 404 or a job."""
    assert_problem(post_json_text(client, "/v1/plans/nope/latency", f"{{{fields}}}"), 422, fields.split('"')[1])


def test_the_plan_body_metric_reaches_the_library_request():
    """The body's metric becomes PlanRequest.metric; jobs stored before the field existed plan with auto."""
    from pydantic import ValidationError

    from service.api.plans import PlanRequestIn
    from service.inspection.model_files import plan_request

    fields = {"model_id": "m", "calibration_dataset_id": "c", "constraints": {"max_size_bytes": 10_000}}
    body = PlanRequestIn(**fields, metric="neighbour_agreement").model_dump()
    assert plan_request(body).metric == "neighbour_agreement"
    assert plan_request({k: v for k, v in body.items() if k != "metric"}).metric == "auto"
    with pytest.raises(ValidationError, match="metric"):
        PlanRequestIn(**fields, metric="bleu")


def test_the_plan_body_baseline_reaches_the_library_request():
    """The body's baseline becomes PlanRequest.baseline; jobs stored before the field existed plan against fp32."""
    from pydantic import ValidationError

    from service.api.plans import PlanRequestIn
    from service.inspection.model_files import plan_request

    fields = {"model_id": "m", "calibration_dataset_id": "c", "constraints": {"max_drop": 1.0}}
    body = PlanRequestIn(**fields, baseline="fp16").model_dump()
    assert plan_request(body).baseline == "fp16"
    assert PlanRequestIn(**fields).model_dump()["baseline"] == "fp32"
    assert plan_request({k: v for k, v in body.items() if k != "baseline"}).baseline == "fp32"
    with pytest.raises(ValidationError, match="baseline"):
        PlanRequestIn(**fields, baseline="bf16")


def test_the_plan_body_objective_reaches_the_library_request():
    """The body's objective becomes PlanRequest.objective (the library's choices); jobs stored before the
    field existed plan on the loss."""
    from pydantic import ValidationError

    from planner.request import OBJECTIVES
    from service.api.plans import PlanRequestIn
    from service.inspection.model_files import plan_request

    assert tuple(PlanRequestIn.model_json_schema()["properties"]["objective"]["enum"]) == OBJECTIVES
    fields = {"model_id": "m", "calibration_dataset_id": "c", "search": "bisection", "constraints": {"max_drop": 1.0}}
    body = PlanRequestIn(**fields, objective="latency").model_dump()
    assert plan_request(body).objective == "latency" and plan_request(body).cost_kind == "latency"
    assert plan_request({k: v for k, v in body.items() if k != "objective"}).objective == "loss"
    with pytest.raises(ValidationError, match="objective"):
        PlanRequestIn(**fields, objective="speed")


def test_the_plan_body_exclude_reaches_the_library_request():
    """The body's exclude becomes PlanRequest.exclude; jobs stored before the field existed exclude nothing."""
    from service.api.plans import PlanRequestIn
    from service.inspection.model_files import plan_request

    fields = {"model_id": "m", "calibration_dataset_id": "c", "constraints": {"max_size_bytes": 10_000}}
    body = PlanRequestIn(**fields, exclude=["model.22.dfl.conv.weight", "/model.22/dfl/*"]).model_dump()
    assert plan_request(body).exclude == ("model.22.dfl.conv.weight", "/model.22/dfl/*")
    assert plan_request({k: v for k, v in body.items() if k != "exclude"}).exclude == ()
