"""Inter-layer second-order terms and the predicted loss change of a configuration.

Quantizing layer i to b bits perturbs its weights by Δᵢᵇ = Q_b(Wᵢ) − Wᵢ
(``sensitivity.quantize.perturbation``, the exporter's quantizer). A configuration c
perturbs all weights by Δ(c) = (Δ₁^{c₁}, Δ₂^{c₂}, ...), and Taylor's expansion gives

    ΔL(c) ≈ g·Δ(c) + ½ Δ(c)ᵀ H Δ(c) = Σᵢ gᵢ·Δᵢ^{cᵢ} + ½ Σᵢ Σⱼ G[(i,cᵢ),(j,cⱼ)]

with G[(i,b),(j,b′)] = Δᵢᵇ·(H Δⱼᵇ′)ᵢ = Δᵢᵇᵀ Hᵢⱼ Δⱼᵇ′. One HVP with the vector that is
Δⱼᵇ′ in block j and zero elsewhere gives the whole column (j,b′). The off-diagonal
blocks (i ≠ j) are the inter-layer dependencies HAWQ-V2's diagonal proxy ignores:

    Ωᵢ(b) = (Tr(Hᵢᵢ)/nᵢ)·‖Δᵢᵇ‖²,   Ω(c) = Σᵢ Ωᵢ(cᵢ)   (DESIGN.md's convention, no ½).

Ωᵢ(b) is what Δᵢᵇᵀ Hᵢᵢ Δᵢᵇ would be if Hᵢᵢ were (Tr(Hᵢᵢ)/nᵢ)·I, so ½Ω(c) is the diagonal
approximation of the quadratic term; ``diagonal_loss_change`` returns ½Ω(c).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from sensitivity.hvp import HessianVectorProducts
from sensitivity.layers import Layer
from sensitivity.quantize import perturbation
from sensitivity.results import InterLayerTerms, LayerTrace, SensitivityResult
from sensitivity.traces import Progress

Configuration = Mapping[str, int | None]  # layer name -> weight bits; None (or absent) = unquantized


def perturbations(
    layers: Sequence[Layer], point: Sequence[torch.Tensor], bits: Sequence[int]
) -> dict[tuple[str, int], torch.Tensor]:
    """Δᵢᵇ for every layer and bit width, keyed by (layer name, bits), layers outermost."""
    return {
        (layer.name, b): perturbation(weight, b, layer.channel_axis)
        for layer, weight in zip(layers, point)
        for b in bits
    }


def _in_block(delta: torch.Tensor, block: int, point: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The vector over all layer weights that is ``delta`` in layer ``block`` and zero elsewhere."""
    return tuple(delta if j == block else torch.zeros_like(w) for j, w in enumerate(point))


def _symmetry_error(matrix: np.ndarray) -> float:
    scale = float(np.abs(matrix).max())
    return float(np.abs(matrix - matrix.T).max()) / scale if scale > 0 else 0.0


def interlayer_terms(
    hvp: HessianVectorProducts,
    layers: Sequence[Layer],
    bits: Sequence[int],
    traces: Sequence[LayerTrace],
    progress: Progress | None = None,
) -> InterLayerTerms:
    """g·Δ, G (one HVP per column), ‖Δ‖² and Ω for every (layer, bits); see the module docstring.
    ``progress("interlayer", fraction, message)`` after each column, with an ETA (a real model's
    columns took 18 minutes with nothing reported)."""
    deltas = perturbations(layers, hvp.point, bits)
    labels = tuple(deltas)
    position = {layer.name: i for i, layer in enumerate(layers)}

    def column(k: int) -> tuple[torch.Tensor, ...]:
        return _in_block(deltas[labels[k]], position[labels[k][0]], hvp.point)

    matrix = np.zeros((len(labels), len(labels)))
    started = time.monotonic()
    for col, product in hvp.map(column, len(labels)):
        for row, label in enumerate(labels):
            matrix[row, col] = float((deltas[label].double() * product[position[label[0]]].double()).sum())
        if progress is not None:
            done = col + 1
            left = (time.monotonic() - started) / done * (len(labels) - done)
            progress("interlayer", 0.9 * done / len(labels), f"{done}/{len(labels)} columns of G, ~{left:.0f} s left")
    _, gradient = hvp.gradient()
    gradient_terms = tuple(
        float((gradient[position[name]].double() * d.double()).sum()) for (name, _), d in deltas.items()
    )
    norms = tuple(float(d.double().pow(2).sum()) for d in deltas.values())
    average_trace = {t.name: omega_trace(t) for t in traces}
    return InterLayerTerms(
        labels=labels,
        matrix=tuple(tuple(float(x) for x in row) for row in matrix),
        gradient_terms=gradient_terms,
        delta_norms_squared=norms,
        omega=tuple(average_trace[name] * norm for (name, _), norm in zip(labels, norms)),
        symmetry_error=_symmetry_error(matrix),
        gradient_term_errors=gradient_term_errors(hvp, deltas, position),
    )


def gradient_term_errors(
    hvp: HessianVectorProducts, deltas: Mapping[tuple[str, int], torch.Tensor], position: Mapping[str, int]
) -> tuple[float, ...]:
    """The standard error of each gᵢ·Δᵢᵇ, a mean over the calibration samples.

    g·Δ = (1/N) Σₛ ∇Lₛ·Δ, and one forward-mode pass (``torch.func.jvp``) along Δ gives every
    sample's directional derivative ∇Lₛ·Δ of a batch at once. Near a trained minimum g is mostly
    the calibration set's sampling noise, and this error says how much of g·Δ is noise.
    """
    loss, point = hvp.loss, hvp.point
    derivatives: dict[tuple[str, int], list[torch.Tensor]] = {label: [] for label in deltas}
    for batch in loss.batches:

        def sample_losses(*params: torch.Tensor, batch=batch) -> torch.Tensor:
            return loss.sample_losses(dict(zip(hvp.names, params)), batch)

        for label, delta in deltas.items():
            # (output, tangent); torch types the result as a pair or, with has_aux, a triple
            _, derivative = torch.func.jvp(sample_losses, tuple(point), _in_block(delta, position[label[0]], point))[:2]
            derivatives[label].append(derivative.detach().double().cpu())
    errors = []
    for parts in derivatives.values():
        values = torch.cat(parts)
        # one sample has no spread to measure: take its term as all noise (and stay JSON-finite)
        error = values.std(correction=1) / len(values) ** 0.5 if len(values) > 1 else values.abs().sum()
        errors.append(float(error))
    return tuple(errors)


def shrunk_gradient_terms(terms: InterLayerTerms) -> tuple[float, ...]:
    """g·Δ shrunk toward 0 by its standard error s (positive-part James–Stein):
    (g·Δ)·max(0, 1 − s²/(g·Δ)²).

    A search picks the least predicted loss change among very many configurations. With the raw
    g·Δ of a small calibration set it favours configurations whose sampling noise happens to
    cancel their quadratic term, and that noise does not carry over to new data (on the tiny
    token transformer the raw inter-layer plans measured below the diagonal ones). A term well
    above its error is kept almost whole; one within its error is dropped. Results computed
    before errors were recorded have none, and keep their terms as they are.
    """
    if not terms.gradient_term_errors:
        return terms.gradient_terms
    return tuple(shrunk(term, error) for term, error in zip(terms.gradient_terms, terms.gradient_term_errors))


def shrunk(term: float, error: float) -> float:
    """A noisy mean shrunk toward 0 by its standard error (positive-part James–Stein):
    term·max(0, 1 − error²/term²)."""
    return term * max(0.0, 1.0 - (error / term) ** 2) if term != 0.0 else 0.0


def omega_trace(trace) -> float:
    """The average trace Ω uses: max(Tr(Hᵢ)/nᵢ, 0).

    HAWQ-V2's proxy assumes a positive semi-definite Hessian block. A negative Hutchinson
    estimate (possible near a minimum where the trace is small against its standard error,
    which is reported with it) would otherwise make a search prefer *larger* perturbations
    of that layer, i.e. it would optimise noise.
    """
    return max(trace.average_trace, 0.0)


def _terms(result: SensitivityResult | InterLayerTerms) -> InterLayerTerms:
    terms = result.interlayer if isinstance(result, SensitivityResult) else result
    if terms is None:
        raise ValueError("this result has no inter-layer terms; compute it with an InterLayerConfig")
    return terms


def _selected(terms: InterLayerTerms, configuration: Configuration) -> list[int]:
    """Indices into ``terms.labels`` of the quantized layers of ``configuration``."""
    index = terms.index()
    names = {name for name, _ in terms.labels}
    unknown = sorted(set(configuration) - names)
    if unknown:
        raise ValueError(f"configuration names unknown layers {unknown}; layers: {sorted(names)}")
    selected = []
    for name, bits in configuration.items():
        if bits is None:
            continue
        if (name, bits) not in index:
            available = sorted(b for n, b in terms.labels if n == name)
            raise ValueError(f"no terms for layer {name!r} at {bits} bits; computed bit widths: {available}")
        selected.append(index[(name, bits)])
    return selected


def predicted_loss_change(result: SensitivityResult | InterLayerTerms, configuration: Configuration) -> float:
    """ΔL(c) ≈ Σᵢ gᵢ·Δᵢ^{cᵢ} + ½ Σᵢ Σⱼ G[(i,cᵢ),(j,cⱼ)]; unquantized layers contribute 0."""
    terms = _terms(result)
    selected = _selected(terms, configuration)
    matrix = terms.array()[np.ix_(selected, selected)]
    return float(sum(terms.gradient_terms[a] for a in selected) + 0.5 * matrix.sum())


def omega(result: SensitivityResult | InterLayerTerms, configuration: Configuration) -> float:
    """HAWQ-V2's Ω(c) = Σᵢ Ωᵢ(cᵢ) (no ½, as in DESIGN.md)."""
    terms = _terms(result)
    return float(sum(terms.omega[a] for a in _selected(terms, configuration)))


def diagonal_loss_change(result: SensitivityResult | InterLayerTerms, configuration: Configuration) -> float:
    """½Ω(c): the quadratic term with each Hᵢᵢ replaced by (Tr(Hᵢᵢ)/nᵢ)·I and Hᵢⱼ (i≠j) by 0."""
    return 0.5 * omega(result, configuration)
