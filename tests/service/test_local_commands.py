"""``mpq sensitivity`` and ``mpq plan`` run as real processes on files in tmp_path.

Until ``service/cli/commands.py`` registers the commands, the process runs a fresh parser with
``service.cli.local_commands.register`` (the same handlers, the same exit codes).
"""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from service.cli import local_commands, output
from service.cli.local_commands import register
from tests.models import tiny_onnx_model
from tests.service.helpers import call_mpq, run_mpq


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A two-layer ONNX model, calibration data labelled by the float model, and a mismatching set."""
    root = tmp_path_factory.mktemp("local")
    model = tiny_onnx_model()
    onnx.save(model, root / "model.onnx")
    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    labels = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0].argmax(axis=1)
    np.savez(root / "calib.npz", x=x, labels=labels.astype(np.int64))
    np.savez(root / "wrong.npz", image=x)
    custom = tiny_onnx_model()
    custom.graph.node[1].op_type = "Frobnicate"  # in place of the Relu: an op nobody implements
    onnx.save(custom, root / "custom.onnx")
    return root


@pytest.mark.slow
def test_sensitivity_json(files):
    result = run_mpq(
        "sensitivity",
        "model.onnx",
        "--data",
        "calib.npz",
        "--method",
        "interlayer",
        "--bits",
        "8,4",
        "--max-probes",
        "4",
        "--device",
        "cpu",
        "--json",
        cwd=files,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["method"] == "interlayer" and np.isfinite(document["loss"])
    assert [layer["name"] for layer in document["layers"]] == ["fc1.weight", "fc2.weight"]
    assert [(layer["node_name"], layer["scope"]) for layer in document["layers"]] == [("fc1", ""), ("fc2", "")]
    for layer in document["layers"]:
        assert {"name", "op_type", "n_params", "trace", "avg_trace", "stderr", "probes"} <= set(layer)
        assert layer["probes"] == 4 and layer["avg_trace"] == pytest.approx(layer["trace"] / layer["n_params"])
    interlayer = document["interlayer"]
    assert interlayer["bits"] == [8, 4] and interlayer["layers"] == ["fc1.weight", "fc2.weight"]
    assert len(interlayer["gradient_term"]) == 4 and np.array(interlayer["G"]).shape == (4, 4)
    assert document["timing"]["hvps"] > 0 and "total_s" in document["timing"]
    execution = document["execution"]
    assert execution["traces"]["probes"] == 4 and execution["hvp_method"] in ("double_backward", "forward_over_reverse")
    assert execution["budget"]["memory_budget_mb"] == 4096
    assert "ETA" in result.stderr, "progress goes to stderr, with an ETA for the probes"


def test_the_sensitivity_document_reads_results_as_from_dict_does():
    """The document is built from the result as data (the light client install has no torch to
    rebuild the dataclasses): current results in full, and results stored before loss_reason, node
    names, timings or execution existed with the defaults SensitivityResult.from_dict gives them."""
    from sensitivity.results import (
        InterLayerTerms,
        LayerEigen,
        LayerInfo,
        LayerTrace,
        SensitivityResult,
        TraceConfig,
    )

    result = SensitivityResult(
        config=TraceConfig(seed=3),
        layers=(
            LayerInfo("fc1.weight", "Gemm", (6, 8), 48, 0, "fc1", "net.fc1"),
            LayerInfo("fc2.weight", "MatMul", (6, 3), 18, 1),
        ),
        loss_kind="cross_entropy",
        loss=1.5,
        num_samples=32,
        traces=(LayerTrace("fc1.weight", 48, 3.0, 0.12, 16), LayerTrace("fc2.weight", 18, 0.9, 0.03, 16)),
        eigenvalues=(LayerEigen("fc1.weight", 0.5, 7, True, 0.01),),
        interlayer=InterLayerTerms(
            labels=(("fc1.weight", 8), ("fc2.weight", 4)),
            matrix=((1.0, 0.1), (0.1, 2.0)),
            gradient_terms=(0.1, 0.2),
            delta_norms_squared=(1.0, 1.0),
            omega=(0.3, 0.4),
            symmetry_error=0.0,
        ),
        timings={"traces": 1.25},
        num_hvps=32,
        device="cpu",
        execution={"batch_size": 32},
        loss_reason="labels given",
    )
    document = output.sensitivity_document("interlayer", result.to_dict())
    first = document["layers"][0]
    assert (first["node_name"], first["scope"], first["avg_trace"], first["probes"]) == ("fc1", "net.fc1", 0.0625, 16)
    assert (first["eigenvalue"], first["eigen_iterations"], first["eigen_converged"]) == (0.5, 7, True)
    assert "eigenvalue" not in document["layers"][1] and document["layers"][1]["node_name"] == ""
    assert document["interlayer"]["bits"] == [8, 4] and document["interlayer"]["G"] == [[1.0, 0.1], [0.1, 2.0]]
    assert document["timing"] == {"traces_s": 1.25, "hvps": 32, "device": "cpu"}
    assert (document["seed"], document["loss_reason"], document["execution"]) == (3, "labels given", {"batch_size": 32})

    stored = result.to_dict()
    for key in ("loss_reason", "timings", "num_hvps", "device", "versions", "normalization", "execution", "seed"):
        del stored[key]
    for layer in stored["layers"]:
        del layer["node_name"], layer["scope"]
    old = output.sensitivity_document("interlayer", stored)
    assert old == output.sensitivity_document("interlayer", SensitivityResult.from_dict(stored).to_dict())
    assert old["timing"] == {"hvps": 0, "device": ""} and old["layers"][0]["node_name"] == ""


@pytest.mark.slow
def test_sensitivity_table_and_eigenvalues(files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    status, out, err = call_mpq(
        "sensitivity",
        "model.onnx",
        "--data",
        "calib.npz",
        "--method",
        "hawq_v1",
        "--max-probes",
        "5",
        "--device",
        "cpu",
        capsys=capsys,
    )
    assert status == 0, err
    assert "fc1.weight" in out and "eigenvalue" in out
    header = next(line for line in out.splitlines() if line.startswith("layer"))
    assert header.split()[:3] == ["layer", "node", "op"]
    assert [line.split()[:3] for line in out.splitlines() if line.startswith("fc")] == [
        ["fc1.weight", "fc1", "Gemm"],
        ["fc2.weight", "fc2", "MatMul"],
    ]
    assert re.search(r"^batch \d+ x \d+ probes per pass, (double_backward|forward_over_reverse)", out, re.M)


@pytest.mark.slow
def test_plan_json_writes_the_artifact(files):
    result = run_mpq(
        "plan",
        "model.onnx",
        "--data",
        "calib.npz",
        "--candidates",
        "fp32,w8a8,w4a8",
        "--max-bops",
        "30000",
        "--method",
        "hawq_v2",
        "--max-probes",
        "4",
        "--max-frontier-points",
        "2",
        "--device",
        "cpu",
        "--metric",
        "cosine",
        "--exclude",
        "fc2",
        "--out",
        "q.onnx",
        "--json",
        cwd=files,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    plan = document["plan"]
    # --metric reaches every measurement: the tiny [N, 3] classifier is measured by output cosine
    assert document["request"]["metric"] == "cosine" and plan["measured"]["metric_name"] == "cosine"
    assert "metric='cosine'" in plan["measured"]["metric_reason"] and plan["measured"]["baseline"] == 100.0
    assert all(point["measured"]["metric_name"] == "cosine" for point in document["frontier"] if point["measured"])
    assert set(plan["layers"]) == {"fc1.weight", "fc2.weight"}
    # --exclude (here the node name) keeps fc2.weight fp32 at every point; the document says why, and names nodes
    assert document["request"]["exclude"] == ["fc2"]
    assert all(point["layers"]["fc2.weight"] == "fp32" for point in [plan, *document["frontier"]])
    assert document["excluded"] == [
        {
            "layer": "fc2.weight",
            "node_name": "fc2",
            "scope": "",
            "reason": "exclude pattern 'fc2'",
            "candidates": ["fp32"],
        }
    ]
    assert document["layer_nodes"] == {
        "fc1.weight": {"node_name": "fc1", "scope": ""},
        "fc2.weight": {"node_name": "fc2", "scope": ""},
    }
    assert plan["predicted"]["bops"] <= 30000  # fc1 (48 MACs) cannot stay fp32: 48 x 32 x 32 + 18 x 32 x 32 > 30000
    assert {"metric", "baseline", "size_bytes", "latency_ms"} <= set(plan["measured"])
    assert document["evaluations"] >= 1 and document["frontier"]
    assert set(document["activation_terms"]) == {"fc1.weight", "fc2.weight"}
    # measured on the uniform w8a8 export, where the excluded fc2 stays float: its input is not quantized there
    assert document["activation_terms"]["fc1.weight"]["tensors"]
    artifact = files / "q.onnx"
    assert document["artifact"] == "q.onnx" and artifact.stat().st_size == plan["measured"]["size_bytes"]
    x = np.load(files / "calib.npz")["x"]
    assert ort.InferenceSession(str(artifact)).run(None, {"x": x})[0].shape == (64, 3)


@pytest.mark.slow
def test_plan_summary_lists_nodes_and_exclusions(files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    status, out, err = call_mpq(
        "plan",
        "model.onnx",
        "--data",
        "calib.npz",
        "--candidates",
        "fp32,w8a8",
        "--max-size-mb",
        "1",
        "--method",
        "hawq_v2",
        "--max-probes",
        "2",
        "--max-frontier-points",
        "1",
        "--device",
        "cpu",
        "--exclude",
        "fc1.weight",
        "--exclude",
        "nope,fc2",
        "--out",
        "s.onnx",
        capsys=capsys,
    )
    assert status == 2 and "['nope'] match no layer" in err and "'fc1.weight' (node 'fc1')" in err
    status, out, err = call_mpq(
        "plan",
        "model.onnx",
        "--data",
        "calib.npz",
        "--candidates",
        "fp32,w8a8",
        "--max-size-mb",
        "1",
        "--method",
        "hawq_v2",
        "--max-probes",
        "2",
        "--max-frontier-points",
        "1",
        "--device",
        "cpu",
        "--exclude",
        "fc1.weight",
        "--out",
        "s.onnx",
        capsys=capsys,
    )
    assert status == 0, err
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("fc")}
    assert rows["fc1.weight"].split()[1:] == ["fc1", "fp32", "(excluded:", "exclude", "pattern", "'fc1.weight')"]
    assert rows["fc2.weight"].split()[1] == "fc2"


def test_exclude_patterns_are_repeatable_and_comma_separated():
    from service.cli.options import exclude_patterns

    assert exclude_patterns(["a,b", " c ", ",", "/x/*"]) == ("a", "b", "c", "/x/*")


def test_the_cli_offers_the_library_metrics():
    from planner.evaluate import METRICS
    from service.cli.local_commands import PLAN_METRICS

    assert PLAN_METRICS == METRICS


def test_the_cli_offers_the_library_baselines():
    from planner.request import BASELINES
    from planner.result import BASELINES as RESULT_BASELINES
    from service.cli.local_commands import PLAN_BASELINES

    assert PLAN_BASELINES == BASELINES == RESULT_BASELINES


@pytest.mark.parametrize("where", [(), ("--server", "http://127.0.0.1:9")])
def test_a_bad_baseline_exits_2_naming_the_choices_locally_and_remotely(files, capsys, monkeypatch, where):
    """Refused by the option parser, before any file is read or any server is called."""
    monkeypatch.chdir(files)
    with pytest.raises(SystemExit) as exit_info:
        call_mpq("plan", "model.onnx", "--data", "calib.npz", "--baseline", "bf16", *where, capsys=capsys)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "--baseline: invalid choice: 'bf16'" in err and "'fp32', 'fp16'" in err and "Traceback" not in err


def test_the_cli_offers_the_library_objectives():
    from planner.request import OBJECTIVES
    from service.cli.local_commands import PLAN_OBJECTIVES

    assert PLAN_OBJECTIVES == OBJECTIVES


def test_the_cli_offers_the_library_hvp_methods_and_memory_budget():
    from sensitivity import results

    assert local_commands.HVP_CHOICES == results.HVP_CHOICES
    assert local_commands.DEFAULT_MEMORY_BUDGET_MB == results.DEFAULT_MEMORY_BUDGET_MB


def test_budget_options_reach_the_configuration():
    from service.cli.options import plan_request, sensitivity_config

    parser = argparse.ArgumentParser(prog="mpq")
    register(parser.add_subparsers())
    args = parser.parse_args(
        [
            "sensitivity",
            "m.onnx",
            "--data",
            "d.npz",
            "--method",
            "hawq_v2",
            "--memory-budget-mb",
            "0",
            "--time-budget-s",
            "30",
            "--hvp-method",
            "forward_over_reverse",
        ]
    )
    config = sensitivity_config(args)
    assert (config.memory_budget_mb, config.time_budget_s, config.hvp_method) == (None, 30.0, "forward_over_reverse")
    args = parser.parse_args(["plan", "m.onnx", "--data", "d.npz", "--memory-budget-mb", "2048"])
    assert plan_request(args).sensitivity_config().memory_budget_mb == 2048


def test_plan_and_sensitivity_read_candidates_alike():
    """Spaces after the commas are ignored by both commands."""
    from service.cli.options import plan_request, sensitivity_config

    parser = argparse.ArgumentParser(prog="mpq")
    register(parser.add_subparsers())
    plan_args = parser.parse_args(["plan", "m.onnx", "--data", "d.npz", "--candidates", "fp32, w8a8 ,w4"])
    assert plan_request(plan_args).candidates == ("fp32", "w8a8", "w4")
    sensitivity_args = parser.parse_args(["sensitivity", "m.onnx", "--data", "d.npz", "--candidates", "w8a8, w4"])
    assert sensitivity_config(sensitivity_args).candidates == ("w8a8", "w4")


@pytest.mark.slow
def test_plan_impossible_budget_exits_3(files):
    result = run_mpq(
        "plan", "model.onnx", "--data", "calib.npz", "--max-size-mb", "0.00001", "--out", "none.onnx", cwd=files
    )
    assert result.returncode == 3, result.stderr
    assert "cheapest" in result.stderr
    assert not (files / "none.onnx").exists()
    as_json = run_mpq(
        "plan",
        "model.onnx",
        "--data",
        "calib.npz",
        "--max-size-mb",
        "0.00001",
        "--out",
        "none.onnx",
        "--json",
        cwd=files,
    )
    document = json.loads(as_json.stdout)  # one document on stdout whatever the exit code
    assert as_json.returncode == document["exit_code"] == 3 and document["problem"] == "infeasible"
    assert document["error"].startswith("no feasible plan: ") and document["job_id"] is None
    bad = run_mpq("plan", "model.onnx", "--data", "wrong.npz", "--max-size-mb", "1", "--json", cwd=files)
    assert bad.returncode == json.loads(bad.stdout)["exit_code"] == 2


@pytest.mark.slow
def test_mismatching_arrays_exit_2_in_a_real_process(files):
    result = run_mpq("plan", "model.onnx", "--data", "wrong.npz", cwd=files)
    assert result.returncode == 2, result.stderr
    assert "does not match the model inputs" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("plan", "missing.onnx", "--data", "calib.npz"), "no such file"),
        (("plan", "model.onnx", "--data", "missing.npz"), "no such file"),
        (("plan", "model.onnx", "--data", "calib.npz", "--candidates", "fp32,w3a3"), "unknown candidate"),
        (("plan", "model.onnx", "--data", "calib.npz", "--search", "bisection"), "needs max_drop"),
        (("plan", "custom.onnx", "--data", "calib.npz"), "Frobnicate"),
        (("sensitivity", "model.onnx", "--data", "wrong.npz"), "does not match the model inputs"),
        (("sensitivity", "calib.npz", "--data", "calib.npz"), "not a valid ONNX model"),
        (("sensitivity", "model.onnx", "--data", "calib.npz", "--method", "interlayer", "--bits", "8,x"), "--bits"),
        (("plan", "model.onnx", "--data", "calib.npz", "--max-probes", "8"), "--method measured does not run"),
        (("plan", "model.onnx", "--data", "calib.npz", "--method", "fisher", "--max-probes", "8"), "Hutchinson"),
    ],
)
def test_bad_input_exits_2(files, capsys, monkeypatch, arguments, message):
    monkeypatch.chdir(files)
    status, out, err = call_mpq(*arguments, capsys=capsys)
    assert status == 2, err
    assert message in err and out == ""


@pytest.mark.zoo
@pytest.mark.parametrize("command", ["sensitivity", "plan"])
def test_an_already_quantized_model_exits_2_naming_it(command, tmp_path, capsys):
    """Refused as quantized before the data is checked (its batch of 2 does not fit the model's 1)."""
    from tests.zoo.models import resource_or_skip

    model = resource_or_skip("ddddocr", "common_old.onnx")
    np.savez(tmp_path / "data.npz", input1=np.zeros((2, 1, 64, 128), np.float32))
    out_option = ("--out", str(tmp_path / "q.onnx")) if command == "plan" else ()
    status, out, err = call_mpq(command, str(model), "--data", str(tmp_path / "data.npz"), *out_option, capsys=capsys)
    assert status == 2 and out == ""
    assert "already quantized" in err and "ConvInteger" in err and "Traceback" not in err
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.slow
def test_sensitivity_of_a_paddle_style_model_names_its_constant_layers(tmp_path, capsys):
    """Weights in Constant nodes and a -1 batch: normalised, said on stderr, analysed under their names."""
    from tests.models import paddle_style_model

    onnx.save(paddle_style_model(), tmp_path / "paddle.onnx")
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32))
    status, out, err = call_mpq(
        "sensitivity",
        str(tmp_path / "paddle.onnx"),
        "--data",
        str(tmp_path / "data.npz"),
        "--method",
        "hawq_v2",
        "--max-probes",
        "2",
        "--device",
        "cpu",
        "--json",
        capsys=capsys,
    )
    assert status == 0, err
    assert [layer["name"] for layer in json.loads(out)["layers"]] == ["conv.w"]
    assert "normalised the model: 2 Constant nodes became initializers" in err and "x[0]" in err


@pytest.mark.slow
def test_a_finished_sensitivity_is_reused_by_the_next_sensitivity_and_plan(files, capsys, monkeypatch, tmp_path):
    """`mpq plan` recomputed what `mpq sensitivity` had just computed (529 of 637 s on a real model)."""
    monkeypatch.chdir(files)
    monkeypatch.setenv("MPQ_CACHE_DIR", str(tmp_path / "cache"))
    options = ("--method", "hawq_v2", "--max-probes", "4", "--device", "cpu", "--json")
    status, first, err = call_mpq("sensitivity", "model.onnx", "--data", "calib.npz", *options, capsys=capsys)
    assert status == 0 and "reusing" not in err, err
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    status, again, err = call_mpq("sensitivity", "model.onnx", "--data", "calib.npz", *options, capsys=capsys)
    assert status == 0 and "reusing the result cached" in err
    assert json.loads(again)["layers"] == json.loads(first)["layers"]
    status, _, err = call_mpq("sensitivity", "model.onnx", "--data", "calib.npz", *options, "--no-cache", capsys=capsys)
    assert status == 0 and "reusing" not in err
    status, planned, err = call_mpq(
        "plan",
        "model.onnx",
        "--data",
        "calib.npz",
        "--candidates",
        "fp32,w8",
        "--max-frontier-points",
        "1",
        "--out",
        str(tmp_path / "q.onnx"),
        *options,
        capsys=capsys,
    )
    assert status in (0, 3) and "reusing the result cached" in err, err
    assert json.loads(planned)["plan"]
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1  # a hit stores nothing new
    status, _, err = call_mpq(
        "plan",
        "model.onnx",
        "--data",
        "calib.npz",
        "--candidates",
        "fp32,w8",
        "--max-frontier-points",
        "1",
        "--out",
        str(tmp_path / "q.onnx"),
        "--method",
        "hawq_v2",
        "--max-probes",
        "5",
        "--device",
        "cpu",
        capsys=capsys,
    )
    assert status in (0, 3) and "reusing" not in err, err  # other settings: computed, then stored
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2


def test_a_torn_cache_entry_is_a_miss(tmp_path):
    from service.cli.local_cache import SensitivityCache

    cache = SensitivityCache(tmp_path)
    key = cache.key("a" * 64, "b" * 64, {"type": "TraceConfig"})
    (tmp_path / f"{key}.json").write_text('{"config": ')
    assert cache.get(key) is None
    assert cache.key("a" * 64, "b" * 64, {"type": "TraceConfig", "seed": 1}) != key


def test_the_sample_axis_spelling_is_parsed():
    from service.cli.options import parse_sample_axis

    assert parse_sample_axis("state=1") == ("state", 1)
    assert parse_sample_axis(" sr = None ") == ("sr", None)
    assert parse_sample_axis("a=b=2") == ("a=b", 2)  # ONNX names may hold '='; the axis follows the last one
    for bad in ("state", "state=", "=1", "state=-1", "state=x", "state=1.5"):
        with pytest.raises(ValueError, match="NAME=AXIS"):
            parse_sample_axis(bad)


def test_sample_axes_are_repeatable_and_none_means_shared():
    from service.cli.options import BadInput, sample_axes_option

    assert sample_axes_option(["state=1", "sr=none", "state=1"]) == {"state": 1, "sr": None}
    with pytest.raises(BadInput, match="two axes: 1 and 0"):
        sample_axes_option(["state=1", "state=0"])
    with pytest.raises(BadInput, match="NAME=AXIS"):
        sample_axes_option(["state:1"])


@pytest.mark.slow
def test_sensitivity_and_plan_take_the_sample_axes(tmp_path, capsys, monkeypatch):
    """A state with samples on axis 1 and a scalar sample rate, declared loosely: --sample-axis says where
    the samples are, the cache keeps results apart by it, and the artifact runs on the scalar."""
    from tests.models import loose_data, loosely_declared_stateful_model, stateful_data, stateful_onnx_model

    monkeypatch.chdir(tmp_path)
    onnx.save(loosely_declared_stateful_model(), tmp_path / "state.onnx")
    np.savez(tmp_path / "data.npz", **loose_data(24))
    common = ("--data", "data.npz", "--method", "hawq_v2", "--max-probes", "4", "--device", "cpu", "--json")
    status, out, err = call_mpq("sensitivity", "state.onnx", *common, capsys=capsys)
    assert status == 2 and "different numbers of samples" in err and "'state' 2 (axis 0" in err
    axes = ("--sample-axis", "state=1", "--sample-axis", "sr=none")
    status, out, err = call_mpq("sensitivity", "state.onnx", *common, *axes, capsys=capsys)
    assert status == 0, err
    assert [layer["name"] for layer in json.loads(out)["layers"]] == ["fc1.weight", "fc2.weight"]
    status, out, err = call_mpq("sensitivity", "state.onnx", *common, "--sample-axis", "state=1", capsys=capsys)
    assert status == 2 and "reusing" not in err and "'sr' 1 (axis 0" in err  # another key, and sr per sample again
    status, out, err = call_mpq(
        "plan",
        "state.onnx",
        *common,
        *axes,
        "--candidates",
        "fp32,w8a8,w4",
        "--max-bops",
        "40000",
        "--max-frontier-points",
        "1",
        "--out",
        "q.onnx",
        capsys=capsys,
    )
    assert status == 0 and "reusing the result cached" in err, err
    document = json.loads(out)
    assert document["request"]["sample_axes"] == {"state": 1, "sr": None}
    assert document["plan"]["measured"]["num_samples"] == 24
    y, state = ort.InferenceSession(str(tmp_path / "q.onnx")).run(None, loose_data(5))
    assert y.shape == (5, 3) and state.shape == (2, 5, 4)
    status, _, err = call_mpq(
        "plan", "state.onnx", *common, *axes, "--server", "http://127.0.0.1:9", "--timeout", "2", capsys=capsys
    )  # carried to a server (tests/service/test_remote_cli.py): none here
    assert status == 1 and "cannot reach the server" in err
    onnx.save(stateful_onnx_model(), tmp_path / "declared.onnx")
    np.savez(tmp_path / "declared.npz", **stateful_data(24))
    status, out, err = call_mpq(
        "sensitivity",
        "declared.onnx",
        "--data",
        "declared.npz",
        "--method",
        "hawq_v2",
        "--max-probes",
        "4",
        "--device",
        "cpu",
        "--json",
        capsys=capsys,
    )
    assert status == 0, err  # declared shapes need no --sample-axis


def _plan_document(drop: float, max_drop: float | None) -> dict:
    measured = {
        "metric_name": "step_agreement",
        "metric": 100.0 - drop,
        "baseline": 100.0,
        "drop": drop,
        "size_bytes": 10,
        "latency_ms": {"p50": 1.0, "mean": 1.0, "p90": 1.0, "device": "cpu"},
    }
    plan = {
        "layers": {"fc1.weight": "w4"},
        "measured": measured,
        "predicted": {"omega": 1.0, "loss_change": 1.0, "size_bytes": 10, "bops": 10},
    }
    return {
        "plan": plan,
        "request": {"max_drop": max_drop},
        "meets_constraints": True,
        "evaluations": 1,
        "artifact": "q.onnx",
    }


def test_a_large_unbounded_drop_is_a_warning_and_a_bounded_one_is_not(capsys):
    """The zoo's recogniser lost 52.8 pp under --max-size-mb alone and mpq said nothing."""
    assert output.report_plan(_plan_document(52.8, None), as_json=True) == 0
    err = capsys.readouterr().err
    assert (
        "mpq: warning: the plan's step_agreement dropped 52.80 pp (47.20 % against 100.00 % for the float "
        "model) and nothing bounded it: give --max-drop"
    ) in err
    assert output.plan_warnings(_plan_document(output.LARGE_DROP_PP, None)) == []
    assert output.plan_warnings(_plan_document(52.8, 60.0)) == []  # the user bounded it


def test_a_plan_measured_slower_than_float_is_a_warning_and_its_ratio_is_shown(capsys):
    """w8 measured 1.3-1.5x float on every CNN measured (issue 13): a plan never reads as faster without it."""
    document = _plan_document(0.5, None)
    measured = document["plan"]["measured"]
    measured.update(latency_ratio_to_float=1.4, latency_ratio_spread=0.05, float_latency_p50_ms=0.7)
    assert output.report_plan(document, as_json=False) == 0
    captured = capsys.readouterr()
    assert "latency p50 1.000 ms, 1.40x float (+-0.05) (mean" in captured.out
    assert (
        "mpq: warning: the plan measured slower than the float model: 1.40x its latency (+-0.05, timed "
        "interleaved in one run)"
    ) in captured.err
    measured["latency_ratio_to_float"] = 1.04  # within its spread: not slower
    assert output.plan_warnings(document) == []
    for key in ("latency_ratio_to_float", "latency_ratio_spread", "float_latency_p50_ms"):
        del measured[key]  # a plan stored before interleaved timing
    assert output.plan_warnings(document) == [] and "x float" not in output.plan_summary(document)


@pytest.fixture(scope="module")
def pt2_files(tmp_path_factory):
    """The trained digits CNN (BatchNorm after each conv) as torch.export archives with a dynamic batch
    and with a fixed batch of 4, calibration data and an evaluation set of 448 samples (a multiple of 4)."""
    import torch

    from tests.models import trained_digits_module
    from tests.pt2_archives import save_exported

    root = tmp_path_factory.mktemp("pt2")
    module, data = trained_digits_module()
    example = (torch.from_numpy(data.train_x[:4]),)
    save_exported(module, example, root / "dynamic.pt2", dynamic=True)
    save_exported(module, example, root / "fixed.pt2", dynamic=False)
    np.savez(root / "calib.npz", x=data.train_x[:256], labels=data.train_y[:256])
    np.savez(root / "eval.npz", x=data.test_x[:448], labels=data.test_y[:448])
    return root


def _artifact_accuracy(artifact, x: np.ndarray, labels: np.ndarray, batch: int) -> float:
    session = ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])
    logits = np.concatenate([session.run(None, {"x": x[i : i + batch]})[0] for i in range(0, len(x), batch)])
    return 100.0 * float((logits.argmax(1) == labels).mean())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("archive", "search", "batch"),
    [
        ("dynamic.pt2", ("--search", "pareto", "--max-size-mb", "0.03"), 448),
        ("fixed.pt2", ("--search", "bisection", "--max-drop", "1.5"), 4),
    ],
)
def test_a_pt2_plans_like_an_onnx_model(pt2_files, archive, search, batch):
    result = run_mpq(
        "plan",
        archive,
        "--data",
        "calib.npz",
        "--eval-data",
        "eval.npz",
        *search,
        "--method",
        "hawq_v2",
        "--max-probes",
        "32",
        "--max-frontier-points",
        "3",
        "--device",
        "cpu",
        "--no-cache",
        "--out",
        f"{archive}.onnx",
        "--json",
        cwd=pt2_files,
    )
    assert result.returncode == 0, result.stderr
    assert (
        "exported to ONNX by torch.onnx.export" in result.stderr
        and "checked against the torch program" in result.stderr
    )
    document = json.loads(result.stdout)
    plan = document["plan"]
    assert set(plan["layers"]) == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}  # parameter names
    assert plan["layers"] != dict.fromkeys(plan["layers"], "fp32") and document["meets_constraints"]
    evaluation = np.load(pt2_files / "eval.npz")
    accuracy = _artifact_accuracy(pt2_files / f"{archive}.onnx", evaluation["x"], evaluation["labels"], batch)
    assert plan["measured"]["metric_name"] == "top1_accuracy"
    assert accuracy == pytest.approx(plan["measured"]["metric"], abs=1e-6)


@pytest.fixture(scope="module")
def digits_cli_files(tmp_path_factory):
    """The trained digits CNN (tests/models.py) with labelled calibration and evaluation sets."""
    from tests.models import trained_digits_onnx

    root = tmp_path_factory.mktemp("digits")
    proto, _, data = trained_digits_onnx()
    onnx.save(proto, root / "model.onnx")
    np.savez(root / "calib.npz", input=data.train_x[:256], labels=data.train_y[:256].astype(np.int64))
    np.savez(root / "eval.npz", input=data.test_x, labels=data.test_y.astype(np.int64))
    return root


def test_fisher_sensitivity_on_the_digits_cnn(digits_cli_files, capsys, monkeypatch):
    monkeypatch.chdir(digits_cli_files)
    options = ("--method", "fisher", "--bits", "8,4", "--device", "cpu", "--no-cache")
    status, out, err = call_mpq("sensitivity", "model.onnx", "--data", "calib.npz", *options, "--json", capsys=capsys)
    assert status == 0, err
    document = json.loads(out)
    fisher = document["fisher"]
    layers = [layer["name"] for layer in document["layers"]]
    assert document["method"] == "fisher" and document["loss_kind"] == "cross_entropy"
    assert fisher["bits"] == [8, 4] and fisher["samples"] == 256 and list(fisher["fisher_trace"]) == layers
    assert [tuple(label) for label in fisher["labels"]] == [(name, b) for name in layers for b in (8, 4)]
    changes = dict(zip(map(tuple, fisher["labels"]), fisher["loss_change"]))
    assert all(0 < error < change for change, error in zip(fisher["loss_change"], fisher["stderr"]))
    assert all(changes[(name, 4)] > changes[(name, 8)] for name in layers)  # 4 bits perturb more than 8
    assert document["timing"]["hvps"] == 0
    status, table, err = call_mpq("sensitivity", "model.onnx", "--data", "calib.npz", *options, capsys=capsys)
    assert status == 0 and "empirical Fisher, 256 samples" in table and "ΔL at 4 bits" in table
    status, _, err = call_mpq(
        "sensitivity", "model.onnx", "--data", "calib.npz", *options, "--tol", "0.1", capsys=capsys
    )
    assert status == 2 and "fisher takes one gradient per sample" in err


@pytest.mark.slow
def test_fisher_plan_on_the_digits_cnn_meets_its_budget(digits_cli_files, capsys, monkeypatch):
    monkeypatch.chdir(digits_cli_files)
    budget_mb = 0.03  # 31457 bytes: the float CNN's 85 kB weights cannot stay fp32
    status, out, err = call_mpq(
        "plan",
        "model.onnx",
        "--data",
        "calib.npz",
        "--eval-data",
        "eval.npz",
        "--method",
        "fisher",
        "--candidates",
        "fp32,w8,w4",
        "--max-size-mb",
        str(budget_mb),
        "--max-frontier-points",
        "2",
        "--device",
        "cpu",
        "--no-cache",
        "--out",
        "fisher.onnx",
        "--json",
        capsys=capsys,
    )
    assert status == 0, err
    document = json.loads(out)
    plan = document["plan"]
    assert document["request"]["method"] == "fisher"
    assert plan["measured"]["size_bytes"] <= budget_mb * 2**20 and plan["predicted"]["size_bytes"] <= budget_mb * 2**20
    assert set(plan["layers"].values()) != {"fp32"}
    # Ω is Σ Fᵢᵢ Δᵢ² (HAWQ-V2's convention, no ½) and the predicted ΔL the Fisher's ½ Σ Fᵢᵢ Δᵢ²
    assert plan["predicted"]["omega"] > 0
    assert plan["predicted"]["loss_change"] == pytest.approx(plan["predicted"]["omega"] / 2, rel=1e-9)


def test_the_summary_states_the_plan_against_both_baselines():
    from service.cli.output import against_lines

    measured = {
        "against": {
            "fp32": {"metric": 99.0, "drop": 0.5, "latency_ratio": 0.8, "size_ratio": 0.3},
            "fp16": {"metric": 98.9, "drop": 0.4, "latency_ratio": None, "size_ratio": 0.6},
        }
    }
    lines = against_lines(measured, "fp16")
    assert lines == [
        "against fp32: 99.00 % there, drop 0.50 pp, latency x0.80, size x0.30",
        "against fp16: 98.90 % there, drop 0.40 pp, latency not measured, size x0.60 (--max-drop against this)",
    ]
    assert against_lines({}, "fp32") == []  # plans stored before baselines existed


@pytest.mark.slow
def test_measured_sensitivity_on_the_digits_cnn(digits_cli_files, capsys, monkeypatch):
    monkeypatch.chdir(digits_cli_files)
    options = ("--method", "measured", "--device", "cpu", "--no-cache")
    status, out, err = call_mpq("sensitivity", "model.onnx", "--data", "calib.npz", *options, "--json", capsys=capsys)
    assert status == 0, err
    document = json.loads(out)
    measured = document["measured"]
    layers = [layer["name"] for layer in document["layers"]]
    candidates = ["w8a8", "w4a8", "w8", "w4"]
    assert document["method"] == "measured" and document["loss_kind"] == "cross_entropy"
    assert measured["candidates"] == candidates and measured["layers"] == layers and measured["samples"] == 256
    assert measured["quantity"] == "kl"  # auto: the digits CNN's output is class scores
    assert [tuple(label) for label in measured["labels"]] == [(name, c) for name in layers for c in candidates]
    assert all(error > 0 for error in measured["stderr"])
    changes = dict(zip(map(tuple, measured["labels"]), measured["loss_change"]))
    assert sum(changes[(name, "w4")] for name in layers) > sum(changes[(name, "w8")] for name in layers)
    assert document["timing"]["hvps"] == 0
    status, table, err = call_mpq("sensitivity", "model.onnx", "--data", "calib.npz", *options, capsys=capsys)
    assert (
        status == 0 and "measured in onnxruntime, each layer alone, 256 samples: KL" in table and "KL at w4a8" in table
    )
    status, _, err = call_mpq(
        "sensitivity", "model.onnx", "--data", "calib.npz", *options, "--max-probes", "8", capsys=capsys
    )
    assert status == 2 and "measured runs each layer quantized alone" in err


@pytest.mark.slow
def test_measured_sensitivity_takes_its_candidates_and_quantity(digits_cli_files, capsys, monkeypatch):
    monkeypatch.chdir(digits_cli_files)
    options = ("--method", "measured", "--device", "cpu", "--no-cache", "--candidates", "w4, w8", "--json")
    for quantity in ("loss", "kl"):
        status, out, err = call_mpq(
            "sensitivity", "model.onnx", "--data", "calib.npz", *options, "--quantity", quantity, capsys=capsys
        )
        assert status == 0, err
        measured = json.loads(out)["measured"]
        assert measured["candidates"] == ["w4", "w8"] and measured["quantity"] == quantity
        assert len(measured["labels"]) == 2 * len(measured["layers"])


@pytest.mark.parametrize(
    ("method", "option", "message"),
    [
        ("hawq_v2", ("--bits", "8,4"), "--bits is read by --method interlayer or fisher only"),
        ("measured", ("--bits", "4"), "--method measured ignores it"),
        ("interlayer", ("--candidates", "w8"), "--candidates is read by --method measured only"),
        ("fisher", ("--quantity", "kl"), "--quantity is read by --method measured only"),
        ("measured", ("--candidates", "w8,fp32"), "fp32 changes nothing"),
    ],
)
def test_an_option_the_method_does_not_read_exits_2(files, capsys, monkeypatch, method, option, message):
    monkeypatch.chdir(files)
    status, out, err = call_mpq(
        "sensitivity", "model.onnx", "--data", "calib.npz", "--method", method, *option, capsys=capsys
    )
    assert status == 2 and message in err and out == "", err


@pytest.mark.slow
def test_measured_plan_on_the_digits_cnn_meets_its_budget(digits_cli_files, capsys, monkeypatch):
    monkeypatch.chdir(digits_cli_files)
    budget_mb = 0.03
    options = ("--method", "measured", "--candidates", "fp32,w8,w4", "--max-size-mb", str(budget_mb))
    status, out, err = call_mpq(
        "plan",
        "model.onnx",
        "--data",
        "calib.npz",
        "--eval-data",
        "eval.npz",
        *options,
        "--max-frontier-points",
        "2",
        "--device",
        "cpu",
        "--no-cache",
        "--out",
        "measured.onnx",
        "--json",
        capsys=capsys,
    )
    assert status == 0, err
    document = json.loads(out)
    plan = document["plan"]
    assert document["request"]["method"] == "measured"
    assert plan["measured"]["size_bytes"] <= budget_mb * 2**20
    assert set(plan["layers"].values()) != {"fp32"}
    # Ω = 2ΔL summed over the layers, each measured alone (negative changes count as 0)
    assert plan["predicted"]["loss_change"] == pytest.approx(plan["predicted"]["omega"] / 2, rel=1e-9)
