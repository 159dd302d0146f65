"""A ``torch.export`` program as the ONNX model every later step reads: ``export_onnx(exported, samples)``.

A ``.pt2`` archive goes through the pipeline of an uploaded ONNX model: its program (loaded by
``sensitivity.pt2_archive.load_exported_program``, never ``torch.export.load``) is exported with torch's
own exporter (``torch.onnx.export(exported, dynamo=True)``, which needs ``onnxscript``), checked against
the torch program's outputs on the first calibration samples in onnxruntime, and then normalised,
analysed, planned, exported, evaluated and timed as ONNX. One model, so one layer vocabulary: the
sensitivity of a ``.pt2`` is computed on this ONNX model, and its plan quantizes the same weights.

Layer names. The exporter names an initializer that holds a parameter by its fully qualified name
(``conv1.weight``), but a Linear on a rank-3 input becomes a MatMul on a transposed copy of the weight,
an anonymous constant (``val_3``). Each layer of the export whose weight is not named by a parameter
is renamed after the parameter its node was exported from: the node's ``pkg.torch.onnx.fx_node``
metadata names the FX call (``%linear``), whose weight argument is the parameter (``block.query.weight``,
as ``sensitivity.torch_program`` names the program's layers). A weight read by nodes of two kinds (a tied
embedding and head) keeps the exporter's name for its second use; ``OnnxExport.unmatched`` lists the
program's layers the export has under no name of theirs.

BatchNorm. The exporter's optimizer (onnxscript's ``fuse_batchnorm`` rewrite) folds an inference
BatchNormalization into the Conv, ConvTranspose or Gemm before it: ``W·γ/√(σ²+ε)``, the bias likewise,
the initializer keeping the parameter's name. torch's TorchScript exporter folds the same way in eval
mode, and normalisation folds a BatchNormalization an ONNX upload keeps after its layer (paddle2onnx,
a TorchScript export in training mode: ``sensitivity.batchnorm``) the same way, so a network uploaded as
ONNX, with BatchNorm folded or not, and as ``.pt2`` has the same layers, with the same folded weights
and so the same traces (within their standard errors). The layer that is quantized is the folded
weight, the one a runtime executes.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from sensitivity.layers import find_layers
from sensitivity.normalize import UPGRADE_CHECK_SAMPLES, UpgradeCheck, compare_outputs, run_model, sample_batch

if TYPE_CHECKING:
    import torch

    from sensitivity.results import Config, SensitivityResult
    from sensitivity.run import Progress

logger = logging.getLogger(__name__)

# The export must compute the program's outputs: max |a - b| <= EXPORT_RTOL * max |a| + EXPORT_ATOL per
# output on the first EXPORT_CHECK_SAMPLES samples. BatchNorm folding reorders float32 rounding: the
# digits CNN (BatchNorm folded into both convs) differed by 6e-8 on logits up to ~10 (1e-8 relative),
# the token transformer by 1e-6 relative; a wrong weight or axis differs by 1e-2 relative or more. The
# normalisation's opset-upgrade tolerance, for the same reason.
EXPORT_RTOL = 1e-4
EXPORT_ATOL = 1e-6
EXPORT_CHECK_SAMPLES = UPGRADE_CHECK_SAMPLES
FX_NODE_KEY = "pkg.torch.onnx.fx_node"  # "%linear : [num_users=1] = call_function[...](...)"


class TorchExportError(ValueError):
    """torch's ONNX exporter refused the program, or its export computes other outputs."""


@dataclass(frozen=True)
class OnnxExport:
    """The ONNX export of a torch program and how it was made (``changes`` for logs and reports)."""

    model: onnx.ModelProto = field(repr=False)
    program: torch.export.ExportedProgram = field(repr=False, compare=False)
    renamed: Mapping[str, str] = field(default_factory=dict)  # exporter's initializer name -> parameter name
    unmatched: tuple[str, ...] = ()  # the program's layers under no name of theirs in the export
    check: UpgradeCheck | None = None

    def verified(self, samples: Mapping[str, np.ndarray]) -> OnnxExport:
        """This export with its check against the torch program on the first ``samples`` (the model's
        inputs with samples on axis 0; other keys such as ``labels`` are ignored; a fixed-batch export
        runs on exactly its batch). ``TorchExportError`` when the outputs differ by more than
        ``EXPORT_RTOL``. Check the arrays against ``model``'s inputs first (``planner.export.check_inputs``)
        for a message that names a mismatch."""
        return replace(self, check=_check(self.program, self.model, samples))

    def changes(self) -> list[str]:
        lines = ["exported to ONNX by torch.onnx.export (dynamo; BatchNorm folded into the layer before it)"]
        if self.renamed:
            lines.append(
                f"{len(self.renamed)} layer weights renamed after their parameters: "
                + ", ".join(f"{old} -> {new}" for old, new in self.renamed.items())
            )
        if self.unmatched:
            lines.append(f"layers of the torch program with no weight of that name in the export: {self.unmatched}")
        if self.check is not None:
            lines.append(
                f"the export checked against the torch program on {self.check.samples} samples: "
                f"max relative difference {self.check.max_relative_difference:.3g}"
            )
        return lines


def load_exported_onnx(path: str | os.PathLike[str], samples: Mapping[str, np.ndarray] | None = None) -> OnnxExport:
    """A ``.pt2`` archive, loaded without unpickling (``sensitivity.pt2_archive``), as ONNX (``export_onnx``).
    The archive's checks raise ``UnsafeArchive`` / ``ArchiveLoadError`` (ValueErrors) naming the entry."""
    from sensitivity.pt2_archive import load_exported_program

    return export_onnx(load_exported_program(path), samples)


def export_onnx(exported: torch.export.ExportedProgram, samples: Mapping[str, np.ndarray] | None = None) -> OnnxExport:
    """``exported`` as an ONNX model whose layers are named by their parameters (module doc), checked
    against the program on the first ``samples`` (its inputs, as for ``normalize_model``; other keys such
    as ``labels`` are ignored) when given. Raises ``TorchExportError`` (a ValueError) naming the problem."""
    from sensitivity.torch_program import exported_layers

    model = _export(exported)
    layers = exported_layers(exported)
    renamed = _name_layers(model, {layer.node_name: layer.name for layer in layers})
    present = {layer.name for layer in find_layers(model)}
    unmatched = tuple(layer.name for layer in layers if layer.name not in present)
    export = OnnxExport(model, exported, renamed, unmatched)
    return export if samples is None else export.verified(samples)


def _export(exported: torch.export.ExportedProgram) -> onnx.ModelProto:
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notes of torch internals, not the user's concern
            program = torch.onnx.export(exported, (), dynamo=True, verbose=False)
    except ImportError as error:  # onnxscript: the local install's (pyproject's `local` extra)
        raise TorchExportError(f"exporting a torch program to ONNX needs onnxscript ({error})") from None
    except Exception as error:
        raise TorchExportError(f"torch.onnx.export could not export the torch program: {_first_line(error)}") from None
    if program is None:
        raise TorchExportError("torch.onnx.export returned no model for the torch program")
    model = program.model_proto
    assert isinstance(model, onnx.ModelProto)
    return model


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _fx_node_name(node: onnx.NodeProto) -> str | None:
    """The FX node a node was exported from (its ``pkg.torch.onnx.fx_node`` metadata), None without it."""
    for prop in node.metadata_props:
        if prop.key == FX_NODE_KEY and prop.value.startswith("%"):
            return prop.value[1:].split(" ", 1)[0]
    return None


def _name_layers(model: onnx.ModelProto, parameter_of_call: Mapping[str, str]) -> dict[str, str]:
    """Rename (in place) each layer weight that no parameter names after the parameter of the FX call
    its node came from; returns {old: new}."""
    nodes = {node.name: node for node in model.graph.node}
    taken = {init.name for init in model.graph.initializer}
    parameters = set(parameter_of_call.values())
    renames: dict[str, str] = {}
    for layer in find_layers(model):
        if layer.name in parameters:
            continue
        call = _fx_node_name(nodes[layer.node_name]) if layer.node_name in nodes else None
        target = parameter_of_call.get(call) if call is not None else None
        if target is not None and target not in taken:
            renames[layer.name] = target
            taken.add(target)
    if renames:
        _rename(model.graph, renames)
    return renames


def _rename(graph: onnx.GraphProto, renames: Mapping[str, str]) -> None:
    """Rename values everywhere in ``graph``: initializers, node inputs (subgraphs included), value infos."""
    for init in graph.initializer:
        init.name = renames.get(init.name, init.name)
    for values in (graph.input, graph.output, graph.value_info):
        for value in values:
            value.name = renames.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        for attribute in node.attribute:
            for subgraph in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                _rename(subgraph, renames)


def _check(
    exported: torch.export.ExportedProgram, model: onnx.ModelProto, samples: Mapping[str, np.ndarray]
) -> UpgradeCheck:
    """The export against the torch program on the first samples (a fixed-batch export on exactly its batch)."""
    import torch

    feeds = sample_batch(model, samples, 0, EXPORT_CHECK_SAMPLES, None)
    names = [value.name for value in model.graph.input]
    try:
        with torch.no_grad():
            expected = exported.module()(*(torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in names))
    except Exception as error:  # arrays the program does not take (shape, dtype): named by torch
        raise TorchExportError(f"the torch program does not run on the given samples: {_first_line(error)}") from None
    reference = [_numpy(value) for value in (expected if isinstance(expected, (list, tuple)) else [expected])]
    actual = run_model(model, feeds, "the ONNX export of the torch program", TorchExportError)
    what = "the ONNX export of the torch program"
    worst_abs, worst_rel = compare_outputs(reference, actual, what, TorchExportError, EXPORT_RTOL, EXPORT_ATOL)
    count = next(iter(feeds.values())).shape[0] if feeds else 0
    return UpgradeCheck(count, worst_abs, worst_rel, EXPORT_RTOL)


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def export_module(
    module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], *, dynamic_batch: bool = True
) -> OnnxExport:
    """An ``nn.Module`` in hand, as a ``.pt2`` upload would be: ``torch.export.export`` of the module in
    eval mode on ``example_inputs`` (axis 0 of every input a dynamic batch unless ``dynamic_batch`` is
    False: then fixed at the examples'), then ``export_onnx``. Give at least 2 samples for a dynamic
    batch (torch.export specialises a dim of size 1). ``TorchExportError`` when torch cannot export it."""
    import torch

    shapes = tuple({0: torch.export.Dim("batch")} for _ in example_inputs) if dynamic_batch else None
    try:
        exported = torch.export.export(module.eval(), tuple(example_inputs), dynamic_shapes=shapes)
    except Exception as error:
        raise TorchExportError(f"torch.export.export could not export the module: {_first_line(error)}") from None
    return export_onnx(exported)


def module_sensitivity(
    module: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    calibration: Mapping[str, np.ndarray],
    config: Config | None = None,
    *,
    dynamic_batch: bool = True,
    progress: Progress | None = None,
) -> SensitivityResult:
    """The sensitivity of an ``nn.Module`` as ``mpq sensitivity`` computes it for the module saved as
    ``.pt2``: exported (``export_module``), checked on ``calibration`` (arrays keyed by the forward
    argument names, optionally ``labels``), normalised and analysed on the ONNX interpreter with
    ``config`` (default ``TraceConfig()``); a ``SensitivityResult`` whose layers are the parameters."""
    from sensitivity.normalize import normalize_model
    from sensitivity.onnx_program import load_onnx
    from sensitivity.results import TraceConfig
    from sensitivity.run import compute_sensitivity

    export = export_module(module, example_inputs, dynamic_batch=dynamic_batch).verified(calibration)
    program = load_onnx(normalize_model(export.model, samples=calibration))
    arguments = (progress,) if progress is not None else ()
    return compute_sensitivity(program, calibration, config or TraceConfig(), *arguments)
