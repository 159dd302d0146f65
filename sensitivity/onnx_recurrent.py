"""ONNX recurrent layers (LSTM, GRU) as differentiable torch loops over time.

Registered in ``sensitivity.onnx_ops.OPS`` like every other op. Each direction is an explicit
Python loop over the time steps built from matmuls and elementwise ops only (no in-place
update, no ``.item()``), so autograd double backward, ``torch.func.jvp`` of
``torch.func.grad`` and ``torch.func.vmap`` all go through it. The input projection
X·Wᵀ + Wb of all steps is one matmul before the loop; only H·Rᵀ runs per step.

``sequence_lens`` follows onnxruntime: per batch entry b of length L_b, outputs at steps
t ≥ L_b are zero and the final states are those after step L_b − 1 (a reverse direction
starts at step L_b − 1); a sequence of length 0 has zero outputs and zero final states. The
loop runs over all steps and masks with ``torch.where``, so the lengths are read as data,
never as Python ints: shapes do not depend on them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sensitivity.onnx_ops import Inputs, Node, op, optional, required

Activation = Callable[[torch.Tensor], torch.Tensor]
# One time step: (this step's input projection, state) -> the new state, Y's value first.
Cell = Callable[[torch.Tensor, tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]

# ONNX RNN activation names -> (function of x, alpha, beta; how many of alpha/beta it reads;
# default alpha; default beta). The spec gives no defaults; those here are the standalone ops'
# and match onnxruntime (measured). Where onnxruntime's are not sensible (Affine and ScaledTanh
# compute 0, ThresholdedRelu thresholds at about 0.01) the default is None and the node is
# refused by ``check`` unless activation_alpha/activation_beta give the values.
_ACTIVATIONS: dict[
    str, tuple[Callable[[torch.Tensor, float, float], torch.Tensor], int, float | None, float | None]
] = {
    "relu": (lambda x, a, b: torch.relu(x), 0, 0.0, 0.0),
    "tanh": (lambda x, a, b: torch.tanh(x), 0, 0.0, 0.0),
    "sigmoid": (lambda x, a, b: torch.sigmoid(x), 0, 0.0, 0.0),
    "affine": (lambda x, a, b: a * x + b, 2, None, None),
    "leakyrelu": (lambda x, a, b: F.leaky_relu(x, a), 1, 0.01, 0.0),
    "thresholdedrelu": (lambda x, a, b: torch.where(x > a, x, torch.zeros_like(x)), 1, None, 0.0),
    "scaledtanh": (lambda x, a, b: a * torch.tanh(b * x), 2, None, None),
    "hardsigmoid": (lambda x, a, b: torch.clamp(a * x + b, 0.0, 1.0), 2, 0.2, 0.5),
    "elu": (lambda x, a, b: F.elu(x, a), 1, 1.0, 0.0),
    "softsign": (lambda x, a, b: F.softsign(x), 0, 0.0, 0.0),
    "softplus": (lambda x, a, b: F.softplus(x), 0, 0.0, 0.0),
}
_DIRECTIONS = ("forward", "reverse", "bidirectional")
# per op: gate count, default activations of one direction, inputs after B (sequence_lens, ...)
_GATES = {"LSTM": 4, "GRU": 3}
_DEFAULT_ACTIVATIONS = {"LSTM": ("Sigmoid", "Tanh", "Tanh"), "GRU": ("Sigmoid", "Tanh")}


@dataclass(frozen=True)
class _Setup:
    """What both recurrent ops read from the node, parsed per call (cheap: a few attributes)."""

    hidden: int
    directions: int
    reverse: tuple[bool, ...]  # per direction
    activations: tuple[tuple[Activation, ...], ...]  # per direction
    clip: float | None
    layout: int


# The cell of direction d: (d, setup, R[d], Rb[d]) -> Cell
MakeCell = Callable[[int, _Setup, torch.Tensor, torch.Tensor | None], Cell]


def _parameters(name: str, alphas: list[float], betas: list[float]) -> tuple[float | None, float | None]:
    """(alpha, beta) of one activation; consumes from the lists, which are shared in activation
    order and read only by the functions that take them (None: no value and no default)."""
    _, count, alpha, beta = _ACTIVATIONS[name.lower()]
    if count >= 1 and alphas:
        alpha = alphas.pop(0)
    if count >= 2 and betas:
        beta = betas.pop(0)
    return alpha, beta


def _activation(name: str, alphas: list[float], betas: list[float]) -> Activation:
    fn = _ACTIVATIONS[name.lower()][0]
    alpha, beta = _parameters(name, alphas, betas)
    if alpha is None or beta is None:  # ``check`` refuses such a node before it runs
        raise ValueError(f"activation {name} needs activation_alpha/activation_beta values")
    return lambda x: fn(x, alpha, beta)


def _missing_parameters(node: Node, names: Sequence[str]) -> list[str]:
    alphas = node.floats_attr("activation_alpha", [])
    betas = node.floats_attr("activation_beta", [])
    return [name for name in names if None in _parameters(name, alphas, betas)]


def _check_recurrent(node: Node) -> str | None:
    direction = node.str_attr("direction", "forward")
    if direction not in _DIRECTIONS:
        return f"direction={direction!r}"
    names = node.strs_attr("activations") if node.has("activations") else None
    if names is not None:
        unknown = [name for name in names if name.lower() not in _ACTIVATIONS]
        if unknown:
            return f"activations {unknown}"
        expected = len(_DEFAULT_ACTIVATIONS[node.op_type]) * (2 if direction == "bidirectional" else 1)
        if len(names) != expected:
            return f"{len(names)} activations (expected {expected} for direction={direction!r})"
        missing = _missing_parameters(node, names)
        if missing:
            return f"activations {missing} without activation_alpha/activation_beta values (no default)"
    layout = node.int_attr("layout", 0)
    return None if layout in (0, 1) else f"layout={layout}"


def _setup(node: Node) -> _Setup:
    direction = node.str_attr("direction", "forward")
    directions = 2 if direction == "bidirectional" else 1
    per_direction = len(_DEFAULT_ACTIVATIONS[node.op_type])
    names = node.strs_attr("activations", []) or list(_DEFAULT_ACTIVATIONS[node.op_type] * directions)
    alphas = node.floats_attr("activation_alpha", [])
    betas = node.floats_attr("activation_beta", [])
    functions = [_activation(name, alphas, betas) for name in names]
    activations = tuple(tuple(functions[d * per_direction : (d + 1) * per_direction]) for d in range(directions))
    reverse = (direction == "reverse",) if directions == 1 else (False, True)
    clip = node.float_attr("clip") if node.has("clip") else None
    return _Setup(node.int_attr("hidden_size"), directions, reverse, activations, clip, node.int_attr("layout", 0))


def _clipped(x: torch.Tensor, clip: float | None) -> torch.Tensor:
    return x if clip is None else torch.clamp(x, -clip, clip)


def _time_major(x: torch.Tensor, layout: int) -> torch.Tensor:
    """X as [seq, batch, input] whatever the layout."""
    return x.transpose(0, 1) if layout == 1 else x


def _initial_state(state: torch.Tensor | None, setup: _Setup, batch: int, like: torch.Tensor) -> torch.Tensor:
    """An initial state as [directions, batch, hidden] (zeros when omitted)."""
    if state is None:
        return like.new_zeros((setup.directions, batch, setup.hidden))
    return state.transpose(0, 1) if setup.layout == 1 else state


def _step_mask(lengths: torch.Tensor | None, steps: int, batch: int, device: torch.device) -> torch.Tensor | None:
    """[seq, batch, 1] bool: whether step t is inside sequence b (None when all are full)."""
    if lengths is None:
        return None
    positions = torch.arange(steps, device=device).reshape(steps, 1, 1)
    return positions < lengths.to(device=device, dtype=torch.int64).reshape(1, batch, 1)


def _outputs(ys: list[torch.Tensor], finals: Sequence[list[torch.Tensor]], setup: _Setup) -> list[torch.Tensor]:
    """(Y, Y_h[, Y_c]) in the node's layout from per-direction [seq, batch, hidden] stacks."""
    y = torch.stack(ys, dim=1)  # [seq, directions, batch, hidden]
    states = [torch.stack(final, dim=0) for final in finals]  # [directions, batch, hidden]
    if setup.layout == 1:
        return [y.permute(2, 0, 1, 3), *(s.transpose(0, 1) for s in states)]
    return [y, *states]


def _run_direction(
    cell: Cell,
    projected: torch.Tensor,
    state: tuple[torch.Tensor, ...],
    mask: torch.Tensor | None,
    reverse: bool,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Run ``cell`` over the steps of ``projected`` [seq, batch, G*hidden]; returns Y of this
    direction [seq, batch, hidden] (zero past each length) and the final state tuple."""
    steps = projected.shape[0]
    outputs: dict[int, torch.Tensor] = {}  # by step
    for t in range(steps - 1, -1, -1) if reverse else range(steps):
        new = cell(projected[t], state)
        if mask is None:
            state = new
            outputs[t] = new[0]
        else:  # past its length a sequence keeps its state (the reverse one: its initial state)
            state = tuple(torch.where(mask[t], n, s) for n, s in zip(new, state))
            outputs[t] = torch.where(mask[t], new[0], torch.zeros_like(new[0]))
    if mask is not None:  # an empty sequence ends with zero states, as in onnxruntime (not its initial ones)
        started = mask.any(dim=0)
        state = tuple(torch.where(started, s, torch.zeros_like(s)) for s in state)
    return torch.stack([outputs[t] for t in range(steps)]), state


def _projection(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, gates: int, hidden: int) -> torch.Tensor:
    """X·Wᵀ + Wb for every step at once: [seq, batch, G*hidden]."""
    projected = torch.matmul(x, w.transpose(0, 1))
    return projected if bias is None else projected + bias[: gates * hidden]


def _lstm_cell(
    r: torch.Tensor,
    r_bias: torch.Tensor | None,
    peephole: torch.Tensor | None,
    activations: tuple[Activation, ...],
    clip: float | None,
    input_forget: bool,
    hidden: int,
) -> Cell:
    f, g, h = activations
    peepholes = None if peephole is None else peephole.split(hidden)  # ONNX order: i, o, f

    def cell(projected: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        h_prev, c_prev = state
        gates = projected + torch.matmul(h_prev, r.transpose(0, 1))
        if r_bias is not None:
            gates = gates + r_bias
        pre_i, pre_o, pre_f, pre_c = gates.split(hidden, dim=-1)  # ONNX gate order: i, o, f, c
        if peepholes is not None:
            p_i, _, p_f = peepholes
            pre_i, pre_f = pre_i + p_i * c_prev, pre_f + p_f * c_prev
        i = f(_clipped(pre_i, clip))
        forget = 1 - i if input_forget else f(_clipped(pre_f, clip))  # coupled gates, as onnxruntime
        c = forget * c_prev + i * g(_clipped(pre_c, clip))
        if peepholes is not None:
            pre_o = pre_o + peepholes[1] * c
        o = f(_clipped(pre_o, clip))
        return o * h(c), c

    return cell


def _gru_cell(
    r: torch.Tensor,
    r_bias: torch.Tensor | None,
    activations: tuple[Activation, ...],
    clip: float | None,
    linear_before_reset: bool,
    hidden: int,
) -> Cell:
    f, g = activations
    r_zr, r_h = r[: 2 * hidden], r[2 * hidden :]
    b_zr, b_h = (None, None) if r_bias is None else (r_bias[: 2 * hidden], r_bias[2 * hidden :])

    def cell(projected: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        (h_prev,) = state
        x_zr, x_h = projected[..., : 2 * hidden], projected[..., 2 * hidden :]
        zr = x_zr + torch.matmul(h_prev, r_zr.transpose(0, 1))
        if b_zr is not None:
            zr = zr + b_zr
        z, reset = f(_clipped(zr, clip)).split(hidden, dim=-1)  # ONNX gate order: z, r, h
        if linear_before_reset:
            recurrent = torch.matmul(h_prev, r_h.transpose(0, 1))
            recurrent = recurrent if b_h is None else recurrent + b_h
            pre_h = x_h + reset * recurrent
        else:
            pre_h = x_h + torch.matmul(reset * h_prev, r_h.transpose(0, 1))
            pre_h = pre_h if b_h is None else pre_h + b_h
        candidate = g(_clipped(pre_h, clip))
        return ((1 - z) * candidate + z * h_prev,)

    return cell


def _recurrent(node: Node, inputs: Inputs, make_cell: MakeCell, initial_indices: Sequence[int]) -> list[torch.Tensor]:
    """The direction loop shared by LSTM and GRU; ``make_cell(direction, setup, r, r_bias)``."""
    setup = _setup(node)
    gates = _GATES[node.op_type]
    x = _time_major(required(inputs, 0), setup.layout)
    w, r, b = required(inputs, 1), required(inputs, 2), optional(inputs, 3)
    steps, batch = x.shape[0], x.shape[1]
    mask = _step_mask(optional(inputs, 4), steps, batch, x.device)
    initial = [_initial_state(optional(inputs, i), setup, batch, x) for i in initial_indices]
    ys: list[torch.Tensor] = []
    finals: list[list[torch.Tensor]] = [[] for _ in initial]
    for d in range(setup.directions):
        w_bias = None if b is None else b[d, : gates * setup.hidden]
        r_bias = None if b is None else b[d, gates * setup.hidden :]
        projected = _projection(x, w[d], w_bias, gates, setup.hidden)
        cell = make_cell(d, setup, r[d], r_bias)
        y, state = _run_direction(cell, projected, tuple(s[d] for s in initial), mask, setup.reverse[d])
        ys.append(y)
        for final, value in zip(finals, state):
            final.append(value)
    return _outputs(ys, finals, setup)


@op("LSTM", check=_check_recurrent)
def lstm(node: Node, inputs: Inputs) -> list[torch.Tensor]:
    """Inputs X, W, R, B, sequence_lens, initial_h, initial_c, P; outputs Y, Y_h, Y_c."""
    peephole = optional(inputs, 7)
    input_forget = bool(node.int_attr("input_forget", 0))

    def make_cell(d: int, setup: _Setup, r: torch.Tensor, r_bias: torch.Tensor | None) -> Cell:
        p = None if peephole is None else peephole[d]
        return _lstm_cell(r, r_bias, p, setup.activations[d], setup.clip, input_forget, setup.hidden)

    return _recurrent(node, inputs, make_cell, (5, 6))


@op("GRU", check=_check_recurrent)
def gru(node: Node, inputs: Inputs) -> list[torch.Tensor]:
    """Inputs X, W, R, B, sequence_lens, initial_h; outputs Y, Y_h."""
    linear_before_reset = bool(node.int_attr("linear_before_reset", 0))

    def make_cell(d: int, setup: _Setup, r: torch.Tensor, r_bias: torch.Tensor | None) -> Cell:
        return _gru_cell(r, r_bias, setup.activations[d], setup.clip, linear_before_reset, setup.hidden)

    return _recurrent(node, inputs, make_cell, (5,))
