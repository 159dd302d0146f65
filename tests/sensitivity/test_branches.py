"""If nodes fixed by the calibration data (sensitivity.branches through normalize_model): which
are fixed, which are not, what the fixed model computes, and the layers that appear."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper

from sensitivity.branches import fix_branches
from sensitivity.layers import find_layers
from sensitivity.normalize import normalize_model

RNG = np.random.default_rng(0)
W_THEN, W_ELSE, W_INNER = (RNG.normal(size=(4, 4)).astype(np.float32) for _ in range(3))


def _constant(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(array, name))


def _matmul_branch(name: str, weight: np.ndarray, source: str, extra: Sequence[onnx.NodeProto] = ()) -> onnx.GraphProto:
    """y = source @ weight (a Constant inside the branch, as silero and paddle2onnx write weights)."""
    nodes = [
        _constant(f"{name}.weight", weight),
        helper.make_node("MatMul", [source, f"{name}.weight"], [f"{name}.y"], name=f"{name}/MatMul"),
        *extra,
    ]
    out = extra[-1].output[0] if extra else f"{name}.y"
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])


def _model(
    condition_nodes: list[onnx.NodeProto],
    then_branch: onnx.GraphProto,
    else_branch: onnx.GraphProto,
    extra_inputs: Sequence[onnx.ValueInfoProto] = (),
) -> onnx.ModelProto:
    nodes = [
        *condition_nodes,
        helper.make_node("If", ["cond"], ["y"], name="If_0", then_branch=then_branch, else_branch=else_branch),
    ]
    graph = helper.make_graph(
        nodes,
        "branches",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]), *extra_inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _on_mode(then_branch: onnx.GraphProto) -> onnx.ModelProto:
    """If mode == 1 (a scalar input, the same for every sample, like silero's sample rate)."""
    condition = [_constant("one", np.array(1, dtype=np.int64)), helper.make_node("Equal", ["mode", "one"], ["cond"])]
    return _model(
        condition,
        then_branch,
        _matmul_branch("else", W_ELSE, "x"),
        [helper.make_tensor_value_info("mode", TensorProto.INT64, [])],
    )


def _nested() -> onnx.ModelProto:
    """The then branch holds a second If on the same scalar, with its own weight."""
    inner_condition = [
        _constant("then.one", np.array(1, dtype=np.int64)),
        helper.make_node("Equal", ["mode", "then.one"], ["then.cond"]),
    ]
    inner = helper.make_node(
        "If",
        ["then.cond"],
        ["then.z"],
        name="If_inner",
        then_branch=_matmul_branch("inner", W_INNER, "then.y"),
        else_branch=helper.make_graph(
            [helper.make_node("Identity", ["then.y"], ["then.id"])],
            "inner_else",
            [],
            [helper.make_tensor_value_info("then.id", TensorProto.FLOAT, None)],
        ),
    )
    return _on_mode(_matmul_branch("then", W_THEN, "x", [*inner_condition, inner]))


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _samples(mode: int, count: int = 20) -> dict[str, np.ndarray]:
    return {"x": RNG.normal(size=(count, 4)).astype(np.float32), "mode": np.array(mode, dtype=np.int64)}


def test_an_if_on_a_scalar_the_data_fixes_becomes_its_taken_branch_nested_ones_too() -> None:
    model, samples = _nested(), _samples(mode=1)
    normalized = normalize_model(model, samples=samples)
    assert [(fixed.node, fixed.branch) for fixed in normalized.fixed_branches] == [
        ("If_0", "then_branch"),
        ("If_inner", "then_branch"),
    ]
    assert not any(node.op_type == "If" for node in normalized.model.graph.node)
    # the weights inside the branches taken are layers now; the one of the branch not taken is gone
    assert {layer.name for layer in find_layers(normalized.model)} == {"then.weight", "inner.weight"}
    np.testing.assert_allclose(_run(normalized.model, samples), samples["x"] @ W_THEN @ W_INNER, rtol=1e-5)
    assert normalized.branch_check is not None and normalized.branch_check.max_relative_difference < 1e-6
    assert normalized.changes()[0] == (
        "If 'If_0' replaced by its then_branch: its condition 'cond' was true on every calibration batch"
    )
    assert [value.name for value in normalized.model.graph.input] == ["x", "mode"]  # the interface is kept


def test_the_other_value_takes_the_other_branch() -> None:
    normalized = normalize_model(_nested(), samples=_samples(mode=0))
    assert [(fixed.node, fixed.branch) for fixed in normalized.fixed_branches] == [("If_0", "else_branch")]
    assert {layer.name for layer in find_layers(normalized.model)} == {"else.weight"}


def test_without_samples_no_branch_is_fixed() -> None:
    normalized = normalize_model(_nested())
    assert normalized.fixed_branches == () and find_layers(normalized.model) == []


def test_a_condition_on_the_values_that_changes_between_batches_is_kept() -> None:
    """sum(x) > 0 differs between the calibration batches: it stays a run-time If."""
    condition = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        _constant("zero", np.array(0, dtype=np.float32)),
        helper.make_node("Greater", ["total", "zero"], ["cond"]),
    ]
    model = _model(condition, _matmul_branch("then", W_THEN, "x"), _matmul_branch("else", W_ELSE, "x"))
    normalized = normalize_model(model, samples={"x": RNG.normal(size=(64, 4)).astype(np.float32)})
    assert normalized.fixed_branches == ()
    assert any(node.op_type == "If" for node in normalized.model.graph.node)


def test_a_condition_on_the_batch_size_is_kept() -> None:
    """Exporters write squeeze-if-size-1 as an If on a shape: batch 1 (latency runs) takes the
    other branch than the calibration batches, so it cannot be fixed."""
    condition = [
        helper.make_node("Shape", ["x"], ["shape"], end=1),
        _constant("single", np.array([1], dtype=np.int64)),
        helper.make_node("Equal", ["shape", "single"], ["cond"]),
    ]
    model = _model(condition, _matmul_branch("then", W_THEN, "x"), _matmul_branch("else", W_ELSE, "x"))
    assert normalize_model(model, samples={"x": RNG.normal(size=(16, 4)).astype(np.float32)}).fixed_branches == ()


def test_a_graph_without_ifs_is_returned_as_it_is() -> None:
    model = _on_mode(_matmul_branch("then", W_THEN, "x"))
    no_if = helper.make_model(helper.make_graph([], "empty", [], []))
    assert fix_branches(no_if, [_samples(1)]) == (no_if, ())
    assert fix_branches(model, []) == (model, ())


@pytest.mark.parametrize("mode", [0, 1])
def test_the_fixed_model_runs_in_the_interpreter_like_in_onnxruntime(mode: int) -> None:
    import torch

    from sensitivity.onnx_program import load_onnx

    samples = _samples(mode)
    program = load_onnx(normalize_model(_nested(), samples=samples))
    inputs = {name: torch.from_numpy(np.asarray(array)) for name, array in samples.items()}
    (output,) = program(program.layer_weights, inputs)
    np.testing.assert_allclose(output.numpy(), _run(_nested(), samples), rtol=1e-5, atol=1e-6)


def test_conditions_onnxruntime_cannot_read_leave_the_ifs_in_place() -> None:
    """Samples that do not fit the model (here a wrong rank) fix nothing; the checks that follow
    name the problem, normalisation itself does not fail on it."""
    fixed, branches = fix_branches(_nested(), [{"x": np.zeros((2, 4, 1), np.float32), "mode": np.array(1)}])
    assert branches == () and any(node.op_type == "If" for node in fixed.graph.node)
