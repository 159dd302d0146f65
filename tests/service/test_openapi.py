"""The OpenAPI document says what the server does: the bearer scheme (required while auth is on),
problem+json errors, readable operation ids, typed results and examples, each checked against what the
server really sends (real job outputs included), with every key of a response declared."""

from __future__ import annotations

import json
import re

import jsonschema_rs
import pytest

from service.api.errors import PROBLEM_MEDIA_TYPE
from service.api.jobs import JobOut, SensitivityRequest
from service.api.openapi import BEARER_SCHEME
from service.api.plans import LatencyRequest, PlanRequestIn
from tests.service import dashboard_data
from tests.service.helpers import enable_auth, sqlite_only, upload, uploaded, wait_for

PROBLEM_REF = {"$ref": "#/components/schemas/ProblemDocument"}
# Stable: clients generated from the schema name their methods after these; change them knowingly.
OPERATION_IDS = {
    "upload_model",
    "list_models",
    "get_model",
    "delete_model",
    "download_model",
    "upload_dataset",
    "list_datasets",
    "get_dataset",
    "delete_dataset",
    "download_dataset",
    "create_sensitivity",
    "get_sensitivity",
    "list_jobs",
    "get_job",
    "cancel_job",
    "create_plan",
    "list_plans",
    "get_plan",
    "get_frontier",
    "get_artifact",
    "remeasure_latency",
    "list_latency",
    "list_latency_tables",
    "healthz",
    "readyz",
}


def operations(document: dict) -> list[tuple[str, str, dict]]:
    return [(path, method, operation) for path, ops in document["paths"].items() for method, operation in ops.items()]


def v1_operations(document: dict) -> list[tuple[str, str, dict]]:
    return [(path, method, op) for path, method, op in operations(document) if path.startswith("/v1/")]


def strict(schema):
    """The schema with no undeclared key allowed in any object that declares its properties: a response
    that passes has documented every key it holds."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: strict(value) for key, value in schema.items()}
    if "properties" in result and result.get("additionalProperties", True) is True:
        result["additionalProperties"] = False
    return result


def response_validator(document: dict, path: str, method: str, status: int, media_type: str):
    """A JSON Schema validator for one documented response, strict (see ``strict``)."""
    responses = document["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method.upper()} {path} answered {status}, which it does not document"
    schema = responses[str(status)]["content"][media_type]["schema"]
    return jsonschema_rs.Draft202012Validator({**schema, "components": strict(document["components"])})


def assert_documented(document: dict, path: str, method: str, response) -> None:
    media_type = response.headers["content-type"].split(";")[0]
    validator = response_validator(document, path, method, response.status_code, media_type)
    errors = [f"{error.instance_path}: {error.message}" for error in validator.iter_errors(response.json())]
    assert not errors, f"{method.upper()} {path} {response.status_code}: {errors[:5]}"


# ---------------------------------------------------------------- the bearer scheme


def test_the_bearer_scheme_is_declared_and_required_only_while_auth_is_on(client, app):
    off = client.get("/openapi.json").json()
    assert off["components"]["securitySchemes"][BEARER_SCHEME] | {"description": ""} == {
        "type": "http",
        "scheme": "bearer",
        "description": "",
    }
    assert "MPQ_AUTH=off" in off["components"]["securitySchemes"][BEARER_SCHEME]["description"]
    assert not [op for _, _, op in operations(off) if "security" in op or "401" in op["responses"]]

    enable_auth(app)
    on = client.get("/openapi.json").json()
    assert "MPQ_AUTH=token" in on["components"]["securitySchemes"][BEARER_SCHEME]["description"]
    v1 = v1_operations(on)
    assert len(v1) == len(OPERATION_IDS) - 2
    for path, method, operation in v1:
        assert operation["security"] == [{BEARER_SCHEME: []}], (method, path)
        assert operation["responses"]["401"]["content"] == {PROBLEM_MEDIA_TYPE: {"schema": PROBLEM_REF}}
        # what the schema says is what the server does
        assert client.request(method, path.replace("{", "").replace("}", "")).status_code == 401, (method, path)
    for path in ("/healthz", "/readyz"):
        assert "security" not in on["paths"][path]["get"]
    assert client.get("/healthz").status_code == 200


# ---------------------------------------------------------------- problem+json errors


def test_every_error_is_documented_as_problem_json(app):
    document = app.openapi()
    assert "HTTPValidationError" not in json.dumps(document)
    for path, method, operation in operations(document):
        responses = operation["responses"]
        errors = {status: response for status, response in responses.items() if status[0] in "45"}
        expected = {"400", "500"} | ({"422"} if path.startswith("/v1/") else set())
        expected |= {"403"} if method not in ("get", "head") else set()
        expected |= {"413"} if "requestBody" in operation else set()
        assert expected <= set(errors), (method, path, sorted(errors))
        for status, response in errors.items():
            assert response["content"] == {PROBLEM_MEDIA_TYPE: {"schema": PROBLEM_REF}}, (method, path, status)
            assert response["description"], (method, path, status)
    for path in ("/v1/jobs/{job_id}", "/v1/plans/{plan_id}", "/v1/sensitivity/{result_id}", "/v1/models/{item_id}"):
        assert "404" in document["paths"][path]["get"]["responses"], path


@pytest.mark.slow  # an upload is inspected in a sandboxed process
def test_the_errors_sent_are_the_documented_problem(client, app):
    document = app.openapi()
    cases = [
        ("post", "/v1/plans", client.post("/v1/plans", json={"model_id": 5, "constraints": {"max_drop": 101}})),
        ("get", "/v1/jobs", client.get("/v1/jobs?limit=0")),
        ("get", "/v1/jobs/{job_id}", client.get("/v1/jobs/nope")),
        ("post", "/v1/sensitivity", client.post("/v1/sensitivity", json={"model_id": "no", "dataset_id": "no"})),
        ("post", "/v1/plans", client.post("/v1/plans", content=b"{" + b" " * 300_000 + b"}")),
        ("post", "/v1/models", upload(client, "/v1/models", b"not a model")),
        ("delete", "/v1/datasets/{item_id}", client.delete("/v1/datasets/nope")),
    ]
    assert [response.status_code for *_, response in cases] == [422, 422, 404, 422, 413, 422, 404]
    for method, path, response in cases:
        assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
        assert_documented(document, path, method, response)
    assert cases[0][2].json()["errors"][0]["loc"][0] == "body"


# ---------------------------------------------------------------- operation ids


def test_operation_ids_are_readable_unique_and_stable(app):
    ids = [operation["operationId"] for _, _, operation in operations(app.openapi())]
    assert len(ids) == len(set(ids)), sorted(ids)
    assert set(ids) == OPERATION_IDS
    for operation_id in ids:
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", operation_id), operation_id
        assert "v1" not in operation_id and not operation_id.endswith(("_get", "_post", "_delete")), operation_id


# ---------------------------------------------------------------- typed results


def component(document: dict, name: str) -> dict:
    return document["components"]["schemas"][name]


def test_plan_sensitivity_and_job_results_are_typed(app):
    document = app.openapi()
    refs = {
        ("PlanOut", "result"): "PlanResult",
        ("PlanOut", "predicted"): "PlanPredictedFigures",
        ("SensitivityOut", "result"): "SensitivityResult",
        ("JobOut", "result"): "JobResult",
        ("FrontierPointOut", "predicted"): "PredictedFigures",
    }
    for (owner, field), name in refs.items():
        assert component(document, owner)["properties"][field]["$ref"] == f"#/components/schemas/{name}"
    for owner in ("PlanOut", "FrontierPointOut"):
        measured = component(document, owner)["properties"]["measured"]["anyOf"]
        assert measured == [{"$ref": "#/components/schemas/Measurement"}, {"$ref": "#/components/schemas/NotMeasured"}]
    declared = {
        "PlanResult": {"plan", "frontier", "uniform", "excluded", "layer_nodes", "run", "slower_than_float"},
        "PlanPoint": {"layers", "predicted", "measured"},
        "Measurement": {
            "metric_name",
            "metric",
            "baseline",
            "drop",
            "size_bytes",
            "latency_ms",
            "latency_ratio_to_float",
        },
        "SensitivityResult": {"config", "layers", "traces", "eigenvalues", "interlayer", "loss", "loss_kind"},
        "LayerTrace": {"name", "trace", "standard_error", "num_probes", "average_trace"},
        "InterLayerTerms": {"labels", "matrix", "gradient_terms", "omega"},
        "JobResult": {"plan_id", "sensitivity_result_id", "error_code"},
    }
    for name, properties in declared.items():
        schema = component(document, name)
        assert schema["type"] == "object" and properties <= set(schema["properties"]), name


@pytest.mark.slow
@sqlite_only
def test_a_real_plan_and_its_sensitivity_match_the_schema(client, app, digits_files):
    """A plan job on the trained digits CNN (interlayer: traces and G): its job, plan, plan list, frontier
    and sensitivity responses validate against the documented schemas, with no undeclared key."""
    model_bytes, calib, evaluation, _ = digits_files
    model_id, calib_id = uploaded(client, model_bytes, calib)
    eval_id = upload(client, "/v1/datasets", evaluation).json()["id"]
    body = {
        "model_id": model_id,
        "calibration_dataset_id": calib_id,
        "evaluation_dataset_id": eval_id,
        "method": "interlayer",
        "candidates": ["fp32", "w8a8", "w4a8"],
        "constraints": {"max_size_bytes": len(model_bytes) // 3},
        "options": {"trace_max_probes": 16},
    }
    document = app.openapi()
    submitted = client.post("/v1/plans", json=body)
    assert_documented(document, "/v1/plans", "post", submitted)
    job = wait_for(client, submitted.json()["id"], timeout=300)
    assert job["status"] == "succeeded", (job["error"], (job["log_tail"] or "")[-2000:])
    plan_id, sensitivity_id = job["result"]["plan_id"], job["result"]["sensitivity_result_id"]
    responses = [
        ("/v1/jobs/{job_id}", client.get(f"/v1/jobs/{job['id']}")),
        ("/v1/jobs", client.get("/v1/jobs")),
        ("/v1/plans/{plan_id}", client.get(f"/v1/plans/{plan_id}")),
        ("/v1/plans", client.get("/v1/plans")),
        ("/v1/plans/{plan_id}/frontier", client.get(f"/v1/plans/{plan_id}/frontier")),
        ("/v1/plans/{plan_id}/latency", client.get(f"/v1/plans/{plan_id}/latency")),
        ("/v1/sensitivity/{result_id}", client.get(f"/v1/sensitivity/{sensitivity_id}")),
    ]
    for path, response in responses:
        assert response.status_code == 200, (path, response.text[:500])
        assert_documented(document, path, "get", response)
    plan = client.get(f"/v1/plans/{plan_id}").json()
    assert plan["result"]["frontier"] and plan["result"]["uniform"] and plan["measured"]["latency_ms"]
    sensitivity = client.get(f"/v1/sensitivity/{sensitivity_id}").json()["result"]
    assert sensitivity["traces"] and sensitivity["interlayer"]["matrix"]


@pytest.mark.slow
@sqlite_only
def test_a_fisher_sensitivity_and_plan_match_the_schema(client, app, digits_files):
    """--method fisher through the API on the embedded executor: the sensitivity job's result (typed
    FisherTerms) and a fisher plan within its size budget validate against the documented schemas."""
    model_bytes, calib, evaluation, _ = digits_files
    model_id, calib_id = uploaded(client, model_bytes, calib)
    eval_id = upload(client, "/v1/datasets", evaluation).json()["id"]
    document = app.openapi()
    body = {"model_id": model_id, "dataset_id": calib_id, "method": "fisher", "options": {"bits": [8, 4]}}
    submitted = client.post("/v1/sensitivity", json=body)
    assert_documented(document, "/v1/sensitivity", "post", submitted)
    job = wait_for(client, submitted.json()["id"], timeout=300)
    assert job["status"] == "succeeded", (job["error"], (job["log_tail"] or "")[-2000:])
    response = client.get(f"/v1/sensitivity/{job['result']['sensitivity_result_id']}")
    assert_documented(document, "/v1/sensitivity/{result_id}", "get", response)
    stored = response.json()
    fisher = stored["result"]["fisher"]
    assert stored["method"] == "fisher" and stored["result"]["config"]["type"] == "FisherConfig"
    assert stored["result"]["traces"] is None and fisher["num_samples"] == 256
    assert len(fisher["labels"]) == 2 * len(fisher["layer_names"]) == len(fisher["standard_errors"])
    assert all(0 < error < change for change, error in zip(fisher["loss_changes"], fisher["standard_errors"]))

    budget = len(model_bytes) // 3
    plan_body = {
        "model_id": model_id,
        "calibration_dataset_id": calib_id,
        "evaluation_dataset_id": eval_id,
        "method": "fisher",
        "candidates": ["fp32", "w8", "w4"],
        "constraints": {"max_size_bytes": budget},
    }
    submitted = client.post("/v1/plans", json=plan_body)
    assert submitted.status_code == 202, submitted.text
    job = wait_for(client, submitted.json()["id"], timeout=300)
    assert job["status"] == "succeeded", (job["error"], (job["log_tail"] or "")[-2000:])
    # the plan reused the fisher result the sensitivity job stored (same model, data and settings)
    assert job["result"]["sensitivity_result_id"] == stored["id"]
    plan = client.get(f"/v1/plans/{job['result']['plan_id']}")
    assert_documented(document, "/v1/plans/{plan_id}", "get", plan)
    assert plan.json()["request"]["method"] == "fisher" and plan.json()["measured"]["size_bytes"] <= budget
    assert plan.json()["predicted"]["omega"] > 0


@pytest.mark.slow
@sqlite_only
def test_a_measured_sensitivity_and_plan_match_the_schema(client, app, digits_files):
    """--method measured through the API on the embedded executor: the sensitivity job's result (typed
    MeasuredTerms) and a measured plan that reuses it validate against the documented schemas."""
    model_bytes, calib, evaluation, _ = digits_files
    model_id, calib_id = uploaded(client, model_bytes, calib)
    eval_id = upload(client, "/v1/datasets", evaluation).json()["id"]
    document = app.openapi()
    options = {"candidates": ["w8", "w4"]}  # what a plan offering fp32, w8 and w4 measures
    body = {"model_id": model_id, "dataset_id": calib_id, "method": "measured", "options": options}
    submitted = client.post("/v1/sensitivity", json=body)
    assert submitted.status_code == 202, submitted.text
    assert_documented(document, "/v1/sensitivity", "post", submitted)
    job = wait_for(client, submitted.json()["id"], timeout=300)
    assert job["status"] == "succeeded", (job["error"], (job["log_tail"] or "")[-2000:])
    response = client.get(f"/v1/sensitivity/{job['result']['sensitivity_result_id']}")
    assert_documented(document, "/v1/sensitivity/{result_id}", "get", response)
    stored = response.json()
    measured = stored["result"]["measured"]
    assert stored["method"] == "measured" and stored["result"]["config"]["type"] == "MeasuredConfig"
    assert stored["result"]["traces"] is None and measured["num_samples"] == 256
    assert [label[1] for label in measured["labels"]] == ["w8", "w4"] * (len(measured["labels"]) // 2)
    assert all(error > 0 for error in measured["standard_errors"])
    # quantity auto, the default: the digits CNN outputs class scores, so the KL is measured
    assert stored["result"]["config"]["quantity"] == "auto" and measured["quantity"] == "kl"

    budget = len(model_bytes) // 3
    plan_body = {
        "model_id": model_id,
        "calibration_dataset_id": calib_id,
        "evaluation_dataset_id": eval_id,
        "method": "measured",
        "candidates": ["fp32", "w8", "w4"],
        "constraints": {"max_size_bytes": budget},
    }
    submitted = client.post("/v1/plans", json=plan_body)
    assert submitted.status_code == 202, submitted.text
    job = wait_for(client, submitted.json()["id"], timeout=300)
    assert job["status"] == "succeeded", (job["error"], (job["log_tail"] or "")[-2000:])
    assert job["result"]["sensitivity_result_id"] == stored["id"]  # reused: same model, data and settings
    plan = client.get(f"/v1/plans/{job['result']['plan_id']}")
    assert_documented(document, "/v1/plans/{plan_id}", "get", plan)
    assert plan.json()["request"]["method"] == "measured" and plan.json()["measured"]["size_bytes"] <= budget


@pytest.mark.slow
def test_stored_documents_of_every_shape_match_the_schema(client, app):
    """The dashboard's rows: HAWQ-V1 eigenvalues, an older plan with only some parts of its result,
    and a frontier point never measured ({}); served as stored, absent keys absent."""
    data = dashboard_data.insert(app)
    document = app.openapi()
    for path, url in (
        ("/v1/sensitivity/{result_id}", f"/v1/sensitivity/{data.hawq_v1_id}"),
        ("/v1/sensitivity/{result_id}", f"/v1/sensitivity/{data.interlayer_id}"),
        ("/v1/plans/{plan_id}", f"/v1/plans/{data.plan_id}"),
        ("/v1/plans/{plan_id}/frontier", f"/v1/plans/{data.plan_id}/frontier"),
        ("/v1/jobs", "/v1/jobs"),
    ):
        response = client.get(url)
        assert response.status_code == 200, (url, response.text[:300])
        assert_documented(document, path, "get", response)
    frontier = client.get(f"/v1/plans/{data.plan_id}/frontier").json()
    assert frontier[dashboard_data.UNMEASURED_POINT]["measured"] == {}
    plan = client.get(f"/v1/plans/{data.plan_id}").json()
    assert set(plan["result"]) == {"run", "uniform"} and "onnxruntime_version" not in plan["measured"]["latency_ms"]
    assert client.get(f"/v1/sensitivity/{data.hawq_v1_id}").json()["result"]["eigenvalues"][0]["converged"] is True


# ---------------------------------------------------------------- examples


def test_the_examples_are_valid(app):
    """Each example the schema shows is one the server takes (request bodies) or could send (responses)."""
    document = app.openapi()
    bodies = {
        ("/v1/sensitivity", "post"): SensitivityRequest,
        ("/v1/plans", "post"): PlanRequestIn,
        ("/v1/plans/{plan_id}/latency", "post"): LatencyRequest,
    }
    for (path, method), model in bodies.items():
        schema = document["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
        name = json.dumps(schema).split("#/components/schemas/")[1].split('"')[0]
        examples = component(document, name)["examples"]
        assert examples, name
        validator = jsonschema_rs.Draft202012Validator({**schema, "components": strict(document["components"])})
        for example in examples:
            assert validator.is_valid(example), (name, list(validator.iter_errors(example))[:3])
            model.model_validate(example)
    exampled = {name: schema for name, schema in document["components"]["schemas"].items() if "examples" in schema}
    assert {"JobOut", "ProblemDocument", "Measurement"} <= set(exampled)
    for name, schema in exampled.items():
        validator = jsonschema_rs.Draft202012Validator(
            {"$ref": f"#/components/schemas/{name}", "components": strict(document["components"])}
        )
        for example in schema["examples"]:
            assert not list(validator.iter_errors(example)), (name, list(validator.iter_errors(example))[:3])
    JobOut.model_validate(component(document, "JobOut")["examples"][0])
