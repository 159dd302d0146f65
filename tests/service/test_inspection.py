"""Upload inspection: bombs and malformed files are refused before they are unpacked or run, and a
stuck inspection holds up nobody else."""

from __future__ import annotations

import io
import os
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.inspection.checks import InvalidUpload, Limits
from service.inspection.inspector import Inspector
from service.sandbox.child import SandboxLimits
from tests.models import npz_bytes, tiny_onnx_model
from tests.payloads import external_model, npy_with_header, zip_bytes
from tests.service.helpers import assert_problem, snapshot, sqlite_only, upload

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def _bundle_bomb() -> bytes:
    """A 32 MiB external-data file of zeros, deflated to ~32 KiB beside a real model."""
    model, _data = external_model("weights.bin")
    return zip_bytes({"model.onnx": model.SerializeToString(), "weights.bin": bytes(32 * MiB)})


def _bundle_reading_past_its_file() -> bytes:
    model, data = external_model("weights.bin", offset=64)
    return zip_bytes({"model.onnx": model.SerializeToString(), "weights.bin": data}, zipfile.ZIP_STORED)


def _npz_bomb() -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.zeros((8192, 1024), np.float32))  # 32 MiB of zeros in ~32 KiB
    return buffer.getvalue()


def _unchecked_model(node: onnx.NodeProto, inputs=None, initializers=()) -> bytes:
    graph = helper.make_graph(
        [node],
        "hostile",
        inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()  # never checked: these are what onnx.checker must refuse


def _string_axis() -> bytes:
    node = helper.make_node("Gather", ["table", "x"], ["y"])
    node.attribute.append(helper.make_attribute("axis", "zero"))
    table = numpy_helper.from_array(np.zeros((4, 2), np.float32), "table")
    return _unchecked_model(node, [helper.make_tensor_value_info("x", TensorProto.INT64, [2])], [table])


def _bad_element_type(where: str) -> bytes:
    weight = numpy_helper.from_array(np.zeros((2, 2), np.float32), "w")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])]
    if where == "initializer":
        weight.data_type = 999
    else:
        inputs[0].type.tensor_type.elem_type = 999
    return _unchecked_model(helper.make_node("MatMul", ["x", "w"], ["y"]), inputs, initializers=[weight])


HOSTILE_MODELS = {
    "a bundle bomb": (_bundle_bomb, "times larger than it is packed"),
    "external data past its file": (_bundle_reading_past_its_file, "reads bytes"),
    "MatMul with one input": (lambda: _unchecked_model(helper.make_node("MatMul", ["x"], ["y"])), "onnx.checker"),
    "Gather without inputs": (lambda: _unchecked_model(helper.make_node("Gather", [], ["y"])), "onnx.checker"),
    "a string axis": (_string_axis, "onnx.checker"),
    "a bad initializer element type": (lambda: _bad_element_type("initializer"), "element type 999"),
    "a bad input element type": (lambda: _bad_element_type("input"), "element type"),
}
HOSTILE_DATASETS = {
    "an npz bomb": (_npz_bomb, "times larger than it is packed"),
    "a shape whose product overflows int64": (lambda: zip_bytes({"x.npy": npy_with_header((2**62, 4))}), "needs"),
    "a shape past the unpacked limit": (lambda: zip_bytes({"x.npy": npy_with_header((2**40,))}), "needs"),
}


@pytest.mark.slow
@sqlite_only
@pytest.mark.parametrize("case", HOSTILE_MODELS)
def test_hostile_models_are_refused_before_anything_runs(client, app, case):
    make, words = HOSTILE_MODELS[case]
    before = snapshot(app)
    assert_problem(upload(client, "/v1/models", make()), 422, words)
    assert snapshot(app) == before


@pytest.mark.slow
@sqlite_only
@pytest.mark.parametrize("case", HOSTILE_DATASETS)
def test_hostile_datasets_are_refused_from_their_headers(client, app, case):
    make, words = HOSTILE_DATASETS[case]
    before = snapshot(app)
    assert_problem(upload(client, "/v1/datasets", make()), 422, words)
    assert snapshot(app) == before


@pytest.mark.slow
@sqlite_only
def test_a_pt2_with_an_oversized_weight_table_is_refused(client, app):
    archive = zip_bytes({"m/archive_format": b"pt2", "m/data/weights/model_weights_config.json": b" " * (80 * MiB)})
    assert len(archive) < MiB
    assert_problem(upload(client, "/v1/models", archive), 422, "model_weights_config.json")


@pytest.mark.slow
@sqlite_only
def test_a_bundle_with_external_data_is_described_without_unpacking(client):
    model, data = external_model("data/weights.bin")
    response = upload(
        client, "/v1/models", zip_bytes({"model.onnx": model.SerializeToString(), "data/weights.bin": data})
    )
    assert response.status_code == 201, response.text
    assert [layer["name"] for layer in response.json()["layers"]] == ["fc1.weight", "fc2.weight"]


@pytest.mark.slow
@sqlite_only
def test_bops_budgets_are_checked_without_running_the_model(client):
    """BOPS need the layers' shapes: known statically, the budget is checked up front; unknown, the check
    is left to the job (which runs the model inside its sandbox), never run in the API's inspector."""
    from service.inspection.checks import _fewest_bops
    from tests.models import uninferable_model

    model, _ = uninferable_model()
    assert _fewest_bops(model, {"x": [1, 4, 4]}, ("fp32", "w8a8")) is None
    model_id = upload(client, "/v1/models", tiny_onnx_model().SerializeToString()).json()["id"]
    data = upload(client, "/v1/datasets", npz_bytes(x=np.zeros((8, 8), np.float32))).json()["id"]
    body = {"model_id": model_id, "calibration_dataset_id": data, "constraints": {"max_bops": 1}}
    assert_problem(client.post("/v1/plans", json=body), 422, "max_bops")


@pytest.mark.slow
def test_a_stuck_inspection_holds_up_no_other_request(tmp_path):
    """One upload whose parser never returns: the other requests are answered meanwhile, and the stuck
    process is killed at the time limit."""
    limits = Limits(
        max_bytes=MiB, max_decompressed_bytes=MiB, max_archive_members=8, max_dataset_arrays=8, allow_torch=False
    )
    inspector = Inspector(
        limits,
        SandboxLimits(memory_bytes=1 << 30, cpu_time_s=60, file_size_bytes=MiB),
        processes=2,
        timeout_s=5,
        module="tests.service.stuck_inspection",
        env={"PYTHONPATH": str(REPO)},
    )
    upload_path = tmp_path / "upload"
    upload_path.write_bytes(b"anything")
    outcome: dict[str, object] = {}

    def stuck() -> None:
        try:
            inspector.model(upload_path)
        except InvalidUpload as error:
            outcome["stuck"] = str(error)

    try:
        thread = threading.Thread(target=stuck)
        thread.start()
        time.sleep(0.5)
        answered = [inspector.dataset(upload_path) for _ in range(3)]
        assert thread.is_alive()  # still stuck while the others were answered
        assert answered == [{"answered": "dataset"}] * 3
        thread.join(timeout=30)
        assert "took longer than 5 s" in str(outcome["stuck"])
        assert not _children_running("tests.service.stuck_inspection", exclude_spares=inspector)
    finally:
        inspector.close()


def _many_layers(count: int, side: int = 1) -> onnx.ModelProto:
    """A legal model of ``count`` side-by-side MatMul layers in a chain."""
    weights = [numpy_helper.from_array(np.ones((side, side), np.float32), f"w{i}") for i in range(count)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"w{i}"], [f"h{i + 1}"]) for i in range(count)]
    graph = helper.make_graph(
        nodes,
        "many",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, side])],
        [helper.make_tensor_value_info(f"h{count}", TensorProto.FLOAT, [1, side])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.slow
@sqlite_only
def test_a_model_past_the_layer_limit_is_refused(client, app):
    """800,000 legal layers grew the API process by 1.5 GB (their description was parsed there)."""
    from service.inspection.checks import MAX_LAYERS

    before = snapshot(app)
    too_many = _many_layers(MAX_LAYERS + 1).SerializeToString()
    assert_problem(upload(client, "/v1/models", too_many), 422, f"at most {MAX_LAYERS}")
    assert snapshot(app) == before


@pytest.mark.slow
def test_a_raw_model_is_inspected_in_little_more_memory_than_its_size(tmp_path):
    """Reading, parsing and checking a raw model took 3.0x its size (a 900 MiB model passed the 3 GiB
    budget); it is parsed from a mapping and checked without its weights: 1.5x is plenty."""
    import subprocess
    import sys

    path = tmp_path / "model.onnx"
    path.write_bytes(_many_layers(16, 1448).SerializeToString())  # 128 MiB in 16 weights
    result = subprocess.run(
        [sys.executable, "-m", "tests.service.inspect_within_budget", str(path), "1.5"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.stdout.strip() == "16", result.stdout + result.stderr


@sqlite_only
def test_a_weight_whose_bytes_do_not_fit_its_shape_is_refused(client):
    model = _many_layers(1, 1024)
    model.graph.initializer[0].raw_data = b"\0" * (4 * 1024 * 1024 - 4)
    assert_problem(upload(client, "/v1/models", model.SerializeToString()), 422, "'w0' holds 4194300 bytes")


def _small_inspector(processes: int = 1) -> Inspector:
    limits = Limits(
        max_bytes=16 * MiB,
        max_decompressed_bytes=16 * MiB,
        max_archive_members=8,
        max_dataset_arrays=8,
        allow_torch=False,
    )
    return Inspector(
        limits,
        SandboxLimits(memory_bytes=2 << 30, cpu_time_s=60, file_size_bytes=MiB),
        processes=processes,
        timeout_s=30,
    )


@pytest.mark.slow
def test_a_description_past_the_reply_limit_is_refused_by_the_inspector(tmp_path, monkeypatch):
    import service.inspection.inspector

    monkeypatch.setattr(service.inspection.inspector, "MAX_REPLY_BYTES", 4096)
    inspector = _small_inspector()
    path = tmp_path / "model.onnx"
    try:
        path.write_bytes(_many_layers(200).SerializeToString())
        with pytest.raises(InvalidUpload, match="exceeds 4096 bytes"):
            inspector.model(path)
        path.write_bytes(_many_layers(2).SerializeToString())
        assert [layer["name"] for layer in inspector.model(path)["layers"]] == ["w0", "w1"]
    finally:
        inspector.close()


@pytest.mark.slow
def test_a_spare_that_died_while_waiting_is_never_handed_out(tmp_path):
    import signal

    inspector = _small_inspector()
    inspector.start()
    path = tmp_path / "model.onnx"
    path.write_bytes(_many_layers(2).SerializeToString())
    try:
        deadline = time.monotonic() + 30
        while not inspector._spares["upload"] and time.monotonic() < deadline:
            time.sleep(0.05)
        spare = inspector._spares["upload"][0]
        os.kill(spare.pid, signal.SIGKILL)
        spare.process.wait(timeout=10)
        assert len(inspector.model(path)["layers"]) == 2  # answered by a fresh process, not "crashed"
    finally:
        inspector.close()


def _children_running(module: str, exclude_spares: Inspector) -> list[int]:
    """Processes running ``module`` that are not the inspector's idle spares."""
    spares = {child.pid for children in exclude_spares._spares.values() for child in children}
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if module.encode() in command and int(pid) not in spares and int(pid) != os.getpid():
            status = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "Z"
            if status != "Z":
                found.append(int(pid))
    return found


# ---------------------------------------------------------------- real exports (normalisation)


def test_a_paddle_style_model_is_described_normalised(tmp_path):
    """Constant weights listed as layers under their output names, a -1 batch shown as dynamic; the
    opset and IR version are the file's, ``normalization`` says what changed."""
    from service.inspection.checks import inspect_model
    from tests.models import paddle_style_model

    path = tmp_path / "paddle.onnx"
    path.write_bytes(paddle_style_model().SerializeToString())
    limits = Limits(
        max_bytes=MiB, max_decompressed_bytes=MiB, max_archive_members=8, max_dataset_arrays=8, allow_torch=False
    )
    with open(path, "rb") as file:
        described = inspect_model(file, limits)
    assert [layer["name"] for layer in described["layers"]] == ["conv.w"]
    assert described["details"]["inputs"] == [{"name": "x", "dtype": "float32", "shape": [None, 3, 8, 8]}]
    assert (described["opset"], described["details"]["ir_version"]) == (12, 8)
    assert described["details"]["normalization"]["promoted_constants"] == 2


@pytest.mark.zoo
@pytest.mark.parametrize(
    "name", ["ch_PP-OCRv4_det_infer.onnx", "ch_PP-OCRv4_rec_infer.onnx", "ch_ppocr_mobile_v2.0_cls_infer.onnx"]
)
def test_ppocr_is_described_with_the_layer_names_the_analysis_uses(name):
    """paddle2onnx keeps weights in Constant nodes: inspection normalises as load_onnx does, so the
    upload lists the layers (0 before) under the names the sensitivity results will carry."""
    from sensitivity.onnx_program import load_onnx
    from service.inspection.checks import inspect_model
    from tests.zoo.models import resource_or_skip

    path = resource_or_skip("rapidocr_onnxruntime", "models", name)
    limits = Limits(
        max_bytes=64 * MiB,
        max_decompressed_bytes=64 * MiB,
        max_archive_members=8,
        max_dataset_arrays=8,
        allow_torch=False,
    )
    with open(path, "rb") as file:
        described = inspect_model(file, limits)
    names = [layer["name"] for layer in described["layers"]]
    assert names and names == [layer.name for layer in load_onnx(onnx.load(str(path))).layers]
    assert described["details"]["normalization"]["promoted_constants"] > len(names)  # biases too


@pytest.mark.zoo
@sqlite_only
def test_an_already_quantized_upload_is_refused_as_quantized(client, app):
    from tests.zoo.models import resource_or_skip

    body = resource_or_skip("ddddocr", "common_old.onnx").read_bytes()
    before = snapshot(app)
    assert_problem(upload(client, "/v1/models", body), 422, "already quantized", "ConvInteger", "float model")
    assert snapshot(app) == before


def test_float_arrays_are_read_for_non_finite_values_per_axis(monkeypatch):
    """Where a NaN or infinity lies along each axis, read in chunks (here 3 rows at a time), also for
    Fortran-ordered arrays and scalars; integer and finite arrays carry nothing."""
    import service.inspection.checks as inspection

    monkeypatch.setattr(inspection, "FINITE_CHUNK_BYTES", 3 * 4 * 5 * 4)  # 3 rows of [4, 5] float32
    limits = Limits(
        max_bytes=1 << 30,
        max_decompressed_bytes=1 << 30,
        max_archive_members=16,
        max_dataset_arrays=16,
        allow_torch=False,
    )
    state = np.zeros((10, 4, 5), np.float32)
    state[7, 2, 1] = np.nan
    state[8, 3, 1] = np.inf
    fortran = np.asfortranarray(np.ones((6, 3), np.float64))
    fortran[4, 2] = -np.inf
    described = inspection.inspect_dataset(
        io.BytesIO(
            npz_bytes(
                state=state,
                fortran=fortran,
                scalar=np.array(np.nan, np.float32),
                fine=np.ones((10, 2), np.float32),
                ids=np.arange(10),
            )
        ),
        limits,
    )["arrays"]
    assert described["state"]["non_finite"] == {"axes": [[2, 7], [2, 2], [1, 1]]}
    assert described["fortran"]["non_finite"] == {"axes": [[1, 4], [1, 2]]}
    assert described["scalar"]["non_finite"] == {"axes": []}
    assert "non_finite" not in described["fine"] and "non_finite" not in described["ids"]
