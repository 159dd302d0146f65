"""LSTM and GRU of the ONNX interpreter against onnxruntime, attribute by attribute, and their
derivatives (float64 gradcheck; the two HVP methods of ``sensitivity.hvp`` agree, vmapped).

Weights are random (seeded) graph inputs so every combination of direction, activations,
clip, input_forget / linear_before_reset, optional inputs, sequence_lens and layout runs in
both runtimes on the same data through the one-node harness of ``tests/sensitivity/one_node.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from sensitivity.interlayer import predicted_loss_change
from sensitivity.losses import CalibrationLoss
from sensitivity.onnx_ops import Node
from sensitivity.onnx_program import UnsupportedOpsError, check_supported, load_onnx
from sensitivity.onnx_recurrent import gru, lstm
from sensitivity.results import InterLayerConfig
from sensitivity.run import compute_sensitivity
from sensitivity.validate import measured_loss_change
from tests.models import recurrent_model
from tests.sensitivity.one_node import (
    C,
    Case,
    assert_parity,
    build,
    relative_error,
    run_onnxruntime,
)

SEQ, BATCH, INPUT, HIDDEN = 5, 3, 4, 6
_rng = np.random.default_rng(12)


def _r(*shape: int, scale: float = 0.5) -> np.ndarray:
    return (_rng.standard_normal(shape) * scale).astype(np.float32)


def _inputs(
    op: str,
    directions: int,
    layout: int,
    *,
    bias: bool = True,
    lengths: bool | str = False,
    initial: bool = False,
    peephole: bool = False,
) -> list[Any]:
    """X, W, R[, B, sequence_lens, initial_h(, initial_c, P)] with omitted ones as None."""
    gates = 4 if op == "LSTM" else 3
    x = _r(BATCH, SEQ, INPUT) if layout else _r(SEQ, BATCH, INPUT)
    state_shape = (BATCH, directions, HIDDEN) if layout else (directions, BATCH, HIDDEN)
    values: list[Any] = [x, _r(directions, gates * HIDDEN, INPUT), _r(directions, gates * HIDDEN, HIDDEN)]
    values.append(_r(directions, 2 * gates * HIDDEN) if bias else None)
    values.append(C(np.array([SEQ, 2, 4][:BATCH], dtype=np.int32)) if lengths else None)
    if lengths == "with-empty":  # a sequence of length 0: zero outputs and zero final states
        values[-1] = C(np.array([SEQ, 0, 3][:BATCH], dtype=np.int32))
    values.append(_r(*state_shape) if initial else None)
    if op == "LSTM":
        values.append(_r(*state_shape) if initial else None)
        values.append(_r(directions, 3 * HIDDEN) if peephole else None)
    while values[-1] is None:  # trailing omitted inputs are simply absent
        values.pop()
    return values


def _case(
    op: str,
    direction: str = "forward",
    layout: int = 0,
    tag: str = "",
    opset: int = 14,
    inputs: dict[str, Any] | None = None,
    **attrs: Any,
) -> Case:
    directions = 2 if direction == "bidirectional" else 1
    outputs = 3 if op == "LSTM" else 2
    values = _inputs(op, directions, layout, **(inputs or {}))
    attrs = {"hidden_size": HIDDEN, "direction": direction, **attrs}
    if layout:
        attrs["layout"] = layout
    return Case(op, values, attrs, (opset,), outputs, tag or direction)


def _matrix(op: str) -> list[Case]:
    """Each attribute and optional input on its own, then combined."""
    extra: dict[str, Any] = {"input_forget": 1} if op == "LSTM" else {"linear_before_reset": 1}  # attributes
    leaky = ["LeakyRelu", "Tanh", "ScaledTanh"] if op == "LSTM" else ["HardSigmoid", "Affine"]
    thresholded = ["HardSigmoid", "ThresholdedRelu", "Affine"] if op == "LSTM" else ["ThresholdedRelu", "ScaledTanh"]
    # both directions, with functions that take an alpha left to its default
    defaults = (
        ["Sigmoid", "Softsign", "Tanh", "Sigmoid", "Elu", "Softplus"]
        if op == "LSTM"
        else ["Sigmoid", "Tanh", "LeakyRelu", "Softsign"]
    )
    everything = {"lengths": True, "initial": True, "peephole": op == "LSTM"}
    return [
        *[_case(op, direction) for direction in ("forward", "reverse", "bidirectional")],
        _case(op, tag="no-bias", inputs={"bias": False}),
        _case(op, tag="clip", clip=0.3),
        _case(op, tag=next(iter(extra)), **extra),
        _case(op, tag="initial-state", inputs={"initial": True}),
        *[
            _case(op, direction, tag=f"lengths-{direction}", inputs={"lengths": True})
            for direction in ("forward", "reverse", "bidirectional")
        ],
        _case(op, "bidirectional", tag="empty-sequence", inputs={"lengths": "with-empty", "initial": True}),
        *([_case(op, tag="peephole", inputs={"peephole": True})] if op == "LSTM" else []),
        _case(op, tag="activations", activations=leaky, activation_alpha=[0.2, 0.7], activation_beta=[0.6, 0.1]),
        _case(
            op,
            tag="activations-thresholded",
            activations=thresholded,
            activation_alpha=[0.1, 0.5, 1.5],
            activation_beta=[0.4, 0.8],
        ),
        _case(op, "bidirectional", tag="activations-default-alpha", activations=defaults),
        _case(op, layout=1, tag="layout1", opset=14, inputs={"initial": True}),
        _case(op, "bidirectional", layout=1, tag="layout1-everything", inputs=everything, clip=2.0, **extra),
        _case(op, "reverse", tag="everything", inputs=everything, clip=2.0, **extra),
        _case(op, "bidirectional", tag="opset11", opset=11, inputs={"lengths": True, "initial": True}),
    ]


CASES = _matrix("LSTM") + _matrix("GRU")
PARAMS = [pytest.param(c, id=f"{c.op}-{c.tag}-op{c.opsets[0]}") for c in CASES]
WORST: dict[str, float] = {}


def _reference(c: Case) -> list[np.ndarray]:
    """onnxruntime's outputs. Its CPU kernels refuse layout=1 (batch-major), so a layout-1 case
    runs as the same layer in layout 0 on transposed inputs, outputs transposed back."""
    if not c.attrs.get("layout"):
        model, feeds = build(c, c.opsets[0])
        return run_onnxruntime(model, feeds)
    batch_major = {0, 5, 6}  # X, initial_h, initial_c: batch first in layout 1
    values = [
        np.ascontiguousarray(v.swapaxes(0, 1)) if i in batch_major and isinstance(v, np.ndarray) else v
        for i, v in enumerate(c.inputs)
    ]
    attrs = {k: v for k, v in c.attrs.items() if k != "layout"}
    model, feeds = build(Case(c.op, values, attrs, c.opsets, c.outputs, c.tag), c.opsets[0])
    y, *states = run_onnxruntime(model, feeds)
    return [y.transpose(2, 0, 1, 3), *(s.swapaxes(0, 1) for s in states)]


@pytest.mark.parametrize("c", PARAMS)
def test_parity_with_onnxruntime(c: Case) -> None:
    model, feeds = build(c, c.opsets[0])
    program = load_onnx(model)
    actual = program.forward(program.layer_weights, {name: torch.from_numpy(v) for name, v in feeds.items()})
    expected = _reference(c)
    worst = assert_parity(expected, actual)
    absolute = max(float(np.abs(a.detach().numpy() - e).max()) for a, e in zip(actual, expected))
    WORST[c.op] = max(WORST.get(c.op, 0.0), worst)
    assert absolute < 1e-4, absolute


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_omitted_outputs_are_not_required(op: str) -> None:
    """Only Y_h requested (Y omitted with an empty name), as exporters write it."""
    c = _case(op, "bidirectional", inputs={"lengths": True})
    model, feeds = build(c, 14)
    node = model.graph.node[0]
    node.output[0] = ""
    del model.graph.output[0]
    program = load_onnx(model)
    actual = program.forward(program.layer_weights, {name: torch.from_numpy(v) for name, v in feeds.items()})
    expected = run_onnxruntime(model, feeds)
    assert len(actual) == len(expected) == (2 if op == "LSTM" else 1)
    assert max(relative_error(a.detach().numpy(), e) for a, e in zip(actual, expected)) < 1e-5


@pytest.mark.parametrize("activation", ["Affine", "ScaledTanh", "ThresholdedRelu"])
def test_activation_without_its_parameters_is_refused(activation: str) -> None:
    c = _case("GRU", activations=["Sigmoid", activation])
    model, _ = build(c, 14)
    with pytest.raises(UnsupportedOpsError, match=f"{activation}.*no default"):
        check_supported(model)


def test_past_length_outputs_are_zero_and_states_stop() -> None:
    """The padding semantics, checked directly (not only through parity)."""
    c = _case("LSTM", "bidirectional", inputs={"lengths": True, "initial": True})
    model, feeds = build(c, 14)
    program = load_onnx(model)
    y, y_h, _ = program.forward(program.layer_weights, {n: torch.from_numpy(v) for n, v in feeds.items()})
    assert torch.count_nonzero(y[2:, :, 1]) == 0  # batch entry 1 has length 2
    torch.testing.assert_close(y_h[0, 1], y[1, 0, 1])  # forward: state after step L - 1
    torch.testing.assert_close(y_h[1, 1], y[0, 1, 1])  # reverse: state after step 0


@pytest.mark.slow
def test_sensitivity_of_recurrent_layers_predicts_measured_loss_changes() -> None:
    """W and R are layers through the whole sensitivity pipeline: G's prediction g·Δ + ½ΔᵀGΔ of
    quantizing them (fake-quantized with Q_b along their channel axis) matches the measured change."""
    model, calibration = recurrent_model()
    calibration = {"x": calibration["x"][:32]}
    program = load_onnx(model)
    config = InterLayerConfig(
        bits=(8, 4), device="cpu", task="regression", seed=0, trace_min_probes=4, trace_max_probes=4
    )
    result = compute_sensitivity(program, calibration, config)
    assert [(layer.name, layer.channel_axis) for layer in result.layers[:2]] == [("lstm.W", 1), ("lstm.R", 1)]
    loss = CalibrationLoss(program, calibration, 256, torch.device("cpu"), "regression")
    for configuration in ({"lstm.W": 4}, {"lstm.R": 4}, {"lstm.W": 8, "lstm.R": 4, "fc.weight": 4}):
        measured = measured_loss_change(loss, configuration)
        assert measured > 0
        assert abs(predicted_loss_change(result, configuration) - measured) < 0.1 * measured, configuration


def _node(op: str, **attrs: Any) -> Node:
    return Node(name="rnn", op_type=op, attrs={"hidden_size": 2, **attrs}, opset=14, num_outputs=3)


@pytest.mark.parametrize(
    "op, attrs",
    [
        ("LSTM", {"direction": "bidirectional"}),
        ("LSTM", {"direction": "reverse", "input_forget": 1, "clip": 5.0}),
        ("GRU", {"direction": "bidirectional"}),
        ("GRU", {"linear_before_reset": 1}),
    ],
)
def test_gradcheck_float64(op: str, attrs: dict[str, Any]) -> None:
    """First and second derivatives through the time loop, with lengths and peepholes, in float64."""
    torch.manual_seed(0)
    directions = 2 if attrs.get("direction") == "bidirectional" else 1
    gates = 4 if op == "LSTM" else 3
    hidden, steps, batch = 2, 3, 2
    x = torch.randn(steps, batch, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(directions, gates * hidden, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(directions, gates * hidden, hidden, dtype=torch.float64, requires_grad=True)
    b = torch.randn(directions, 2 * gates * hidden, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([3, 2])
    h0 = torch.randn(directions, batch, hidden, dtype=torch.float64, requires_grad=True)
    node = _node(op, **attrs)
    if op == "LSTM":
        p = torch.randn(directions, 3 * hidden, dtype=torch.float64, requires_grad=True)

        def fn(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(lstm(node, [args[0], args[1], args[2], args[3], lengths, args[4], args[4] * 0.5, args[5]]))

        args: tuple[torch.Tensor, ...] = (x, w, r, b, h0, p)
    else:

        def fn(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(gru(node, [args[0], args[1], args[2], args[3], lengths, args[4]]))

        args = (x, w, r, b, h0)
    # fast mode checks random projections of the Jacobians: the same bugs, a fraction of the time
    assert torch.autograd.gradcheck(fn, args, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, args, fast_mode=True)


def _loss_of_weights(op: str, seed: int) -> tuple[Any, dict[str, torch.Tensor]]:
    """L(W, R) of a bidirectional layer with lengths: the HVP methods differentiate it."""
    torch.manual_seed(seed)
    gates = 4 if op == "LSTM" else 3
    x = torch.randn(4, 2, 3)
    lengths = torch.tensor([4, 3])
    b = torch.randn(2, 2 * gates * 2)
    node = _node(op, direction="bidirectional", clip=3.0)
    fn = lstm if op == "LSTM" else gru

    def loss(params: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        y, y_h, *_ = fn(node, [x, params[0], params[1], b, lengths])
        return (y**2).sum() + (y_h**3).sum()

    weights = {"W": torch.randn(2, gates * 2, 3), "R": torch.randn(2, gates * 2, 2)}
    return loss, weights


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_hvp_methods_agree_under_vmap(op: str) -> None:
    """Double backward and forward-over-reverse (both vmapped over 3 probes, as sensitivity.hvp
    runs them) give the same Hessian-vector products through the time loop."""
    loss, weights = _loss_of_weights(op, seed=3)
    point = (weights["W"], weights["R"])
    probes = tuple(torch.randn(3, *w.shape) for w in point)
    forward = torch.func.vmap(lambda v: torch.func.jvp(torch.func.grad(loss), (point,), (v,))[1])(probes)
    _, backward = torch.func.vjp(torch.func.grad(loss), point)[:2]  # a triple only with has_aux
    reverse = torch.func.vmap(lambda v: backward(v)[0])(probes)
    for a, b in zip(forward, reverse):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert all(float(a.abs().max()) > 0 for a in forward)  # a real, non-zero curvature
