"""What the search predicts from: the sensitivity analysis, the measured activation terms and the
objective built from them (steps 1 and 2 of ``planner.plan``).

``analyse`` runs the analysis the request's method needs (traces for ``hawq_v2``, inter-layer terms
for ``interlayer``, Fisher terms for ``fisher``, each layer measured alone for ``measured``), or checks a given result; ``measured_activation_terms`` measures what 8-bit
activations cost each layer; ``build_objective`` lays out Ω, g·Δ, G and the costs per layer ×
candidate (``planner.objective``), each layer with the candidates it is offered (``planner.exclude``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

import planner.measured  # noqa: F401  # registers MeasuredConfig's handler with compute_sensitivity
from planner.activation import ACTIVATION_TERM_BITS, ActivationTerm, activation_terms
from planner.candidates import CANDIDATES
from planner.checks import require
from planner.cost import CostTable, layer_bops, layer_size_bytes
from planner.exclude import LayerCandidates
from planner.export import ExportError
from planner.measure import Measurer, Progress
from planner.objective import FP32, Objective
from planner.request import PlanRequest
from sensitivity.interlayer import perturbations, shrunk, shrunk_gradient_terms
from sensitivity.normalize import NormalizedModel
from sensitivity.results import FisherTerms, InterLayerTerms, MeasuredTerms, SensitivityResult

logger = logging.getLogger(__name__)


def analyse(
    model: NormalizedModel,
    calibration: Mapping[str, np.ndarray],
    request: PlanRequest,
    given: SensitivityResult | None,
    progress: Progress,
    timings: dict[str, float],
    axes: Mapping[str, int | None],
) -> SensitivityResult:
    """The sensitivity result the method needs: ``given`` when there is one (checked to hold the
    inter-layer terms ``interlayer`` needs), else computed on ``model`` (its seconds in ``timings``)."""
    if given is not None:
        require(
            request.method != "interlayer" or given.interlayer is not None,
            "method 'interlayer' needs a sensitivity result with inter-layer terms (an InterLayerConfig analysis)",
        )
        require(
            request.method != "fisher" or given.fisher is not None,
            "method 'fisher' needs a sensitivity result with Fisher terms (a FisherConfig analysis)",
        )
        require(
            request.method != "measured" or given.measured is not None,
            "method 'measured' needs a sensitivity result with measured terms (a MeasuredConfig analysis)",
        )
        require(
            request.method != "hawq_v2" or given.traces is not None,
            "method 'hawq_v2' needs a sensitivity result with traces (a TraceConfig or InterLayerConfig analysis)",
        )
        return given
    from sensitivity.onnx_program import load_onnx
    from sensitivity.run import compute_sensitivity

    start = time.perf_counter()
    program = load_onnx(model, sample_axes=axes)

    def forward(phase: str, fraction: float, message: str) -> None:
        progress(f"sensitivity:{phase}", fraction, message)

    result = compute_sensitivity(program, calibration, request.sensitivity_config(), forward)
    timings["sensitivity"] = time.perf_counter() - start
    return result


def measured_activation_terms(
    model: onnx.ModelProto,
    calibration: Mapping[str, np.ndarray],
    request: PlanRequest,
    sensitivity: SensitivityResult,
    offered: LayerCandidates,
    measurer: Measurer,
    timings: dict[str, float],
) -> dict[str, ActivationTerm]:
    """Each layer's measured activation term (``planner.activation``; its seconds in ``timings``);
    none when the request does not ask for them, no candidate quantizes activations, or uniform
    w8a8 does not export."""
    if not request.measure_activation_terms or not any(_takes_activation_term(c) for c in request.candidates):
        return {}
    if request.method == "measured":  # each candidate was measured whole, its activations with it
        return {}
    progress = measurer.progress
    progress("activation", 0.0, "measuring each layer's activation quantization")
    start = time.perf_counter()
    try:
        # Exported through the measurer's cache: the uniform w8a8 baseline reuses this artifact. Excluded
        # layers stay fp32 there too: their terms would only ever apply to candidates they are not offered.
        uniform = measurer.export(offered.uniform("w8a8"))
        terms = activation_terms(
            model,
            calibration,
            sensitivity.loss_kind,
            w8a8_artifact=uniform.model_bytes,
            sample_axes=measurer.sample_axes,
        )
    except ExportError as error:
        # Not fatal: the search can still avoid a8 where it fails, as before these terms existed.
        logger.warning("activation terms skipped: uniform w8a8 does not export (%s)", error)
        progress("activation", 1.0, f"skipped: uniform w8a8 does not export ({error})"[:500])
        return {}
    timings["activation_terms"] = time.perf_counter() - start
    return terms


def build_objective(
    sensitivity: SensitivityResult,
    table: CostTable,
    candidates: Sequence[str],
    model: onnx.ModelProto | None = None,
    activation: Mapping[str, ActivationTerm] | None = None,
    *,
    offered: Mapping[str, Sequence[str]] | None = None,
) -> Objective:
    """Ω, g·Δ, G and costs (``size``: bytes of the layer's weight; ``bops``) per layer × candidate.

    The terms come from the inter-layer analysis by the candidate's weight bits (fp32 -> 0).
    A result with traces only (a TraceConfig analysis) gives Ω from the traces and the ‖Δ‖²
    of ``model``'s weights, with g·Δ and G zero: enough for ``hawq_v2``, not for ``interlayer``.
    A Fisher result (a FisherConfig analysis) gives Ω = Σ Fᵢᵢ Δᵢ² (``fisher_objective_terms``); a
    measured one (MeasuredConfig) Ω = 2ΔL per (layer, candidate) (``measured_omega``), G its diagonal.
    ``activation`` (``planner.activation``): each layer's measured activation term, shrunk by its
    standard error like g·Δ, is added to l and (floored at 0) to Ω of the candidates that
    quantize activations. ``offered``: the candidates of each layer (``planner.exclude``: an
    excluded layer offers fp32 alone); default ``candidates`` for every layer.
    """
    layers = [layer.name for layer in sensitivity.layers]
    missing = sorted(set(table) ^ set(layers))
    require(not missing, f"the sensitivity result does not match the model's layers (differ: {missing})")
    names_of = (
        {layer: tuple(candidates) for layer in layers}
        if offered is None
        else {layer: tuple(offered[layer]) for layer in layers if layer in offered}
    )
    unoffered = sorted(set(layers) - set(names_of))
    require(not unoffered, f"offered names no candidates for layers {unoffered[:5]}")
    costs = {
        "size": [[layer_size_bytes(table[layer], c) for c in names_of[layer]] for layer in layers],
        "bops": [[layer_bops(table[layer], c) for c in names_of[layer]] for layer in layers],
    }
    if sensitivity.measured is not None:
        omega = measured_omega(sensitivity.measured, layers, names_of)
        return Objective(
            layers=tuple(layers),
            candidates=tuple(names_of[layer] for layer in layers),
            omega=omega,
            linear=[[0.0] * len(row) for row in omega],
            G=np.diag([value for row in omega for value in row]),
            costs=costs,
        )
    terms = sensitivity.interlayer
    if terms is None and sensitivity.fisher is not None:
        terms = fisher_objective_terms(sensitivity.fisher)
    if terms is None:
        terms = _trace_terms(sensitivity, candidates, model)
    index = terms.index()
    bits_of = {name: candidate.weight_bits for name, candidate in CANDIDATES.items()}
    needed = sorted(
        {(layer, bits_of[c]) for layer in layers for c in names_of[layer] if bits_of[c] is not None} - set(index)
    )
    require(not needed, f"the sensitivity result lacks terms for (layer, bits) {needed[:5]}; analyse those bit widths")

    gradient_terms = shrunk_gradient_terms(terms)  # a search would otherwise fit their noise

    def weight_term(values: Sequence[float], layer: str, candidate: str) -> float:
        bits = bits_of[candidate]
        return 0.0 if bits is None else float(values[index[(layer, bits)]])

    def with_activation(values: Sequence[float], layer: str, floor: float) -> list[float]:
        term = activation.get(layer) if activation else None
        cost = 0.0 if term is None else max(shrunk(term.loss_change, term.standard_error), floor)
        return [weight_term(values, layer, c) + (cost if _takes_activation_term(c) else 0.0) for c in names_of[layer]]

    flat = [(layer, bits_of[c]) for layer in layers for c in names_of[layer]]
    rows = np.array([-1 if bits is None else index[(layer, bits)] for layer, bits in flat])
    matrix = terms.array()
    G = np.where((rows[:, None] >= 0) & (rows[None, :] >= 0), matrix[np.ix_(rows, rows)], 0.0)
    return Objective(
        layers=tuple(layers),
        candidates=tuple(names_of[layer] for layer in layers),
        # Ω is HAWQ-V2's non-negative proxy (a minimum's loss rises under any perturbation): a
        # measured activation term below 0 is noise to it. l takes the term with its sign, like g·Δ.
        omega=[with_activation(terms.omega, layer, floor=0.0) for layer in layers],
        linear=[with_activation(gradient_terms, layer, floor=-math.inf) for layer in layers],
        G=0.5 * (G + G.T),  # HVP estimates are symmetric only up to round-off
        costs=costs,
    )


def fisher_objective_terms(fisher: FisherTerms) -> InterLayerTerms:
    """Ωᵢ(b) = Σ Fᵢᵢ Δᵢ² = 2·ΔL(i, b), the empirical Fisher's diagonal in HAWQ-V2's convention (no ½,
    so the search treats it as it treats Ω); g·Δ zero and G diagonal with Ω on it, so a point's
    predicted ΔL (Σ g·Δ + ½ Σ G) is the Fisher's own Σ ½ Σ Fᵢᵢ Δᵢ²."""
    labels = fisher.labels
    omega = tuple(2.0 * change for change in fisher.loss_changes)
    return InterLayerTerms(
        labels=labels,
        matrix=tuple(tuple(omega[a] if a == c else 0.0 for c in range(len(labels))) for a in range(len(labels))),
        gradient_terms=tuple(0.0 for _ in labels),
        delta_norms_squared=tuple(0.0 for _ in labels),
        omega=omega,
        symmetry_error=0.0,
    )


def measured_omega(
    measured: MeasuredTerms, layers: Sequence[str], names_of: Mapping[str, Sequence[str]]
) -> list[list[float]]:
    """Ωᵢ(c) = 2·ΔL(i, c), each layer's loss change measured alone at candidate c (``planner.measured``),
    in HAWQ-V2's convention as ``fisher_objective_terms``'s; fp32 is 0. Measured per candidate, so it
    holds the activations' part already (no activation term is added). A change below 0 is noise around
    0 to the diagonal search, whose Ω is a non-negative proxy, and counts as 0, as activation terms do."""
    index = measured.index()
    needed = sorted({(layer, c) for layer in layers for c in names_of[layer] if c != FP32} - set(index))
    require(not needed, f"the measured result lacks (layer, candidate) {needed[:5]}; measure those candidates")
    return [
        [0.0 if c == FP32 else 2.0 * max(measured.loss_changes[index[(layer, c)]], 0.0) for c in names_of[layer]]
        for layer in layers
    ]


def _trace_terms(
    sensitivity: SensitivityResult, candidates: Sequence[str], model: onnx.ModelProto | None
) -> InterLayerTerms:
    """Ω from traces and the model's own Δ; g·Δ and G zero (see ``build_objective``)."""
    traces = sensitivity.traces
    if traces is None:
        raise ValueError("the sensitivity result has neither traces nor inter-layer terms")
    if model is None:
        raise ValueError("a result with traces only needs the model to compute Δ")
    import torch

    from sensitivity.interlayer import omega_trace
    from sensitivity.layers import find_layers, weight_array

    weight_bits = (CANDIDATES[c].weight_bits for c in candidates)
    bits = sorted({b for b in weight_bits if b is not None}) or [8]
    layers = find_layers(model)
    weights = [torch.from_numpy(weight_array(model, layer.name).astype(np.float32)) for layer in layers]
    deltas = perturbations(layers, weights, bits)
    norms = {label: float(delta.double().pow(2).sum()) for label, delta in deltas.items()}
    average = {trace.name: omega_trace(trace) for trace in traces}
    labels = tuple(deltas)
    return InterLayerTerms(
        labels=labels,
        matrix=tuple(tuple(0.0 for _ in labels) for _ in labels),
        gradient_terms=tuple(0.0 for _ in labels),
        delta_norms_squared=tuple(norms[label] for label in labels),
        omega=tuple(average[name] * norms[(name, b)] for name, b in labels),
        symmetry_error=0.0,
    )


def _takes_activation_term(candidate: str) -> bool:
    """The measured activation term is 8-bit activations' cost (``planner.activation``): the
    candidates quantizing activations to 8-bit integers take it. A 16-bit grid's rounding error is
    256 times smaller (65 536 times in squared error), so w8a16 is predicted as w8; fp16 as its weights."""
    chosen = CANDIDATES[candidate]
    return chosen.integer_activations and chosen.activation_bits == ACTIVATION_TERM_BITS
