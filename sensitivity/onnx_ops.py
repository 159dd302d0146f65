"""ONNX operators as differentiable torch functions: the op registry of the ONNX interpreter.

Each handler is registered with ``@op("Type")`` and called as ``handler(node, inputs)``:
``node`` carries the attributes (parsed once at load; read with its typed accessors such as
``node.int_attr("axis", 0)``), the model's opset and the number of requested outputs;
``inputs`` holds one tensor per ONNX input (``None`` for an omitted optional input; trailing
omitted inputs are simply absent), read with ``required`` and ``optional``. A handler returns
one tensor or a sequence of tensors.

Dtypes: every float type computes as float32, every integer type as int64, booleans as bool.
Handlers never mutate a tensor in place and never call ``.item()``/``.tolist()`` on a value
that can carry gradient (integer shape tensors are fine), so double backward and
``torch.func`` transforms work through every op. An optional ``check`` per op rejects
attribute values that are not implemented, so ``check_supported`` can name them before any
work starts.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

Inputs = Sequence[torch.Tensor | None]
Result = torch.Tensor | Sequence[torch.Tensor]


@dataclass(frozen=True)
class Node:
    """What a handler needs to know about one graph node, prepared once at load.

    ``attrs`` holds the values ``parse_attributes`` made (ints, floats, strings, their lists,
    tensors). Handlers read them through the typed accessors: an absent attribute gives the
    accessor's default (its ONNX default), and without a default, or with a value of another
    type (a malformed model), a ValueError names the node and the attribute.
    """

    name: str
    op_type: str
    attrs: Mapping[str, object] = field(default_factory=dict)
    opset: int = 17
    num_outputs: int = 1

    def has(self, name: str) -> bool:
        return name in self.attrs

    def int_attr(self, name: str, default: int | None = None) -> int:
        value = self._value(name, default)
        if isinstance(value, int):
            return value
        raise self._wrong_type(name, value, "an int")

    def float_attr(self, name: str, default: float | None = None) -> float:
        value = self._value(name, default)
        if isinstance(value, int | float):  # an INT where a FLOAT is due still means the number
            return float(value)
        raise self._wrong_type(name, value, "a float")

    def str_attr(self, name: str, default: str | None = None) -> str:
        value = self._value(name, default)
        if isinstance(value, str):
            return value
        raise self._wrong_type(name, value, "a string")

    def ints_attr(self, name: str, default: Sequence[int] | None = None) -> list[int]:
        value = self._value(name, default)
        if isinstance(value, list | tuple) and all(isinstance(v, int) for v in value):
            return list(value)
        raise self._wrong_type(name, value, "a list of ints")

    def floats_attr(self, name: str, default: Sequence[float] | None = None) -> list[float]:
        value = self._value(name, default)
        if isinstance(value, list | tuple) and all(isinstance(v, int | float) for v in value):
            return [float(v) for v in value]
        raise self._wrong_type(name, value, "a list of floats")

    def strs_attr(self, name: str, default: Sequence[str] | None = None) -> list[str]:
        value = self._value(name, default)
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return list(value)
        raise self._wrong_type(name, value, "a list of strings")

    def tensor_attr(self, name: str) -> torch.Tensor:
        value = self._value(name, None)
        if isinstance(value, torch.Tensor):
            return value
        raise self._wrong_type(name, value, "a tensor")

    def _value(self, name: str, default: object) -> object:
        """The attribute's value, else ``default``; None means the attribute is required."""
        if name in self.attrs:
            return self.attrs[name]
        if default is None:
            raise ValueError(f"node {self.name!r} ({self.op_type}) has no {name!r} attribute")
        return default

    def _wrong_type(self, name: str, value: object, expected: str) -> ValueError:
        kind = type(value).__name__
        return ValueError(
            f"attribute {name!r} of node {self.name!r} ({self.op_type}) is of type {kind}, not {expected}"
        )


# An op's implementation: the node and its inputs in, one tensor or several out.
Handler = Callable[[Node, Inputs], Result]
Check = Callable[[Node], str | None]  # returns a description of what is unsupported, or None
# ``op`` hands back the decorated function itself, so its own signature (a Tensor or a list
# of Tensors out) stays visible to direct callers such as the tests.
AnyHandler = TypeVar("AnyHandler", bound=Handler)


@dataclass(frozen=True)
class OpSpec:
    handler: Handler
    check: Check | None = None


OPS: dict[str, OpSpec] = {}


def op(*op_types: str, check: Check | None = None) -> Callable[[AnyHandler], AnyHandler]:
    """Register a handler for one or more ONNX op types (default domain)."""

    def register(handler: AnyHandler) -> AnyHandler:
        for op_type in op_types:
            OPS[op_type] = OpSpec(handler, check)
        return handler

    return register


# --- tensors and attributes ---------------------------------------------------------------

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}
_INT_TYPES = {
    onnx.TensorProto.INT8,
    onnx.TensorProto.INT16,
    onnx.TensorProto.INT32,
    onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.UINT16,
    onnx.TensorProto.UINT32,
    onnx.TensorProto.UINT64,
}


def torch_dtype(onnx_type: int) -> torch.dtype:
    """The compute dtype for an ONNX element type (float32, int64 or bool)."""
    if onnx_type in _FLOAT_TYPES:
        return torch.float32
    if onnx_type in _INT_TYPES:
        return torch.int64
    if onnx_type == onnx.TensorProto.BOOL:
        return torch.bool
    raise ValueError(f"unsupported ONNX element type {onnx.TensorProto.DataType.Name(onnx_type)}")


def tensor_from_proto(proto: onnx.TensorProto) -> torch.Tensor:
    """An initializer or tensor attribute as a torch tensor in its compute dtype.

    External data is never read from here (that would open paths named by an untrusted
    file); ``onnx.load`` on the model's path has already inlined it.
    """
    if proto.data_location == onnx.TensorProto.EXTERNAL:
        raise ValueError(f"tensor {proto.name!r} keeps its data in an external file; load the model from its path")
    dtype = torch_dtype(proto.data_type)
    array = numpy_helper.to_array(proto)
    numpy_dtype = {torch.float32: np.float32, torch.int64: np.int64, torch.bool: np.bool_}[dtype]
    return torch.from_numpy(np.array(array, dtype=numpy_dtype, copy=True))


def parse_attributes(node: onnx.NodeProto, skip_subgraphs: bool = False) -> dict[str, object]:
    """Attribute values as Python values: strings decoded, tensors as torch tensors.

    Subgraph attributes are an error unless ``skip_subgraphs`` (the interpreter prepares the
    branches of ``If`` itself, see ``sensitivity.onnx_program``)."""
    attrs: dict[str, object] = {}
    for attribute in node.attribute:
        if attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            if skip_subgraphs:
                continue
            raise ValueError(f"node {node.name!r} ({node.op_type}) has a subgraph attribute")
        value: object = onnx.helper.get_attribute_value(attribute)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, onnx.TensorProto):
            value = tensor_from_proto(value)
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        attrs[attribute.name] = value
    return attrs


def optional(inputs: Inputs, index: int) -> torch.Tensor | None:
    """An optional input: None when omitted or absent."""
    return inputs[index] if index < len(inputs) else None


def required(inputs: Inputs, index: int) -> torch.Tensor:
    """An input the op cannot do without (the interpreter names the node if it is missing)."""
    tensor = optional(inputs, index)
    if tensor is None:
        raise ValueError(f"input {index} is missing")
    return tensor


def required_inputs(inputs: Inputs, count: int) -> list[torch.Tensor]:
    """The first ``count`` inputs, all required."""
    return [required(inputs, index) for index in range(count)]


def _ints(tensor: torch.Tensor) -> list[int]:
    """An integer (shape-like) tensor as Python ints; never used on differentiable values."""
    return [int(v) for v in tensor.reshape(-1).tolist()]


def _optional_ints(inputs: Inputs, index: int, default: list[int]) -> list[int]:
    """An optional integer (shape-like) input as Python ints, ``default`` when omitted."""
    tensor = optional(inputs, index)
    return default if tensor is None else _ints(tensor)


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _attr_or_input(node: Node, inputs: Inputs, name: str, index: int, since: int) -> list[int] | None:
    """Integer lists that moved from an attribute to an input at opset ``since`` (axes, split)."""
    if node.opset >= since:
        tensor = optional(inputs, index)
        return None if tensor is None else _ints(tensor)
    return node.ints_attr(name) if node.has(name) else None


# --- elementwise --------------------------------------------------------------------------

_UNARY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Abs": torch.abs,
    "Neg": torch.neg,
    "Sqrt": torch.sqrt,
    "Exp": torch.exp,
    "Log": torch.log,
    "Relu": torch.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Erf": torch.erf,
    "Reciprocal": torch.reciprocal,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,  # round half to even, as ONNX
    "Sign": torch.sign,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Tan": torch.tan,
    "Softsign": F.softsign,
    "HardSwish": F.hardswish,
    "Not": torch.logical_not,
    "IsNaN": torch.isnan,
}


def _register_unary(op_type: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    def unary(node: Node, inputs: Inputs) -> torch.Tensor:
        return fn(required(inputs, 0))

    op(op_type)(unary)


for _op_type, _unary in _UNARY.items():
    _register_unary(_op_type, _unary)


def _divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # integer Div truncates toward zero in ONNX


_BINARY: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": _divide,
    "Equal": torch.eq,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}


def _register_binary(op_type: str, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    def binary(node: Node, inputs: Inputs) -> torch.Tensor:
        return fn(required(inputs, 0), required(inputs, 1))

    op(op_type)(binary)


for _op_type, _binary in _BINARY.items():
    _register_binary(_op_type, _binary)


@op("Pow")
def pow_(node: Node, inputs: Inputs) -> torch.Tensor:
    base, exponent = required(inputs, 0), required(inputs, 1)
    return torch.pow(base, exponent).to(base.dtype)  # ONNX: the result has the base's type


@op("Mod")
def mod(node: Node, inputs: Inputs) -> torch.Tensor:
    if node.int_attr("fmod", 0):
        return torch.fmod(required(inputs, 0), required(inputs, 1))
    return torch.remainder(required(inputs, 0), required(inputs, 1))


_VARIADIC: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "Sum": torch.add,
    "Mean": torch.add,
    "Max": torch.maximum,
    "Min": torch.minimum,
}


@op(*_VARIADIC)
def variadic(node: Node, inputs: Inputs) -> torch.Tensor:
    result = functools.reduce(_VARIADIC[node.op_type], required_inputs(inputs, len(inputs)))
    return result / len(inputs) if node.op_type == "Mean" else result


@op("LeakyRelu")
def leaky_relu(node: Node, inputs: Inputs) -> torch.Tensor:
    return F.leaky_relu(required(inputs, 0), node.float_attr("alpha", 0.01))


@op("PRelu")
def prelu(node: Node, inputs: Inputs) -> torch.Tensor:
    x, slope = required(inputs, 0), required(inputs, 1)
    return torch.where(x < 0, x * slope, x)  # slope broadcasts unidirectionally


@op("Elu")
def elu(node: Node, inputs: Inputs) -> torch.Tensor:
    return F.elu(required(inputs, 0), node.float_attr("alpha", 1.0))


@op("Selu")
def selu(node: Node, inputs: Inputs) -> torch.Tensor:
    x = required(inputs, 0)
    alpha, gamma = (
        node.float_attr("alpha", 1.67326319217681884765625),
        node.float_attr("gamma", 1.05070102214813232421875),
    )
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@op("Celu")
def celu(node: Node, inputs: Inputs) -> torch.Tensor:
    return F.celu(required(inputs, 0), node.float_attr("alpha", 1.0))


@op("ThresholdedRelu")
def thresholded_relu(node: Node, inputs: Inputs) -> torch.Tensor:
    x = required(inputs, 0)
    return torch.where(x > node.float_attr("alpha", 1.0), x, torch.zeros_like(x))


@op("HardSigmoid")
def hard_sigmoid(node: Node, inputs: Inputs) -> torch.Tensor:
    return torch.clamp(node.float_attr("alpha", 0.2) * required(inputs, 0) + node.float_attr("beta", 0.5), 0.0, 1.0)


@op("Softplus")
def softplus(node: Node, inputs: Inputs) -> torch.Tensor:
    return F.softplus(required(inputs, 0))


@op("Mish")
def mish(node: Node, inputs: Inputs) -> torch.Tensor:
    return F.mish(required(inputs, 0))


def _check_gelu(node: Node) -> str | None:
    approximate = node.str_attr("approximate", "none")
    return None if approximate in ("none", "tanh") else f"approximate={approximate!r}"


@op("Gelu", check=_check_gelu)
def gelu(node: Node, inputs: Inputs) -> torch.Tensor:
    return F.gelu(required(inputs, 0), approximate=node.str_attr("approximate", "none"))


@op("Clip")
def clip(node: Node, inputs: Inputs) -> torch.Tensor:
    x, low, high = required(inputs, 0), optional(inputs, 1), optional(inputs, 2)
    if low is None and high is None:
        return x
    # clamp (not maximum/minimum) so a value exactly at a bound gets the full gradient, as in torch
    return torch.clamp(x, min=None if low is None else low.to(x.dtype), max=None if high is None else high.to(x.dtype))


@op("Where")
def where(node: Node, inputs: Inputs) -> torch.Tensor:
    return torch.where(required(inputs, 0), required(inputs, 1), required(inputs, 2))


@op("Identity")
def identity(node: Node, inputs: Inputs) -> torch.Tensor:
    return required(inputs, 0)


@op("Dropout")
def dropout(node: Node, inputs: Inputs) -> Result:
    x = required(inputs, 0)  # inference: identity (the training_mode input is ignored on purpose)
    if node.num_outputs > 1:
        return x, torch.ones(x.shape, dtype=torch.bool, device=x.device)
    return x


@op("Cast")
def cast(node: Node, inputs: Inputs) -> torch.Tensor:
    return required(inputs, 0).to(torch_dtype(node.int_attr("to")))


@op("CastLike")
def cast_like(node: Node, inputs: Inputs) -> torch.Tensor:
    return required(inputs, 0).to(required(inputs, 1).dtype)


# --- matrix products, convolutions --------------------------------------------------------


@op("MatMul")
def matmul(node: Node, inputs: Inputs) -> torch.Tensor:
    return torch.matmul(required(inputs, 0), required(inputs, 1))


@op("Gemm")
def gemm(node: Node, inputs: Inputs) -> torch.Tensor:
    a, b, c = required(inputs, 0), required(inputs, 1), optional(inputs, 2)
    a = a.t() if node.int_attr("transA", 0) else a
    b = b.t() if node.int_attr("transB", 0) else b
    alpha, beta = node.float_attr("alpha", 1.0), node.float_attr("beta", 1.0)
    if c is None:
        product = a @ b
        return product if alpha == 1.0 else alpha * product
    return torch.addmm(c, a, b, beta=beta, alpha=alpha)


@op("Einsum")
def einsum(node: Node, inputs: Inputs) -> torch.Tensor:
    return torch.einsum(node.str_attr("equation"), *required_inputs(inputs, len(inputs)))


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


def _check_spatial(node: Node) -> str | None:
    auto_pad = node.str_attr("auto_pad", "NOTSET")
    return None if auto_pad in _AUTO_PADS else f"auto_pad={auto_pad!r}"


def _same_pads(
    mode: str, sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> list[int]:
    """auto_pad SAME_*: pad so that output = ceil(input / stride); the odd pixel at the end (UPPER)."""
    begins, ends = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if mode == "SAME_UPPER" else large)
        ends.append(large if mode == "SAME_UPPER" else small)
    return begins + ends


def _window_pads(
    node: Node, sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] for Conv and pooling, resolving auto_pad."""
    mode = node.str_attr("auto_pad", "NOTSET")
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        return _same_pads(mode, sizes, kernel, strides, dilations)
    if mode == "VALID":
        return [0] * (2 * len(sizes))
    return node.ints_attr("pads", [0] * (2 * len(sizes)))


def _torch_pad_order(begins: Sequence[int], ends: Sequence[int]) -> list[int]:
    """ONNX per-axis (begin, end) lists to F.pad's order: last axis first."""
    order: list[int] = []
    for begin, end in zip(reversed(begins), reversed(ends)):
        order += [begin, end]
    return order


def _symmetric_padding(
    x: torch.Tensor, pads: Sequence[int], value: float = 0.0, limit: Sequence[int] | None = None
) -> tuple[torch.Tensor, list[int]]:
    """Split ONNX pads into the symmetric part torch can do itself and an explicit F.pad.

    ``limit`` caps the symmetric part per axis (torch pooling allows at most half a kernel).
    """
    n = len(pads) // 2
    begins, ends = pads[:n], pads[n:]
    common = [min(b, e) for b, e in zip(begins, ends)]
    if limit is not None:
        common = [min(c, cap) for c, cap in zip(common, limit)]
    extra_begin = [b - c for b, c in zip(begins, common)]
    extra_end = [e - c for e, c in zip(ends, common)]
    if any(extra_begin) or any(extra_end):
        x = F.pad(x, _torch_pad_order(extra_begin, extra_end), value=value)
    return x, common


@op("Conv", check=_check_spatial)
def conv(node: Node, inputs: Inputs) -> torch.Tensor:
    x, weight, bias = required(inputs, 0), required(inputs, 1), optional(inputs, 2)
    n = weight.dim() - 2
    kernel = list(weight.shape[2:])
    strides = node.ints_attr("strides", [1] * n)
    dilations = node.ints_attr("dilations", [1] * n)
    pads = _window_pads(node, x.shape[2:], kernel, strides, dilations)
    x, padding = _symmetric_padding(x, pads)
    return _CONV[n](x, weight, bias, strides, padding, dilations, node.int_attr("group", 1))


def _transpose_pads(
    node: Node,
    sizes: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    adjust: Sequence[int],
) -> tuple[list[int], list[int]]:
    """(begin, end) crops of the ConvTranspose output (a negative end extends it with zeros).

    With output_shape or auto_pad SAME_* the total padding makes the output the requested
    size (input * stride for SAME_*); the odd pixel is cropped at the end for SAME_UPPER and
    at the beginning otherwise, as in onnxruntime.
    """
    n = len(sizes)
    mode = node.str_attr("auto_pad", "NOTSET")
    output_shape = node.ints_attr("output_shape") if node.has("output_shape") else None
    if output_shape is None and mode not in ("SAME_UPPER", "SAME_LOWER"):
        if mode == "VALID":
            return [0] * n, [0] * n
        pads = node.ints_attr("pads", [0] * (2 * n))
        return pads[:n], pads[n:]
    targets = list(output_shape)[-n:] if output_shape is not None else [s * st for s, st in zip(sizes, strides)]
    begins, ends = [], []
    for size, k, s, d, a, target in zip(sizes, kernel, strides, dilations, adjust, targets):
        total = (size - 1) * s + a + (k - 1) * d + 1 - target
        if total < 0:  # a larger requested output is zero-extended at the end
            begins.append(0)
            ends.append(total)
            continue
        small, large = total // 2, total - total // 2
        begins.append(small if mode == "SAME_UPPER" else large)
        ends.append(large if mode == "SAME_UPPER" else small)
    return begins, ends


@op("ConvTranspose", check=_check_spatial)
def conv_transpose(node: Node, inputs: Inputs) -> torch.Tensor:
    x, weight, bias = required(inputs, 0), required(inputs, 1), optional(inputs, 2)
    n = weight.dim() - 2
    kernel = list(weight.shape[2:])
    strides = node.ints_attr("strides", [1] * n)
    dilations = node.ints_attr("dilations", [1] * n)
    adjust = node.ints_attr("output_padding", [0] * n)
    begins, ends = _transpose_pads(node, x.shape[2:], kernel, strides, dilations, adjust)
    # torch crops symmetrically and adds output_padding itself; the asymmetric rest is a crop
    # (or zero extension) with F.pad
    common = [max(min(b, e), 0) for b, e in zip(begins, ends)]
    crop_begin = [c - b for b, c in zip(begins, common)]
    crop_end = [c - e for e, c in zip(ends, common)]
    if not any(crop_begin) and not any(crop_end):
        return _CONV_TRANSPOSE[n](x, weight, bias, strides, common, adjust, node.int_attr("group", 1), dilations)
    y = _CONV_TRANSPOSE[n](x, weight, None, strides, common, adjust, node.int_attr("group", 1), dilations)
    y = F.pad(y, _torch_pad_order(crop_begin, crop_end))
    return y if bias is None else y + bias.reshape([-1] + [1] * n)


# --- pooling ------------------------------------------------------------------------------

_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _check_max_pool(node: Node) -> str | None:
    if node.num_outputs > 1:
        return "the Indices output"
    return _check_spatial(node)


def _check_average_pool(node: Node) -> str | None:
    dilations = node.ints_attr("dilations", [])
    if any(d != 1 for d in dilations):
        return f"dilations={dilations}"
    return _check_spatial(node)


def _pool_geometry(node: Node, x: torch.Tensor) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """kernel, strides, dilations, pads and the extra end padding that ceil_mode needs."""
    kernel = node.ints_attr("kernel_shape")
    n = len(kernel)
    strides = node.ints_attr("strides", [1] * n)
    dilations = node.ints_attr("dilations", [1] * n)
    sizes = list(x.shape[2:])
    pads = _window_pads(node, sizes, kernel, strides, dilations)
    extra = [0] * n
    if node.int_attr("ceil_mode", 0):
        for i in range(n):
            span = (kernel[i] - 1) * dilations[i] + 1
            padded = sizes[i] + pads[i] + pads[n + i]
            outputs = -(-(padded - span) // strides[i]) + 1
            if (outputs - 1) * strides[i] >= sizes[i] + pads[i]:
                outputs -= 1  # a window may not start in the end padding
            extra[i] = max((outputs - 1) * strides[i] + span - padded, 0)
    return kernel, strides, dilations, pads, extra


@op("MaxPool", check=_check_max_pool)
def max_pool(node: Node, inputs: Inputs) -> torch.Tensor:
    x = required(inputs, 0)
    kernel, strides, dilations, pads, extra = _pool_geometry(node, x)
    n = len(kernel)
    pads = pads[:n] + [end + more for end, more in zip(pads[n:], extra)]
    # Explicit padding holds the lowest finite value, as onnxruntime's windows that see only
    # padding do (possible with dilations); torch's own padding (-inf) is fine otherwise.
    limit = [k // 2 if all(d == 1 for d in dilations) else 0 for k in kernel]
    x, padding = _symmetric_padding(x, pads, value=torch.finfo(x.dtype).min, limit=limit)
    return _MAX_POOL[n](x, kernel, strides, padding, dilations)


@op("AveragePool", check=_check_average_pool)
def average_pool(node: Node, inputs: Inputs) -> torch.Tensor:
    x = required(inputs, 0)
    kernel, strides, _, pads, extra = _pool_geometry(node, x)
    n = len(kernel)
    include_pad = bool(node.int_attr("count_include_pad", 0))
    symmetric = pads[:n] == pads[n:] and all(p <= k // 2 for p, k in zip(pads, kernel))
    if symmetric and not any(extra):
        return _AVG_POOL[n](x, kernel, strides, pads[:n], False, include_pad)
    # General case: window sums divided by the number of counted positions (the ceil-mode
    # region is never counted; explicit pads are counted only with count_include_pad).
    order = _torch_pad_order(pads[:n], pads[n:])
    extra_order = _torch_pad_order([0] * n, extra)
    summed = _AVG_POOL[n](F.pad(F.pad(x, order), extra_order), kernel, strides) * math.prod(kernel)
    mask = torch.ones([1, 1, *x.shape[2:]], dtype=x.dtype, device=x.device)
    mask = F.pad(F.pad(mask, order, value=1.0 if include_pad else 0.0), extra_order)
    counts = _AVG_POOL[n](mask, kernel, strides) * math.prod(kernel)
    return summed / counts


@op("GlobalAveragePool")
def global_average_pool(node: Node, inputs: Inputs) -> torch.Tensor:
    x = required(inputs, 0)
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@op("GlobalMaxPool")
def global_max_pool(node: Node, inputs: Inputs) -> torch.Tensor:
    x = required(inputs, 0)
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


# --- normalization, softmax ---------------------------------------------------------------


def _check_batch_norm(node: Node) -> str | None:
    return "training_mode=1" if node.int_attr("training_mode", 0) else None


@op("BatchNormalization", check=_check_batch_norm)
def batch_normalization(node: Node, inputs: Inputs) -> torch.Tensor:
    x, scale, bias, mean, var = required_inputs(inputs, 5)
    # written out rather than F.batch_norm, which cannot differentiate w.r.t. mean and var
    shape = [-1] + [1] * (x.dim() - 2)
    factor = (scale * torch.rsqrt(var + node.float_attr("epsilon", 1e-5))).reshape(shape)
    return (x - mean.reshape(shape)) * factor + bias.reshape(shape)


@op("InstanceNormalization")
def instance_normalization(node: Node, inputs: Inputs) -> torch.Tensor:
    x, scale, bias = required_inputs(inputs, 3)
    dims = tuple(range(2, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    shape = [-1] + [1] * len(dims)
    normalized = (x - mean) * torch.rsqrt(var + node.float_attr("epsilon", 1e-5))
    return normalized * scale.reshape(shape) + bias.reshape(shape)


@op("LayerNormalization")
def layer_normalization(node: Node, inputs: Inputs) -> Result:
    x, scale, bias = required(inputs, 0), required(inputs, 1), optional(inputs, 2)
    axis = _axis(node.int_attr("axis", -1), x.dim())
    epsilon = node.float_attr("epsilon", 1e-5)
    y = F.layer_norm(x, x.shape[axis:], eps=epsilon) * scale
    if bias is not None:
        y = y + bias
    if node.num_outputs == 1:
        return y
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt(x.var(dim=dims, keepdim=True, unbiased=False) + epsilon)
    return y, mean, inv_std


def _softmax_like(node: Node, x: torch.Tensor, fn: Callable[..., torch.Tensor]) -> torch.Tensor:
    if node.opset >= 13:
        return fn(x, dim=node.int_attr("axis", -1))
    # before opset 13: coerce to 2-D [prod(shape[:axis]), prod(shape[axis:])], normalize rows
    axis = _axis(node.int_attr("axis", 1), x.dim())
    rows = math.prod(x.shape[:axis])
    return fn(x.reshape(rows, -1), dim=1).reshape(x.shape)


@op("Softmax")
def softmax(node: Node, inputs: Inputs) -> torch.Tensor:
    return _softmax_like(node, required(inputs, 0), torch.softmax)


@op("LogSoftmax")
def log_softmax(node: Node, inputs: Inputs) -> torch.Tensor:
    return _softmax_like(node, required(inputs, 0), torch.log_softmax)


@op("Hardmax")
def hardmax(node: Node, inputs: Inputs) -> torch.Tensor:
    def one_hot_max(x: torch.Tensor, dim: int) -> torch.Tensor:
        winner = torch.argmax(x, dim=dim, keepdim=True)  # the first maximum, as ONNX
        return torch.zeros_like(x).scatter(dim, winner, 1.0)

    return _softmax_like(node, required(inputs, 0), one_hot_max)


@op("LpNormalization")
def lp_normalization(node: Node, inputs: Inputs) -> torch.Tensor:
    x = required(inputs, 0)
    return x / torch.linalg.vector_norm(x, ord=node.int_attr("p", 2), dim=node.int_attr("axis", -1), keepdim=True)


# --- reductions ---------------------------------------------------------------------------


def _prod(x: torch.Tensor, dim: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    for d in sorted(dim, reverse=True):
        x = torch.prod(x, dim=d, keepdim=keepdim)
    return x


_REDUCERS: dict[str, Callable[[torch.Tensor, tuple[int, ...], bool], torch.Tensor]] = {
    "ReduceMean": lambda x, d, k: torch.mean(x, dim=d, keepdim=k),
    "ReduceSum": lambda x, d, k: torch.sum(x, dim=d, keepdim=k),
    "ReduceMax": lambda x, d, k: torch.amax(x, dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: torch.amin(x, dim=d, keepdim=k),
    "ReduceProd": _prod,
    "ReduceL1": lambda x, d, k: torch.sum(torch.abs(x), dim=d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.sqrt(torch.sum(x * x, dim=d, keepdim=k)),
    "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k),
    "ReduceLogSum": lambda x, d, k: torch.log(torch.sum(x, dim=d, keepdim=k)),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
}


@op(*_REDUCERS)
def reduce(node: Node, inputs: Inputs) -> torch.Tensor:
    x = required(inputs, 0)
    since = 13 if node.op_type == "ReduceSum" else 18  # when axes became an input
    axes = _attr_or_input(node, inputs, "axes", 1, since)
    if not axes:
        if node.int_attr("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.dim()))
    dims = tuple(_axis(a, x.dim()) for a in axes)
    return _REDUCERS[node.op_type](x, dims, bool(node.int_attr("keepdims", 1)))


@op("ArgMax", "ArgMin")
def arg_extreme(node: Node, inputs: Inputs) -> torch.Tensor:
    x = required(inputs, 0)
    axis = _axis(node.int_attr("axis", 0), x.dim())
    keepdim = bool(node.int_attr("keepdims", 1))
    fn = torch.argmax if node.op_type == "ArgMax" else torch.argmin
    if node.int_attr("select_last_index", 0):
        flipped = fn(torch.flip(x, [axis]), dim=axis, keepdim=keepdim)
        return x.shape[axis] - 1 - flipped
    return fn(x, dim=axis, keepdim=keepdim)


@op("CumSum")
def cumsum(node: Node, inputs: Inputs) -> torch.Tensor:
    x = required(inputs, 0)
    axis = _axis(_ints(required(inputs, 1))[0], x.dim())
    if node.int_attr("reverse", 0):
        x = torch.flip(x, [axis])
    y = torch.cumsum(x, dim=axis)
    if node.int_attr("exclusive", 0):
        y = y - x
    return torch.flip(y, [axis]) if node.int_attr("reverse", 0) else y


@op("TopK")
def top_k(node: Node, inputs: Inputs) -> Result:
    x = required(inputs, 0)
    k = _ints(required(inputs, 1))[0]
    values, indices = torch.topk(
        x, k, dim=node.int_attr("axis", -1), largest=bool(node.int_attr("largest", 1)), sorted=True
    )
    return values, indices


# --- shape and data movement --------------------------------------------------------------


@op("Shape")
def shape(node: Node, inputs: Inputs) -> torch.Tensor:
    x = required(inputs, 0)
    dims = list(x.shape)[node.int_attr("start", 0) : node.int_attr("end", x.dim())]  # Python slicing clamps
    return torch.tensor(dims, dtype=torch.int64, device=x.device)


@op("Size")
def size(node: Node, inputs: Inputs) -> torch.Tensor:
    x = required(inputs, 0)
    return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@op("Reshape")
def reshape(node: Node, inputs: Inputs) -> torch.Tensor:
    x = required(inputs, 0)
    target = _ints(required(inputs, 1))
    if not node.int_attr("allowzero", 0):  # 0 copies the input's dimension
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


@op("Flatten")
def flatten(node: Node, inputs: Inputs) -> torch.Tensor:
    x = required(inputs, 0)
    axis = _axis(node.int_attr("axis", 1), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@op("Transpose")
def transpose(node: Node, inputs: Inputs) -> torch.Tensor:
    x = required(inputs, 0)
    return x.permute(node.ints_attr("perm", list(reversed(range(x.dim())))))


@op("Squeeze")
def squeeze(node: Node, inputs: Inputs) -> torch.Tensor:
    x = required(inputs, 0)
    axes = _attr_or_input(node, inputs, "axes", 1, 13)
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(_axis(a, x.dim()) for a in axes))


@op("Unsqueeze")
def unsqueeze(node: Node, inputs: Inputs) -> torch.Tensor:
    x = required(inputs, 0)
    axes = _attr_or_input(node, inputs, "axes", 1, 13)
    if axes is None:
        raise ValueError("Unsqueeze needs axes")
    rank = x.dim() + len(axes)
    for axis in sorted(_axis(a, rank) for a in axes):  # axes index the output
        x = x.unsqueeze(axis)
    return x


@op("Concat")
def concat(node: Node, inputs: Inputs) -> torch.Tensor:
    return torch.cat(required_inputs(inputs, len(inputs)), dim=node.int_attr("axis"))


@op("Split")
def split(node: Node, inputs: Inputs) -> Result:
    x = required(inputs, 0)
    axis = _axis(node.int_attr("axis", 0), x.dim())
    sizes = _attr_or_input(node, inputs, "split", 1, 13)
    if sizes is not None:
        return torch.split(x, sizes, dim=axis)
    # equal parts; from opset 18 the last may be smaller
    parts = node.int_attr("num_outputs", node.num_outputs)
    return torch.split(x, -(-x.shape[axis] // parts), dim=axis)


def _normalize_indices(indices: torch.Tensor, size: int) -> torch.Tensor:
    return torch.remainder(indices, size)  # [-size, size) -> [0, size) in one op


@op("Gather")
def gather(node: Node, inputs: Inputs) -> torch.Tensor:
    x, indices = required(inputs, 0), required(inputs, 1)
    axis = _axis(node.int_attr("axis", 0), x.dim())
    flat = _normalize_indices(indices.reshape(-1), x.shape[axis])
    picked = torch.index_select(x, axis, flat)
    return picked.reshape(list(x.shape[:axis]) + list(indices.shape) + list(x.shape[axis + 1 :]))


@op("GatherElements")
def gather_elements(node: Node, inputs: Inputs) -> torch.Tensor:
    x, indices = required(inputs, 0), required(inputs, 1)
    axis = _axis(node.int_attr("axis", 0), x.dim())
    return torch.gather(x, axis, _normalize_indices(indices, x.shape[axis]))


@op("GatherND")
def gather_nd(node: Node, inputs: Inputs) -> torch.Tensor:
    x, indices = required(inputs, 0), required(inputs, 1)
    b, k = node.int_attr("batch_dims", 0), indices.shape[-1]
    batch = math.prod(x.shape[:b])
    data = x.reshape(batch, *x.shape[b:])
    index = indices.reshape(batch, -1, k)  # [batch, picks, k]
    picks = index.shape[1]
    rows = torch.arange(batch, device=x.device).unsqueeze(1).expand(batch, picks)
    coordinates = [torch.remainder(index[..., i], data.shape[1 + i]) for i in range(k)]
    picked = data[(rows, *coordinates)]  # [batch, picks, rest...]
    return picked.reshape(*x.shape[:b], *indices.shape[b:-1], *x.shape[b + k :])


def _check_scatter_nd(node: Node) -> str | None:
    reduction = node.str_attr("reduction", "none")
    return None if reduction in ("none", "add") else f"reduction={reduction!r}"


@op("ScatterND", check=_check_scatter_nd)
def scatter_nd(node: Node, inputs: Inputs) -> torch.Tensor:
    x, indices, updates = required(inputs, 0), required(inputs, 1), required(inputs, 2)
    k = indices.shape[-1]
    coordinates = tuple(torch.remainder(indices[..., i], x.shape[i]) for i in range(k))
    return torch.index_put(x, coordinates, updates, accumulate=node.str_attr("reduction", "none") == "add")


def _slice_bounds(start: int, end: int, step: int, size: int) -> tuple[int, int]:
    """Clamp ONNX Slice bounds (negative counts from the end) as the spec says."""
    start = start + size if start < 0 else start
    end = end + size if end < 0 else end
    if step > 0:
        return min(max(start, 0), size), min(max(end, 0), size)
    return min(max(start, 0), size - 1), min(max(end, -1), size - 1)


@op("Slice")
def slice_(node: Node, inputs: Inputs) -> torch.Tensor:
    x = required(inputs, 0)
    starts, ends = _ints(required(inputs, 1)), _ints(required(inputs, 2))
    axes = _optional_ints(inputs, 3, list(range(len(starts))))
    steps = _optional_ints(inputs, 4, [1] * len(starts))
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _axis(axis, x.dim())
        start, end = _slice_bounds(start, end, step, x.shape[axis])
        if step > 0:
            index = [slice(None)] * axis + [slice(start, end, step)]
            x = x[tuple(index)]
        elif start <= end:  # an empty negative-step range
            x = x.narrow(axis, 0, 0)
        else:  # torch has no negative-step slicing: gather the positions
            positions = torch.arange(start, end, step, device=x.device)
            x = torch.index_select(x, axis, positions)
    return x


def _check_pad(node: Node) -> str | None:
    mode = node.str_attr("mode", "constant")
    return None if mode in ("constant", "reflect", "edge", "wrap") else f"mode={mode!r}"


def _pad_positions(size: int, begin: int, end: int, mode: str, device: torch.device) -> torch.Tensor:
    """Source positions for the padded (or cropped, if negative) axis in reflect/edge/wrap mode."""
    positions = torch.arange(-begin, size + end, device=device)
    if mode == "edge":
        return positions.clamp(0, size - 1)
    if mode == "wrap":
        return torch.remainder(positions, size)
    period = 2 * (size - 1)  # reflect without repeating the edge
    folded = torch.remainder(positions, period) if period > 0 else torch.zeros_like(positions)
    return torch.where(folded >= size, period - folded, folded)


_TORCH_PAD_MODES = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _torch_can_pad(x: torch.Tensor, begins: list[int], ends: list[int], mode: str) -> bool:
    """F.pad's own reflect/replicate/circular kernels: spatial axes of 3-D to 5-D tensors only."""
    if not 3 <= x.dim() <= 5 or any(begins[:2]) or any(ends[:2]) or min(begins + ends) < 0:
        return False
    return mode == "edge" or all(max(b, e) < size for b, e, size in zip(begins[2:], ends[2:], x.shape[2:]))


@op("Pad", check=_check_pad)
def pad(node: Node, inputs: Inputs) -> torch.Tensor:
    x = required(inputs, 0)
    pads = _ints(required(inputs, 1))
    value = optional(inputs, 2)
    axes = _optional_ints(inputs, 3, list(range(x.dim())))
    axes = [_axis(a, x.dim()) for a in axes]
    begins, ends = [0] * x.dim(), [0] * x.dim()
    for i, axis in enumerate(axes):
        begins[axis], ends[axis] = pads[i], pads[len(axes) + i]
    mode = node.str_attr("mode", "constant")
    if mode == "constant":
        # the fill value is a graph constant in every export; F.pad needs it as a number
        fill = 0.0 if value is None or value.numel() == 0 else value.reshape(()).item()
        return F.pad(x, _torch_pad_order(begins, ends), value=fill)
    if _torch_can_pad(x, begins, ends, mode):
        return F.pad(x, _torch_pad_order(begins[2:], ends[2:]), mode=_TORCH_PAD_MODES[mode])
    for axis in range(x.dim()):
        if begins[axis] or ends[axis]:
            positions = _pad_positions(x.shape[axis], begins[axis], ends[axis], mode, x.device)
            x = torch.index_select(x, axis, positions)
    return x


@op("Expand")
def expand(node: Node, inputs: Inputs) -> torch.Tensor:
    x = required(inputs, 0)
    # numpy's rule is ONNX's bidirectional broadcast (and much cheaper than torch.broadcast_shapes)
    return x.expand(np.broadcast_shapes(tuple(x.shape), tuple(_ints(required(inputs, 1)))))


@op("Tile")
def tile(node: Node, inputs: Inputs) -> torch.Tensor:
    return required(inputs, 0).repeat(_ints(required(inputs, 1)))


@op("Constant")
def constant(node: Node, inputs: Inputs) -> torch.Tensor:
    if node.has("value"):
        return node.tensor_attr("value")
    for name, dtype in (
        ("value_float", torch.float32),
        ("value_floats", torch.float32),
        ("value_int", torch.int64),
        ("value_ints", torch.int64),
    ):
        if name in node.attrs:
            return torch.tensor(node.attrs[name], dtype=dtype)
    raise ValueError(f"Constant node {node.name!r} has no supported value attribute")


def _check_constant(node: Node) -> str | None:
    known = {"value", "value_float", "value_floats", "value_int", "value_ints"}
    return None if known & set(node.attrs) else f"attributes {sorted(node.attrs)}"


OPS["Constant"] = OpSpec(constant, _check_constant)


@op("ConstantOfShape")
def constant_of_shape(node: Node, inputs: Inputs) -> torch.Tensor:
    value = node.tensor_attr("value") if node.has("value") else torch.zeros(1, dtype=torch.float32)
    shape_tensor = required(inputs, 0)
    fill = value.reshape(()).to(shape_tensor.device)
    return fill.expand(_ints(shape_tensor)).clone()


@op("Range")
def range_(node: Node, inputs: Inputs) -> torch.Tensor:
    start, limit, delta = required(inputs, 0), required(inputs, 1), required(inputs, 2)
    numbers = [t.reshape(()).item() for t in (start, limit, delta)]
    return torch.arange(*numbers, dtype=start.dtype, device=start.device)


@op("DepthToSpace")
def depth_to_space(node: Node, inputs: Inputs) -> torch.Tensor:
    x = required(inputs, 0)
    b = node.int_attr("blocksize")
    n, c, h, w = x.shape
    if node.str_attr("mode", "DCR") == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (b * b), h * b, w * b)


@op("SpaceToDepth")
def space_to_depth(node: Node, inputs: Inputs) -> torch.Tensor:
    x = required(inputs, 0)
    b = node.int_attr("blocksize")
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


@op("Trilu")
def trilu(node: Node, inputs: Inputs) -> torch.Tensor:
    x = required(inputs, 0)
    k = _optional_ints(inputs, 1, [0])[0]
    return torch.triu(x, k) if node.int_attr("upper", 1) else torch.tril(x, k)


# --- Resize -------------------------------------------------------------------------------

_COORDINATE_MODES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric")
_NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _check_resize(node: Node) -> str | None:
    problems = []
    mode = node.str_attr("mode", "nearest")
    if mode not in ("nearest", "linear", "cubic"):
        problems.append(f"mode={mode!r}")
    coordinate_mode = node.str_attr("coordinate_transformation_mode", "half_pixel")
    if coordinate_mode not in _COORDINATE_MODES:
        problems.append(f"coordinate_transformation_mode={coordinate_mode!r}")
    nearest_mode = node.str_attr("nearest_mode", "round_prefer_floor")
    if nearest_mode not in _NEAREST_MODES:
        problems.append(f"nearest_mode={nearest_mode!r}")
    if node.int_attr("antialias", 0):
        problems.append("antialias=1")
    return ", ".join(problems) or None


@functools.lru_cache(maxsize=256)
def _source_coordinates(mode: str, in_size: int, out_size: int, scale: float) -> np.ndarray:
    """Input-space coordinate of every output position along one axis.

    Computed in float32 with onnxruntime's formulas, operation by operation, so nearest
    rounding at exact half-way points agrees with it. Cached as numpy, never as tensors: a
    tensor created inside a torch.func transform is wrapped for it and must not outlive it.
    """
    f = np.float32
    x, s, half = np.arange(out_size, dtype=f), f(scale), f(0.5)
    if mode == "asymmetric":
        result = x / s
    elif mode == "align_corners":
        result = x * f(in_size - 1) / f(out_size - 1) if out_size > 1 else np.zeros_like(x)
    elif mode == "pytorch_half_pixel":
        result = (x + half) / s - half if out_size > 1 else np.zeros_like(x)
    elif mode == "half_pixel_symmetric":
        adjustment = f(out_size) / (s * f(in_size))
        offset = f(in_size) / f(2) * (f(1) - adjustment)
        result = offset + (x + half) / s - half
    else:  # half_pixel
        result = (x + half) / s - half
    result = result.astype(np.float64)
    result.flags.writeable = False
    return result


def _nearest_index(coordinates: torch.Tensor, nearest_mode: str, in_size: int) -> torch.Tensor:
    rounded = {
        "round_prefer_floor": lambda c: torch.ceil(c - 0.5),
        "round_prefer_ceil": lambda c: torch.floor(c + 0.5),
        "floor": torch.floor,
        "ceil": torch.ceil,
    }[nearest_mode](coordinates)
    return rounded.clamp(0, in_size - 1).long()


def _along(weights: torch.Tensor, axis: int, rank: int) -> torch.Tensor:
    return weights.reshape([-1] + [1] * (rank - axis - 1))


def _linear_1d(x: torch.Tensor, axis: int, coordinates: torch.Tensor) -> torch.Tensor:
    in_size = x.shape[axis]
    c = coordinates.clamp(0, in_size - 1)
    low = torch.floor(c).long()
    high = (low + 1).clamp(max=in_size - 1)
    t = _along((c - low).to(x.dtype), axis, x.dim())
    return torch.index_select(x, axis, low) * (1 - t) + torch.index_select(x, axis, high) * t


def _cubic_1d(x: torch.Tensor, axis: int, coordinates: torch.Tensor, a: float, exclude_outside: bool) -> torch.Tensor:
    in_size = x.shape[axis]
    base = torch.floor(coordinates)
    t = coordinates - base
    distances = [t + 1, t, 1 - t, 2 - t]
    # Keys cubic kernel: |d| <= 1 and 1 < |d| < 2 pieces
    weights = [
        ((a + 2) * d - (a + 3)) * d * d + 1 if i in (1, 2) else ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        for i, d in enumerate(distances)
    ]
    positions = [base.long() + offset for offset in (-1, 0, 1, 2)]
    if exclude_outside:
        weights = [w * ((p >= 0) & (p < in_size)) for w, p in zip(weights, positions)]
        total = sum(weights)
        weights = [w / total for w in weights]

    def term(w: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return torch.index_select(x, axis, p.clamp(0, in_size - 1)) * _along(w.to(x.dtype), axis, x.dim())

    result = term(weights[0], positions[0])
    for w, p in zip(weights[1:], positions[1:]):
        result = result + term(w, p)
    return result


def _resize_targets(
    node: Node, x: torch.Tensor, scales: torch.Tensor | None, sizes: torch.Tensor | None
) -> list[tuple[int, int, float]]:
    """(axis, output size, scale) for each resized axis."""
    axes = [_axis(a, x.dim()) for a in node.ints_attr("axes", list(range(x.dim())))]
    in_sizes = [x.shape[a] for a in axes]
    if sizes is not None and sizes.numel() > 0:
        out_sizes = _ints(sizes)
        factors = [o / i for o, i in zip(out_sizes, in_sizes)]
        policy = node.str_attr("keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            factor = min(factors) if policy == "not_larger" else max(factors)
            factors = [factor] * len(axes)
            out_sizes = [math.floor(factor * i + 0.5) for i in in_sizes]
    elif scales is not None:
        factors = [float(s) for s in scales.reshape(-1).tolist()]
        out_sizes = [math.floor(i * s) for i, s in zip(in_sizes, factors)]
    else:
        raise ValueError("Resize needs scales or sizes")
    return list(zip(axes, out_sizes, factors))


_INTERPOLATE_LINEAR = {3: "linear", 4: "bilinear", 5: "trilinear"}


def _interpolate(node: Node, x: torch.Tensor, targets: list[tuple[int, int, float]]) -> torch.Tensor | None:
    """F.interpolate for the cases where its formulas are ONNX's (the common upsampling
    exports), else None: its fused kernels are much faster than the per-axis gathers."""
    resized = [(axis, out, scale) for axis, out, scale in targets if not (out == x.shape[axis] and scale == 1.0)]
    if x.dim() not in _INTERPOLATE_LINEAR or any(axis < 2 for axis, _, _ in resized) or len(targets) < x.dim() - 2:
        return None
    spatial = [t for t in targets if t[0] >= 2]
    sizes = [out for _, out, _ in spatial]
    scales = [scale for _, _, scale in spatial]
    if any(out == x.shape[axis] and scale != 1.0 for axis, out, scale in spatial):
        return None  # torch copies same-size axes; ONNX still shifts them by the scale
    mode = node.str_attr("mode", "nearest")
    coordinates = node.str_attr("coordinate_transformation_mode", "half_pixel")
    nearest_floor = mode == "nearest" and node.str_attr("nearest_mode", "round_prefer_floor") == "floor"
    # 1/s exact in float for these scales: the same indices as ONNX's
    if nearest_floor and coordinates == "asymmetric" and all(s in (1.0, 2.0, 4.0, 8.0) for s in scales):
        return F.interpolate(x, size=sizes, mode="nearest")
    if mode == "linear" and coordinates == "align_corners":
        return F.interpolate(x, size=sizes, mode=_INTERPOLATE_LINEAR[x.dim()], align_corners=True)
    linear_half_pixel = mode == "linear" and (
        coordinates == "half_pixel" or (coordinates == "pytorch_half_pixel" and min(sizes) > 1)
    )
    if linear_half_pixel and all(math.floor(x.shape[a] * s) == out for a, out, s in spatial):
        return F.interpolate(x, scale_factor=scales, mode=_INTERPOLATE_LINEAR[x.dim()], align_corners=False)
    return None


@op("Resize", check=_check_resize)
def resize(node: Node, inputs: Inputs) -> torch.Tensor:
    x = required(inputs, 0)
    mode = node.str_attr("mode", "nearest")
    coordinate_mode = node.str_attr("coordinate_transformation_mode", "half_pixel")
    targets = _resize_targets(node, x, optional(inputs, 2), optional(inputs, 3))
    if all(out == x.shape[axis] for axis, out, _ in targets):
        return x  # onnxruntime copies when the shape does not change, whatever the scales
    fast = _interpolate(node, x, targets)
    if fast is not None:
        return fast
    for axis, out_size, scale in targets:
        in_size = x.shape[axis]
        if out_size == in_size and scale == 1.0:
            continue
        coordinates = torch.tensor(_source_coordinates(coordinate_mode, in_size, out_size, scale), device=x.device)
        if mode == "nearest":
            index = _nearest_index(coordinates, node.str_attr("nearest_mode", "round_prefer_floor"), in_size)
            x = torch.index_select(x, axis, index)
        elif mode == "linear":
            x = _linear_1d(x, axis, coordinates)
        else:
            a = node.float_attr("cubic_coeff_a", -0.75)
            x = _cubic_1d(x, axis, coordinates, a, bool(node.int_attr("exclude_outside", 0)))
    return x


# LSTM and GRU live in their own module (loops over time); importing it registers them here.
# It imports this module, so the import comes last, once everything it uses is defined.
from sensitivity import onnx_recurrent  # noqa: E402, F401
