"""``If`` in the ONNX interpreter: branches as subgraphs that read outer-scope values, a
condition known at load (only the taken branch is kept), a condition read at run time, nested
Ifs; parity with onnxruntime and second-order derivatives through a run-time branch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from sensitivity.onnx_program import UnsupportedOpsError, check_supported, load_onnx
from tests.sensitivity.one_node import relative_error, run_onnxruntime

_rng = np.random.default_rng(5)
W = _rng.standard_normal((4, 4)).astype(np.float32)


def _value(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


def _branch(name: str, nodes: list[onnx.NodeProto], outputs: list[str]) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [_value(o) for o in outputs])


def _then() -> onnx.GraphProto:
    """Reads the outer input x, the outer layer output h and the layer weight W itself."""
    return _branch(
        "then",
        [
            helper.make_node("MatMul", ["h", "W"], ["t1"]),
            helper.make_node("Tanh", ["t1"], ["t2"]),
            helper.make_node("Add", ["t2", "x"], ["then_out"]),
            helper.make_node("Identity", ["h"], ["then_h"]),  # onnxruntime refuses an outer name as output
        ],
        ["then_out", "then_h"],
    )


def _else() -> onnx.GraphProto:
    return _branch(
        "else",
        [
            helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array(0.5, np.float32))),
            helper.make_node("Mul", ["h", "k"], ["e1"]),
            helper.make_node("Sigmoid", ["e1"], ["else_out"]),
            helper.make_node("Neg", ["x"], ["e2"]),
        ],
        ["else_out", "e2"],
    )


def _model(
    condition_nodes: list[onnx.NodeProto],
    initializers: Sequence[onnx.TensorProto] = (),
    then_branch: onnx.GraphProto | None = None,
    else_branch: onnx.GraphProto | None = None,
    opset: int = 16,
) -> onnx.ModelProto:
    """x -> h = x·W (a layer) -> If(cond) -> (y, z); ``condition_nodes`` produce "cond"."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="layer"),
        *condition_nodes,
        helper.make_node(
            "If",
            ["cond"],
            ["y", "z"],
            name="branchy",
            then_branch=then_branch or _then(),
            else_branch=else_branch or _else(),
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [_value("y"), _value("z")],
        [numpy_helper.from_array(W, "W"), *initializers],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    program = load_onnx(model)
    actual = program.forward(program.layer_weights, {"x": torch.from_numpy(x)})
    return actual, run_onnxruntime(model, {"x": x})


def _assert_parity(actual: list[torch.Tensor], expected: list[np.ndarray]) -> float:
    assert [tuple(a.shape) for a in actual] == [e.shape for e in expected]
    worst = max(relative_error(a.detach().numpy(), e) for a, e in zip(actual, expected))
    assert worst < 1e-5, worst
    return worst


def _constant_condition(value: bool) -> list[onnx.NodeProto]:
    return [helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(value)))]


def _data_condition() -> list[onnx.NodeProto]:
    """cond = sum(x) > 0: known only at run time."""
    return [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0.0, np.float32))),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
    ]


@pytest.mark.parametrize("taken", [True, False])
def test_constant_condition_keeps_only_the_taken_branch(taken: bool) -> None:
    model = _model(_constant_condition(taken))
    program = load_onnx(model)
    op_types = [step.node.op_type for step in program._graph.full.steps]
    assert "If" not in op_types
    assert ("Tanh" in op_types) == taken and ("Sigmoid" in op_types) != taken
    x = _rng.standard_normal((3, 4)).astype(np.float32)
    _assert_parity(*_run(model, x))


def test_condition_computed_from_initializers_is_resolved_at_load() -> None:
    """cond = Shape(W)[0] == 4, from an initializer only: the If disappears at load."""
    shape = [
        helper.make_node("Shape", ["table"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero_index"], ["rows"], axis=0),
        helper.make_node("Equal", ["rows", "four"], ["cond"]),
    ]
    initializers = [
        numpy_helper.from_array(np.zeros((4, 2), np.float32), "table"),
        numpy_helper.from_array(np.array(0, np.int64), "zero_index"),
        numpy_helper.from_array(np.array(4, np.int64), "four"),
    ]
    model = _model(shape, initializers)
    program = load_onnx(model)
    assert "If" not in [step.node.op_type for step in program._graph.full.steps]
    _assert_parity(*_run(model, _rng.standard_normal((3, 4)).astype(np.float32)))


def test_untaken_constant_branch_is_never_run() -> None:
    """A branch that would fail (Reshape to an impossible shape) is fine when not taken."""
    broken = _branch(
        "broken",
        [
            helper.make_node("Constant", [], ["bad_shape"], value=numpy_helper.from_array(np.array([7, 5], np.int64))),
            helper.make_node("Reshape", ["x", "bad_shape"], ["b1"]),
        ],
        ["b1", "b1"],
    )
    model = _model(_constant_condition(False), then_branch=broken)
    _assert_parity(*_run(model, _rng.standard_normal((3, 4)).astype(np.float32)))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_run_time_condition_runs_the_taken_branch(sign: float) -> None:
    model = _model(_data_condition())
    program = load_onnx(model)
    assert "If" in [step.node.op_type for step in program._graph.full.steps]
    x = (np.abs(_rng.standard_normal((3, 4))) * sign).astype(np.float32)
    actual, expected = _run(model, x)
    _assert_parity(actual, expected)
    second = program.forward(program.layer_weights, {"x": torch.from_numpy(x)})  # shape cache filled
    torch.testing.assert_close(second, program.forward(program.layer_weights, {"x": torch.from_numpy(x)}))


def test_nested_ifs_with_constant_and_run_time_conditions() -> None:
    """A constant-condition If around a run-time one, which holds a constant-condition If."""
    inner_constant = helper.make_node("If", ["inner_cond"], ["n1", "n2"], then_branch=_then(), else_branch=_else())
    run_time = _branch(
        "run_time",
        [
            helper.make_node("Constant", [], ["inner_cond"], value=numpy_helper.from_array(np.array(False))),
            inner_constant,
        ],
        ["n1", "n2"],
    )
    middle = _branch(
        "middle",
        [
            *_data_condition()[:2],
            helper.make_node("Less", ["s", "zero"], ["mid_cond"]),
            helper.make_node("If", ["mid_cond"], ["m1", "m2"], then_branch=run_time, else_branch=_then()),
        ],
        ["m1", "m2"],
    )
    model = _model(_constant_condition(True), then_branch=middle)
    for sign in (1.0, -1.0):
        x = (np.abs(_rng.standard_normal((3, 4))) * sign).astype(np.float32)
        _assert_parity(*_run(model, x))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_second_order_through_a_run_time_branch(sign: float) -> None:
    """The HVP with respect to the layer weight W (read by the branch as an outer value) is the
    same by double backward, one probe at a time and vmapped, and by forward-over-reverse
    vmapped over probes (the three ways sensitivity.hvp computes it)."""
    program = load_onnx(_model(_data_condition()))
    x = torch.from_numpy((np.abs(_rng.standard_normal((3, 4))) * sign).astype(np.float32))

    def loss(weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
        y, z = program.forward({"W": weights[0]}, {"x": x})
        return (y**2).sum() + (y * z).sum()

    point = (program.layer_weights["W"],)
    probes = (torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0)),)
    forward = torch.func.vmap(lambda v: torch.func.jvp(torch.func.grad(loss), (point,), (v,))[1])(probes)[0]
    leaf = point[0].clone().requires_grad_()
    (gradient,) = torch.autograd.grad(loss((leaf,)), leaf, create_graph=True)
    backward = torch.stack([torch.autograd.grad((gradient * v).sum(), leaf, retain_graph=True)[0] for v in probes[0]])
    _, second_backward = torch.func.vjp(torch.func.grad(loss), point)[:2]  # the vmapped double backward
    batched = torch.func.vmap(lambda v: second_backward((v,))[0][0])(probes[0])
    torch.testing.assert_close(forward, backward, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched, backward, rtol=1e-4, atol=1e-5)
    assert float(forward.abs().max()) > 0


def test_unsupported_ops_inside_branches_are_named_with_their_path() -> None:
    inner = _branch("inner", [helper.make_node("NonMaxSuppression", ["x", "h"], ["n"], name="nms")], ["n", "n"])
    model = _model(_data_condition(), else_branch=inner)
    with pytest.raises(UnsupportedOpsError, match="NonMaxSuppression \\(node 'branchy/nms'\\)"):
        check_supported(model)
