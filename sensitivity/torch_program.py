"""Torch modules and ``torch.export`` archives as ``Program`` (see ``sensitivity.program``).

The layer weights are swapped in with ``torch.func.functional_call``, so the module is
never mutated and autograd / ``torch.func`` can differentiate with respect to them.
A layer is named by its parameter's fully qualified name (``fc1.weight``), which is also
the initializer name ``torch.onnx.export`` gives it, so the names agree across sources.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from sensitivity.layers import Layer, scope_path, weight_index
from sensitivity.program import ProgramAttributes
from sensitivity.pt2_archive import LAYER_CALLS

# module type -> (ONNX op type, output-channel axis of its weight)
_LAYER_MODULES: tuple[tuple[type[nn.Module], str, int], ...] = (
    (nn.Conv1d, "Conv", 0),
    (nn.Conv2d, "Conv", 0),
    (nn.Conv3d, "Conv", 0),
    (nn.ConvTranspose1d, "ConvTranspose", 1),
    (nn.ConvTranspose2d, "ConvTranspose", 1),
    (nn.ConvTranspose3d, "ConvTranspose", 1),
    (nn.Linear, "Gemm", 0),  # weight [out, in]: Gemm with transB=1
    (nn.Embedding, "Gather", 0),  # weight [vocab, dim]: one scale per row
)

# aten operator -> (ONNX op type, output-channel axis); the weight is argument
# ``weight_index(op type)`` of each (0 for embedding, 1 for the others).
_LAYER_OPS = LAYER_CALLS


def _layer(name: str, node_name: str, op_type: str, axis: int, weight: torch.Tensor, scope: str = "") -> Layer:
    return Layer(
        name=name,
        node_name=node_name,
        op_type=op_type,
        shape=tuple(int(d) for d in weight.shape),
        num_params=int(weight.numel()),
        channel_axis=axis,
        scope=scope,
    )


def _module_scope(modules: Mapping[str, nn.Module], qualified_name: str) -> str:
    """The module path of a submodule (``/enc.0/fc``), as ``sensitivity.layers.scope_path`` writes it: its
    ancestors that run as modules (a ModuleList or ModuleDict only holds modules, so it is no scope)."""
    parts = qualified_name.split(".") if qualified_name else []
    names = [".".join(parts[:k]) for k in range(1, len(parts) + 1)]
    containers = (nn.ModuleList, nn.ModuleDict)
    return scope_path([name for name in names if not isinstance(modules.get(name), containers)])


def _fx_scope(node: torch.fx.Node) -> str:
    """The module path of an exported graph's node from its ``nn_module_stack`` metadata ({key: (qualified
    name, type)}, outermost first); "" without it (``load_exported`` drops node metadata unread)."""
    stack = node.meta.get("nn_module_stack") or {}
    names = [entry[0] for entry in stack.values() if isinstance(entry, tuple) and entry and isinstance(entry[0], str)]
    return scope_path(names)


def find_module_layers(module: nn.Module) -> list[Layer]:
    """Weights of Conv/ConvTranspose/Linear/Embedding submodules in registration order; a shared weight once."""
    layers: list[Layer] = []
    seen: set[int] = set()
    modules = dict(module.named_modules())
    for module_name, sub in modules.items():
        for module_type, op_type, axis in _LAYER_MODULES:
            weight = sub.weight if isinstance(sub, module_type) else None
            if isinstance(weight, torch.Tensor) and id(weight) not in seen:
                seen.add(id(weight))
                name = f"{module_name}.weight" if module_name else "weight"
                scope = _module_scope(modules, module_name)
                layers.append(_layer(name, module_name or op_type, op_type, axis, weight, scope))
                break
    return layers


class TorchProgram(ProgramAttributes):
    """A ``Program`` over an ``nn.Module``: ``forward(weights, inputs)`` is a functional call.

    ``input_names`` name the module's positional arguments in order. The module is put in
    eval mode (BatchNorm uses its running statistics, dropout is off): sensitivities are
    properties of the deployed function. ``layers`` defaults to the module's Conv,
    ConvTranspose, Linear and Embedding weights.
    """

    def __init__(
        self,
        module: nn.Module,
        input_names: Sequence[str] = ("input",),
        output_names: Sequence[str] = ("output",),
        layers: Sequence[Layer] | None = None,
        *,
        set_eval: bool = True,
    ) -> None:
        # An exported module has its mode baked in and refuses ``eval()``.
        self._module = module.eval() if set_eval else module
        self._set_eval = set_eval
        self._input_names = tuple(input_names)
        self._output_names = tuple(output_names)
        self._layers = tuple(find_module_layers(module) if layers is None else layers)
        if not self._layers:
            raise ValueError("the model has no quantizable layer (Conv, ConvTranspose, Linear or Embedding weight)")
        state: dict[str, torch.Tensor] = dict(
            module.named_parameters()
        )  # a tied weight appears once; functional_call re-ties it
        state.update(module.named_buffers())
        missing = [layer.name for layer in self._layers if layer.name not in state]
        if missing:
            raise ValueError(f"layers {missing} are not parameters of the module")
        names = {layer.name for layer in self._layers}
        self._layer_weights = {layer.name: state[layer.name].detach() for layer in self._layers}
        # Every other constant is passed detached, so no gradient is ever computed for it.
        self._constants = {name: t.detach() for name, t in state.items() if name not in names}

    @property
    def module(self) -> nn.Module:
        return self._module

    def forward(self, weights: Mapping[str, torch.Tensor], inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        args = tuple(inputs[name] for name in self._input_names)
        state = {**self._constants, **weights}
        outputs = torch.func.functional_call(self._module, state, args, strict=False)
        if isinstance(outputs, torch.Tensor):
            return [outputs]
        return list(outputs)

    def to(self, device: torch.device | str) -> TorchProgram:
        module = copy.deepcopy(self._module).to(device)
        return TorchProgram(module, self._input_names, self._output_names, self._layers, set_eval=self._set_eval)


def exported_layers(exported: torch.export.ExportedProgram) -> list[Layer]:
    """Layers of an exported graph: conv/linear calls whose weight argument is a parameter."""
    from torch.export.graph_signature import InputKind

    parameter_of = {
        spec.arg.name: spec.target for spec in exported.graph_signature.input_specs if spec.kind == InputKind.PARAMETER
    }
    state = exported.state_dict
    layers: list[Layer] = []
    seen: set[str] = set()
    for node in exported.graph.nodes:
        op = _LAYER_OPS.get(str(node.target)) if node.op == "call_function" else None
        if op is None or len(node.args) < 2 or not hasattr(node.args[weight_index(op[0])], "name"):
            continue
        name = parameter_of.get(node.args[weight_index(op[0])].name)
        if name is None or name in seen or state[name].dim() < 2:
            continue
        seen.add(name)
        layers.append(_layer(name, node.name, op[0], op[1], state[name], _fx_scope(node)))
    return layers


def load_exported(path: str | Path) -> TorchProgram:
    """Load a ``torch.export`` archive (``.pt2``) as a ``Program``.

    Layers are the parameters used as the weight of a conv / conv-transpose / linear / embedding call,
    named by their fully qualified parameter name (``fc1.weight``): the names come from the
    archive's graph signature, so they are stable across loads and processes. Export with
    a dynamic batch axis (``dynamic_shapes={"x": {0: torch.export.Dim("batch")}}``):
    an archive with a static batch only accepts batches of exactly that size.

    Security: the archive is loaded with ``sensitivity.pt2_archive.load_exported_program``, never
    ``torch.export.load`` (which unpickles and evaluates archive content). Archives holding pickles,
    compiled code, call targets other than aten operators and torch's symbolic-shape builtins, or shape
    expressions beyond plain arithmetic are refused with ``UnsafeArchive`` (a ValueError naming the entry);
    guards code and sample inputs are never used. The graph still runs aten kernels on tensors sized by the
    archive, so the service keeps opening uploads only in resource-limited worker processes; do the same
    when embedding this library.
    """
    from torch.export.graph_signature import InputKind, OutputKind

    from sensitivity.pt2_archive import load_exported_program

    exported = load_exported_program(path)
    signature = exported.graph_signature
    input_names = [s.arg.name for s in signature.input_specs if s.kind == InputKind.USER_INPUT]
    output_names = [s.arg.name for s in signature.output_specs if s.kind == OutputKind.USER_OUTPUT]
    layers = exported_layers(exported)
    return TorchProgram(exported.module(), input_names, output_names, layers, set_eval=False)
