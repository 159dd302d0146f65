"""An ONNX graph as a differentiable torch ``Program`` (see ``sensitivity.program``).

``load_onnx`` parses the graph once: it normalises it (``sensitivity.normalize``: Constant weights
become initializers, -1 dims are dynamic, old opsets are upgraded), inlines local functions, checks every op is
supported (``check_supported``), sorts the nodes topologically, parses attributes, folds
nodes whose inputs are all constants, and works out when each intermediate tensor can be
dropped (reference counting). ``forward`` then only walks the prepared steps; values that
depend only on the input shapes (the Shape/Gather/Concat chains of dynamic-batch exports)
are computed once per input-shape signature and cached. The ONNX content is interpreted
by the handlers in ``sensitivity.onnx_ops``; nothing in the file is ever executed.

``If`` runs its branches as subgraphs that see the outer scope's values. A condition known at
load (a constant, an initializer, or computed from them only) picks its branch once: the
branch's nodes are inlined in place of the ``If`` and the other branch is never prepared for
running. Otherwise the condition is read at run time (``_IfHandler``) and the taken branch
runs; autograd and ``torch.func.grad``/``jvp`` follow it like any Python control flow, as long
as the condition is not batched by ``torch.func.vmap`` (it never is when it depends on the
inputs only, as in exported models: the HVP probes batch weight tangents, not inputs).

The weights of the quantizable layers (``sensitivity.layers.find_layers``) are not baked in:
they are passed to ``forward`` so autograd and ``torch.func`` can differentiate with respect
to them. Every other initializer is a constant held by the program.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import onnx
import onnx.inliner
import torch

from sensitivity.branches import branch, is_if, node_reads, subgraphs
from sensitivity.layers import Layer, find_layers
from sensitivity.normalize import (
    DEFAULT_DOMAINS,
    MIN_OPSET,
    NormalizedModel,
    default_opset,
    normalize_model,
    refuse_quantized,
)
from sensitivity.onnx_ops import OPS, Handler, Inputs, Node, parse_attributes, required, tensor_from_proto
from sensitivity.program import ProgramAttributes
from sensitivity.samples import SampleAxes, fixed_batch, input_sample_axes

MAX_OPSET = 21
_CPU = torch.device("cpu")
_CONTROL_FLOW = ("Loop", "Scan", "SequenceMap")  # If is interpreted: see _IfHandler

ModelSource = onnx.ModelProto | NormalizedModel | str | os.PathLike


class UnsupportedOpsError(ValueError):
    """The model uses ops (or op attributes) the interpreter does not implement."""


@dataclass(frozen=True)
class _Step:
    node: Node
    handler: Handler
    inputs: tuple[str, ...]  # "" marks an omitted optional input
    outputs: tuple[str, ...]  # "" marks an output nobody asked for


@dataclass(frozen=True)
class _Plan:
    """Steps to run in order; per step, the tensors that die after it (no later step or graph
    output reads them) and the outputs to remember for the shape cache."""

    steps: tuple[_Step, ...]
    releases: tuple[tuple[str, ...], ...]
    records: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class _Graph:
    """What ``load_onnx`` prepared; shared by the device copies of a program.

    ``full`` runs every node. ``data`` skips the nodes whose values depend only on tensor
    shapes (Shape -> Gather -> Concat -> Reshape chains of exports with a dynamic batch):
    their values are cached per input shapes. ``data`` is None when nothing can be skipped,
    or when some shape argument depends on tensor values, so shapes are not a sufficient key.
    ``host`` names the tensors only ever read as shape arguments (through ``.tolist()``):
    they stay on the CPU whatever the program's device, so reading them never waits for
    the accelerator.
    """

    full: _Plan
    data: _Plan | None
    host: frozenset[str] = frozenset()


@dataclass(frozen=True)
class _Recorded:
    """A shape-derived value kept as plain data: a tensor created inside a torch.func
    transform is wrapped for that transform and must not be reused after it."""

    values: tuple
    dtype: torch.dtype
    shape: tuple[int, ...]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> _Recorded:
        return cls(tuple(tensor.reshape(-1).tolist()), tensor.dtype, tuple(tensor.shape))

    def tensor(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.values, dtype=self.dtype, device=device).reshape(self.shape)


class OnnxProgram(ProgramAttributes):
    """A ``Program`` interpreting an ONNX graph with torch ops (build it with ``load_onnx``).

    ``shape_cache_size`` bounds how many input-shape signatures keep their shape values.
    ``sample_axes``: the user's sample axes merged over those read off the normalised model's
    declared input shapes (``sensitivity.samples``).
    """

    def __init__(
        self,
        *,
        layers: Sequence[Layer],
        layer_weights: Mapping[str, torch.Tensor],
        constants: Mapping[str, torch.Tensor],
        graph: _Graph,
        input_names: Sequence[str],
        output_names: Sequence[str],
        opset: int,
        shape_cache_size: int = 8,
        device: torch.device = _CPU,
        normalization: NormalizedModel | None = None,
        sample_axes: SampleAxes | None = None,
    ) -> None:
        self._layers = tuple(layers)
        self._layer_weights = MappingProxyType(dict(layer_weights))
        self._constants = dict(constants)
        self._graph = graph
        self._input_names = tuple(input_names)
        self._output_names = tuple(output_names)
        self._shape_cache: dict[tuple[tuple[int, ...], ...], dict[str, _Recorded]] = {}
        self._shape_cache_size = shape_cache_size
        self.opset = opset
        self._sample_axes = None if normalization is None else input_sample_axes(normalization.model, sample_axes)
        self._fixed_batch_size = None if normalization is None else fixed_batch(normalization.model, sample_axes)
        self.device = device
        self.normalization = normalization  # what normalisation changed in the loaded model, for reports

    @property
    def num_steps(self) -> int:
        """Nodes run per call once the shape values are cached (constants are folded at load)."""
        plan = self._graph.data or self._graph.full
        return len(plan.steps)

    def __call__(self, weights: Mapping[str, torch.Tensor], inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        return self.forward(weights, inputs)

    def forward(self, weights: Mapping[str, torch.Tensor], inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        env = self._environment(weights, inputs)
        if self._graph.data is None or self._shape_cache_size <= 0:
            _run(self._graph.full, env)
        else:
            key = tuple(tuple(inputs[name].shape) for name in self._input_names)
            cached = self._shape_cache.get(key)
            if cached is not None:
                host = self._graph.host
                env.update(
                    (name, value.tensor(torch.device("cpu") if name in host else self.device))
                    for name, value in cached.items()
                )
                _run(self._graph.data, env)
            else:
                record: dict[str, torch.Tensor] = {}
                _run(self._graph.full, env, record)
                self._remember(key, record)
        return [env[name] for name in self._output_names]

    def to(self, device: torch.device | str) -> OnnxProgram:
        device = torch.device(device)
        return OnnxProgram(
            layers=self._layers,
            layer_weights={k: v.to(device) for k, v in self._layer_weights.items()},
            constants={k: v if k in self._graph.host else v.to(device) for k, v in self._constants.items()},
            graph=self._graph,
            input_names=self._input_names,
            output_names=self._output_names,
            opset=self.opset,
            shape_cache_size=self._shape_cache_size,
            device=device,
            normalization=self.normalization,
            sample_axes=self._sample_axes,
        )

    def _remember(self, key: tuple[tuple[int, ...], ...], record: dict[str, torch.Tensor]) -> None:
        if len(self._shape_cache) >= self._shape_cache_size:
            self._shape_cache.pop(next(iter(self._shape_cache)))  # the oldest signature
        self._shape_cache[key] = {name: _Recorded.of(value) for name, value in record.items()}

    def _environment(
        self, weights: Mapping[str, torch.Tensor], inputs: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        expected = self._layer_weights.keys()
        if weights.keys() != expected:
            missing = sorted(set(expected) - set(weights))
            unknown = sorted(set(weights) - set(expected))
            raise ValueError(f"layer weights do not match the model's layers: missing {missing}, unknown {unknown}")
        for layer in self._layers:
            if tuple(weights[layer.name].shape) != layer.shape:
                raise ValueError(
                    f"weight {layer.name!r} has shape {tuple(weights[layer.name].shape)}, expected {layer.shape}"
                )
        if inputs.keys() != set(self._input_names):
            raise ValueError(f"inputs {sorted(inputs)} do not match the model's inputs {list(self._input_names)}")
        env = dict(self._constants)
        env.update(weights)
        env.update(inputs)
        return env


def _run(plan: _Plan, env: dict[str, torch.Tensor], record: dict[str, torch.Tensor] | None = None) -> None:
    for step, release, keep in zip(plan.steps, plan.releases, plan.records):
        args = [env[name] if name else None for name in step.inputs]
        try:
            result = step.handler(step.node, args)
        except Exception as error:  # name the node: a bare torch error says little
            raise RuntimeError(f"{step.node.op_type} node {step.node.name!r} failed: {error}") from error
        _store(env, step, result)
        if record is not None:
            record.update((name, env[name]) for name in keep)
        for name in release:
            del env[name]


def _store(env: dict[str, torch.Tensor], step: _Step, result: torch.Tensor | Sequence[torch.Tensor]) -> None:
    values = (result,) if isinstance(result, torch.Tensor) else tuple(result)
    if len(values) < sum(1 for name in step.outputs if name):
        raise RuntimeError(f"{step.node.op_type} node {step.node.name!r} produced {len(values)} outputs")
    for name, value in zip(step.outputs, values):
        if name:
            env[name] = value


# --- loading ------------------------------------------------------------------------------


def load_onnx(model: ModelSource, shape_cache_size: int = 8, sample_axes: SampleAxes | None = None) -> OnnxProgram:
    """Parse an ONNX model (proto, file path, or a ``NormalizedModel``) into a differentiable ``OnnxProgram``.

    A proto or path is normalised first (``normalize_model``, without samples: an opset upgrade
    is then unchecked; entry points with data normalise with samples and pass the result). The
    given proto is never modified. Raises ``AlreadyQuantizedError`` for a quantized model and
    ``UnsupportedOpsError`` before doing any work if the graph uses ops the interpreter lacks,
    ``ValueError`` for a malformed graph. ``sample_axes`` overrides where inputs hold their samples
    (``sensitivity.samples.input_sample_axes``; a ValueError names an unknown input).
    """
    normalized = model if isinstance(model, NormalizedModel) else normalize_model(_read(model))
    original = normalized.model
    proto = _inline(original)
    check_supported(proto)
    opset = default_opset(proto)
    layers = find_layers(original)
    layer_names = {layer.name for layer in layers}

    initializers = {init.name: tensor_from_proto(init) for init in proto.graph.initializer}
    layer_weights = {name: initializers.pop(name) for name in (layer.name for layer in layers)}
    constant_names = set(initializers) | layer_names
    input_names = [value.name for value in proto.graph.input if value.name not in constant_names]
    output_names = [value.name for value in proto.graph.output]

    nodes = _topological_order(proto.graph, set(initializers) | layer_names | set(input_names))
    _check_outputs(nodes, set(initializers) | layer_names | set(input_names), output_names)
    scope = (
        set(initializers) | layer_names | set(input_names) | {name for node in proto.graph.node for name in node.output}
    )
    constants, runtime_nodes = _fold_constants(nodes, initializers, opset, scope)
    steps = [_step(node, index, opset, constants, scope) for index, node in runtime_nodes]
    needed = {name for step in steps for name in step.inputs} | set(output_names)
    constants = {name: value for name, value in constants.items() if name in needed}
    return OnnxProgram(
        layers=layers,
        layer_weights=layer_weights,
        constants=constants,
        graph=_prepare(steps, set(constants), output_names),
        input_names=input_names,
        output_names=output_names,
        opset=opset,
        shape_cache_size=shape_cache_size,
        normalization=normalized,
        sample_axes=sample_axes,
    )


def check_supported(model: ModelSource) -> None:
    """Raise ``UnsupportedOpsError`` naming every unsupported op type, with one node of each.

    Covers unknown op types, other domains, control flow other than If (Loop, Scan, ...),
    attribute values an op handler does not implement, and opsets outside the supported range.
    The nodes of If branches are checked too, named 'if_node/branch_node'.
    A quantized model is refused as such first (``AlreadyQuantizedError``), not as unsupported ops.
    """
    read = _read(model)
    proto = _inline(read.model if isinstance(read, NormalizedModel) else read)
    refuse_quantized(proto)
    opset = default_opset(proto)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UnsupportedOpsError(
            f"the model uses ONNX opset {opset}; the interpreter supports opsets {MIN_OPSET} to {MAX_OPSET}"
        )
    problems: dict[str, str] = {}  # op label -> "node 'x'" (+ why), first node of each kind
    for node, name in _all_nodes(proto.graph):
        label, reason = _unsupported(node, opset)
        if label is not None and label not in problems:
            where = f"node {name!r}"
            problems[label] = f"{where}: {reason}" if reason else where
    if problems:
        listing = "; ".join(f"{label} ({where})" for label, where in problems.items())
        raise UnsupportedOpsError(f"the model uses {len(problems)} unsupported op type(s): {listing}")


def _all_nodes(graph: onnx.GraphProto, prefix: str = "") -> Iterator[tuple[onnx.NodeProto, str]]:
    """Every node with its name, the nodes of ``If`` branches included (named 'if/node')."""
    for index, node in enumerate(graph.node):
        name = prefix + _node_name(node, index)
        yield node, name
        if is_if(node):
            for subgraph in subgraphs(node):
                yield from _all_nodes(subgraph, f"{name}/")


def _unsupported(node: onnx.NodeProto, opset: int) -> tuple[str | None, str | None]:
    """(op label, reason) if the node cannot be interpreted, else (None, None)."""
    if node.domain not in DEFAULT_DOMAINS:
        return f"{node.domain}::{node.op_type}", None
    if is_if(node):
        branches = {a.name for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
        ok = branches == {"then_branch", "else_branch"} and len(node.input) == 1
        return (None, None) if ok else ("If", "an If needs a condition, then_branch and else_branch")
    has_subgraph = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
    if has_subgraph or node.op_type in _CONTROL_FLOW:
        return node.op_type, "control flow with subgraphs is not supported"
    spec = OPS.get(node.op_type)
    if spec is None:
        return node.op_type, None
    try:
        reason = spec.check(_node(node, 0, opset)) if spec.check is not None else None
    except ValueError as error:  # an attribute that cannot be parsed (a string tensor, ...)
        return node.op_type, str(error)
    return (f"{node.op_type} with {reason}", None) if reason else (None, None)


def read_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """An ONNX file parsed (external data beside it included); ValueError naming the file if it is not one."""
    model = _read(path)
    assert isinstance(model, onnx.ModelProto)
    return model


def _read(model: ModelSource) -> onnx.ModelProto | NormalizedModel:
    """The proto itself, or the file parsed; onnx.load also reads external data files
    (only next to the model: onnx rejects locations outside its directory)."""
    if isinstance(model, onnx.ModelProto | NormalizedModel):
        return model
    path = Path(model)
    if not path.is_file():
        raise ValueError(f"no ONNX file at {str(path)!r}")
    try:
        return onnx.load(str(path))
    except Exception as error:
        raise ValueError(f"{str(path)!r} is not a readable ONNX model: {error}") from error


MAX_INLINED_NODES = 1_000_000  # a real model's graph has at most a few hundred thousand nodes


def _inline(model: onnx.ModelProto) -> onnx.ModelProto:
    """Inline local functions (returns a new proto); a model without any is returned as is.

    The size is counted first: functions calling each other twice at each of 22 levels make a
    2.5 KB model that took 44 s and 3.1 GB to inline (exponential in depth)."""
    if not model.functions:
        return model
    size = inlined_node_count(model)
    if size > MAX_INLINED_NODES:
        raise ValueError(
            f"inlining the model's local functions would give {size:.3g} nodes, more than "
            f"{MAX_INLINED_NODES:,}: functions calling functions too deeply"
        )
    return onnx.inliner.inline_local_functions(model)


def inlined_node_count(model: onnx.ModelProto) -> int:
    """How many nodes the main graph has once every local function call is inlined (counted, not built;
    a call cycle counts as unbounded)."""
    functions = {(f.domain, f.name): f for f in model.functions}
    sizes: dict[tuple[str, str], float] = {}

    def size_of(nodes, visiting: frozenset[tuple[str, str]]) -> float:
        total = 0.0
        for node in nodes:
            key = (node.domain, node.op_type)
            if key not in functions:
                total += 1
            elif key in visiting:
                return math.inf
            else:
                if key not in sizes:
                    sizes[key] = size_of(functions[key].node, visiting | {key})
                total += sizes[key]
        return total

    count = size_of(model.graph.node, frozenset())
    return int(min(count, 2**62))


def _node_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"  # the same fallback as sensitivity.layers


def _node(node: onnx.NodeProto, index: int, opset: int) -> Node:
    return Node(
        name=_node_name(node, index),
        op_type=node.op_type,
        attrs=MappingProxyType(parse_attributes(node, skip_subgraphs=is_if(node))),
        opset=opset,
        num_outputs=sum(1 for name in node.output if name),
    )


def _topological_order(graph: onnx.GraphProto, available: set[str]) -> list[tuple[int, onnx.NodeProto]]:
    """Nodes (with their file index) in an order where every input exists before use.

    Files are usually sorted already; otherwise the first runnable node is taken
    repeatedly, which keeps the file order among independent nodes.
    """
    indexed = list(enumerate(graph.node))
    if _is_sorted(indexed, available):
        return indexed
    ready, ordered, pending = set(available), [], indexed
    while pending:
        progress = [item for item in pending if _runnable(item[1], ready)]
        if not progress:
            index, node = pending[0]
            missing = [name for name in node_reads(node) if name and name not in ready]
            raise ValueError(
                f"node {_node_name(node, index)!r} ({node.op_type}) reads {missing}, which no node, "
                "initializer or graph input provides (or the graph has a cycle)"
            )
        first = progress[0]
        ordered.append(first)
        ready.update(first[1].output)
        pending = [item for item in pending if item is not first]
    return ordered


def _is_sorted(nodes: Sequence[tuple[int, onnx.NodeProto]], available: set[str]) -> bool:
    ready = set(available)
    for _, node in nodes:
        if not _runnable(node, ready):
            return False
        ready.update(node.output)
    return True


def _runnable(node: onnx.NodeProto, ready: set[str]) -> bool:
    return all(not name or name in ready for name in node_reads(node))


def _check_outputs(
    nodes: Iterable[tuple[int, onnx.NodeProto]], available: set[str], output_names: Sequence[str]
) -> None:
    produced = set(available).union(*(node.output for _, node in nodes))
    missing = [name for name in output_names if name not in produced]
    if missing:
        raise ValueError(f"graph outputs {missing} are not produced by any node")


def _fold_constants(
    nodes: Iterable[tuple[int, onnx.NodeProto]],
    initializers: Mapping[str, torch.Tensor],
    opset: int,
    scope: set[str],
) -> tuple[dict[str, torch.Tensor], list[tuple[int, onnx.NodeProto]]]:
    """Run, once, every node whose inputs are all constants (Constant nodes, shape arithmetic
    on initializers); the remaining nodes run per call. Layer weights are never constants.
    An ``If`` whose condition is constant is replaced by its taken branch's nodes, which are
    folded in turn. ``scope`` names every value visible here (for ordering branch nodes); the
    inlined branches' values are added to it."""
    constants = dict(initializers)
    runtime: list[tuple[int, onnx.NodeProto]] = []
    pending = deque(nodes)
    while pending:
        index, node = pending.popleft()
        if is_if(node) and node.input[0] in constants:
            branch_nodes, branch_constants = _taken_branch(node, index, constants, scope)
            constants.update(branch_constants)
            # the inlined values join the scope the later (nested) Ifs are prepared in
            scope.update(branch_constants, (name for _, inner in branch_nodes for name in inner.output))
            pending.extendleft(reversed(branch_nodes))
        elif all(not name or name in constants for name in node.input):
            prepared = _node(node, index, opset)
            args = [constants[name] if name else None for name in node.input]
            with torch.no_grad():
                result = OPS[node.op_type].handler(prepared, args)
            values = (result,) if isinstance(result, torch.Tensor) else tuple(result)
            constants.update((name, value) for name, value in zip(node.output, values) if name)
        else:
            runtime.append((index, node))
    return constants, runtime


def _step(
    node: onnx.NodeProto, index: int, opset: int, constants: Mapping[str, torch.Tensor], scope: set[str]
) -> _Step:
    prepared = _node(node, index, opset)
    if is_if(node):
        handler = _IfHandler.build(node, opset, constants, scope)
        return _Step(prepared, handler, (node.input[0], *handler.reads), tuple(node.output))
    return _Step(prepared, OPS[node.op_type].handler, tuple(node.input), tuple(node.output))


# --- If -------------------------------------------------------------------------------------


def _taken_branch(
    node: onnx.NodeProto, index: int, constants: Mapping[str, torch.Tensor], scope: set[str]
) -> tuple[list[tuple[int, onnx.NodeProto]], dict[str, torch.Tensor]]:
    """The nodes that replace an If whose condition is the constant ``constants[node.input[0]]``:
    the taken branch's nodes (names prefixed with the If's), then one Identity per output;
    and the branch's initializers."""
    name = _node_name(node, index)
    chosen = branch(node, "then_branch" if _condition(constants[node.input[0]]) else "else_branch")
    initializers = {init.name: tensor_from_proto(init) for init in chosen.initializer}
    ordered = _topological_order(chosen, scope | set(constants) | set(initializers))
    nodes = []
    for inner_index, inner in ordered:
        renamed = onnx.NodeProto()
        renamed.CopyFrom(inner)
        renamed.name = f"{name}/{_node_name(inner, inner_index)}"
        nodes.append((index, renamed))
    for position, (source, target) in enumerate(zip(chosen.output, node.output)):
        if target:
            nodes.append(
                (index, onnx.helper.make_node("Identity", [source.name], [target], name=f"{name}/out{position}"))
            )
    return nodes, initializers


def _condition(value: torch.Tensor) -> bool:
    """An If condition as a Python bool (it is a bool tensor: never carries gradient)."""
    if value.numel() != 1:
        raise ValueError(f"an If condition must hold one element; it has shape {tuple(value.shape)}")
    return bool(value.reshape(()).item())


@dataclass(frozen=True)
class _Branch:
    """One prepared branch: its steps, the constants it reads, its output names."""

    plan: _Plan
    constants: Mapping[str, torch.Tensor]
    outputs: tuple[str, ...]


def _prepare_branch(
    graph: onnx.GraphProto, opset: int, outer_constants: Mapping[str, torch.Tensor], scope: set[str]
) -> tuple[_Branch, set[str]]:
    """A branch prepared like a graph (ordering, folding with the outer constants visible,
    nested Ifs); also the outer run-time values it reads."""
    initializers = {init.name: tensor_from_proto(init) for init in graph.initializer}
    available = scope | set(initializers)
    inner_scope = available | {name for node in graph.node for name in node.output}
    nodes = _topological_order(graph, available)
    constants, runtime = _fold_constants(nodes, {**outer_constants, **initializers}, opset, inner_scope)
    steps = [_step(node, index, opset, constants, inner_scope) for index, node in runtime]
    outputs = tuple(value.name for value in graph.output)
    needed = {name for step in steps for name in step.inputs if name} | set(outputs)
    produced = {name for step in steps for name in step.outputs if name}
    kept = {name: value for name, value in constants.items() if name in needed}
    branch = _Branch(_plan(steps, outputs), MappingProxyType(kept), outputs)
    return branch, needed - produced - set(constants)


class _IfHandler:
    """The handler of an If whose condition is known only at run time. Its step reads the
    condition, then ``reads`` (the outer values either branch needs)."""

    def __init__(self, then_branch: _Branch, else_branch: _Branch, reads: tuple[str, ...]) -> None:
        self.branches = {True: then_branch, False: else_branch}
        self.reads = reads
        self._on_device: dict[tuple[bool, torch.device], dict[str, torch.Tensor]] = {}

    @classmethod
    def build(
        cls, node: onnx.NodeProto, opset: int, constants: Mapping[str, torch.Tensor], scope: set[str]
    ) -> _IfHandler:
        then_branch, then_reads = _prepare_branch(branch(node, "then_branch"), opset, constants, scope)
        else_branch, else_reads = _prepare_branch(branch(node, "else_branch"), opset, constants, scope)
        return cls(then_branch, else_branch, tuple(sorted(then_reads | else_reads)))

    def __call__(self, node: Node, inputs: Inputs) -> list[torch.Tensor]:
        taken = _condition(required(inputs, 0))
        branch = self.branches[taken]
        env = dict(self._constants(taken, _device_of(inputs)))
        env.update((name, value) for name, value in zip(self.reads, inputs[1:]) if value is not None)
        _run(branch.plan, env)
        return [env[name] for name in branch.outputs]

    def _constants(self, taken: bool, device: torch.device) -> dict[str, torch.Tensor]:
        """The branch's constants on the device the program runs on (moved once per device)."""
        key = (taken, device)
        if key not in self._on_device:
            self._on_device[key] = {k: v.to(device) for k, v in self.branches[taken].constants.items()}
        return self._on_device[key]


def _device_of(inputs: Inputs) -> torch.device:
    """The accelerator among the inputs' devices, else the CPU (shape values stay on the CPU)."""
    devices = [value.device for value in inputs if value is not None and value.device.type != "cpu"]
    return devices[0] if devices else torch.device("cpu")


def _plan(steps: Sequence[_Step], output_names: Sequence[str], remember: AbstractSet[str] = frozenset()) -> _Plan:
    """Reference counting, worked out once: each tensor dies after its last reader."""
    last_use: dict[str, int] = {}
    for position, step in enumerate(steps):
        for name in step.inputs:
            if name:
                last_use[name] = position
    keep = set(output_names)
    releases = []
    for position, step in enumerate(steps):
        dying = {name for name in step.inputs if name and last_use.get(name) == position}
        dying |= {name for name in step.outputs if name and name not in last_use}  # never read
        releases.append(tuple(sorted(dying - keep)))
    records = tuple(tuple(name for name in step.outputs if name in remember) for step in steps)
    return _Plan(tuple(steps), tuple(releases), records)


# Inputs that set an output's shape from their values; if one of them depends on tensor
# values (not only on shapes), the shape values cannot be cached per input shapes.
_SHAPE_ARGUMENTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "ConstantOfShape": (0,),
    "Range": (0, 1, 2),
    "Slice": (1, 2, 3, 4),
    "Pad": (1, 3),
    "Resize": (2, 3),
    "Split": (1,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "TopK": (1,),
    "CumSum": (1,),
    "Trilu": (1,),
    **{name: (1,) for name in OPS if name.startswith("Reduce")},
}
# the shape arguments that handlers only read as Python ints (ConstantOfShape and Range
# create their output on their argument's device, so those arguments must stay on it)
_HOST_ARGUMENTS = {
    op_type: indices for op_type, indices in _SHAPE_ARGUMENTS.items() if op_type not in ("ConstantOfShape", "Range")
}


def _host_only(steps: Sequence[_Step]) -> frozenset[str]:
    """Tensors that every reader reads as a shape argument."""
    host: set[str] = set()
    elsewhere: set[str] = set()
    for step in steps:
        positions = _HOST_ARGUMENTS.get(step.node.op_type, ())
        for index, name in enumerate(step.inputs):
            (host if index in positions else elsewhere).add(name)
    return frozenset(host - elsewhere - {""})


def _prepare(steps: Sequence[_Step], constants: set[str], output_names: Sequence[str]) -> _Graph:
    """Split the steps into those fixed by the input shapes and the data path (see ``_Graph``)."""
    fixed = set(constants)  # tensors whose values are fixed once the input shapes are
    shape_steps, data_steps = [], []
    for step in steps:
        if step.node.op_type in ("Shape", "Size") or all(not name or name in fixed for name in step.inputs):
            shape_steps.append(step)
            fixed.update(name for name in step.outputs if name)
        else:
            data_steps.append(step)
    full_plan = _plan(steps, output_names)
    host = _host_only(steps) - set(output_names)
    if not shape_steps:
        return _Graph(full_plan, None, host)
    for step in data_steps:
        arguments = _SHAPE_ARGUMENTS.get(step.node.op_type, ())
        if any(i < len(step.inputs) and step.inputs[i] and step.inputs[i] not in fixed for i in arguments):
            return _Graph(full_plan, None, host)  # a data-dependent shape: shapes are not a sufficient key
    produced = {name for step in shape_steps for name in step.outputs if name}
    read_by_data = {name for step in data_steps for name in step.inputs} | set(output_names)
    return _Graph(_plan(steps, output_names, produced & read_by_data), _plan(data_steps, output_names), host)
