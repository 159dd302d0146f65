"""Hessian-vector products of the calibration loss over all layer weights at once.

A vector v is a tuple with one tensor per layer (``program.layers`` order, each of the
layer weight's shape); H is the Hessian of L with respect to the concatenation of all
layer weights, so (Hv)ᵢ = Σⱼ Hᵢⱼ vⱼ mixes every layer. Two exact implementations:

- ``double_backward`` (reverse-over-reverse): g = ∂L/∂W with ``create_graph=True``, then
  Hv = ∂(g·v)/∂W. Several probes share the forward and first backward; their second
  backward passes run as one ``torch.func.vmap``-batched pass (``torch.func.vjp`` of
  ``torch.func.grad``). Where functorch has no batching rule for a double-backward kernel
  (e.g. CPU convolutions running channels-last, as on images stored HWC), the operator
  falls back, once and for good, to one retained-graph backward per probe; see
  ``HessianVectorProducts.batched_backward``. Both give the same products (up to rounding).
- ``forward_over_reverse``: Hv = d/dt ∇L(W + t·v) at t = 0, as ``torch.func.jvp`` of
  ``torch.func.grad``; several probes at once with ``torch.func.vmap``.

Both accumulate over calibration batches weighted by n_b / N (see ``sensitivity.losses``).
``bench/hvp.py`` measures them: similar speed on CPU, but forward-over-reverse holds 2-3x
the memory (and vmap batching a full activation copy per probe), hence ``DEFAULT_METHOD``.
The vmap-batched second backward also holds its intermediates once per probe of a pass;
``bench/sensitivity.py`` measures what it saves (time per probe over time per gradient).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from sensitivity.losses import Batch, CalibrationLoss

Vector = tuple[torch.Tensor, ...]
HVP_METHODS = ("double_backward", "forward_over_reverse")
DEFAULT_METHOD = "double_backward"  # measured in bench/hvp.py, see docs/benchmarks.md
DEFAULT_PROBES_PER_PASS = 4  # near the fastest in bench/hvp.py at small memory growth


def dot(u: Vector, v: Vector) -> torch.Tensor:
    """Σᵢ uᵢ·vᵢ over all layers."""
    return functools.reduce(operator.add, ((a * b).sum() for a, b in zip(u, v)))


def _missing_batching_rule(error: RuntimeError) -> bool:
    """Whether ``error`` is functorch lacking a vmap rule (not a real failure such as running
    out of memory). Channels-last CPU convolution double-backward raises "NYI: querying
    is_contiguous inside of vmap for memory_format other than torch.contiguous_format"."""
    message = str(error)
    return "inside of vmap" in message or "Batching rule not implemented" in message or "NYI" in message


def _second_backward(product: torch.Tensor, params: Vector, retain: bool) -> Vector:
    """∂(g·v)/∂W; zeros where the gradient does not depend on the weights (a loss linear in them)."""
    if not product.requires_grad:
        return tuple(torch.zeros_like(p) for p in params)
    return torch.autograd.grad(product, params, retain_graph=retain, materialize_grads=True)


class HessianVectorProducts:
    """Products with the Hessian of ``loss`` at ``point`` (the full-precision weights by default).

    ``probes_per_pass`` bounds how many vectors go through one batched pass: memory grows
    roughly linearly with it (every activation is held once per probe).
    ``num_hvps`` counts the products computed (one per vector, however batched).
    """

    def __init__(
        self,
        loss: CalibrationLoss,
        point: Mapping[str, torch.Tensor] | None = None,
        method: str = DEFAULT_METHOD,
        probes_per_pass: int = DEFAULT_PROBES_PER_PASS,
    ) -> None:
        if method not in HVP_METHODS:
            raise ValueError(f"unknown HVP method {method!r}; choose one of {HVP_METHODS}")
        if probes_per_pass < 1:
            raise ValueError(f"probes_per_pass must be at least 1; got {probes_per_pass}")
        self.loss = loss
        self.names = tuple(layer.name for layer in loss.program.layers)
        point = loss.weights0 if point is None else point
        self.point: Vector = tuple(point[name].detach().to(loss.device) for name in self.names)
        self.method = method
        self.probes_per_pass = probes_per_pass
        self.num_hvps = 0
        # double_backward: whether the probes' second backward runs vmap-batched; turned off
        # for good by the first pass whose kernels vmap cannot batch.
        self.batched_backward = True

    def _function(self, batch: Batch) -> Callable[[Vector], torch.Tensor]:
        """W ↦ L_b(W) as a function of the layer-weight tuple."""
        return lambda params: self.loss.batch_loss(dict(zip(self.names, params)), batch)

    def _leaves(self) -> Vector:
        return tuple(w.clone().requires_grad_(True) for w in self.point)

    def gradient(self) -> tuple[float, Vector]:
        """(L(W), ∇L(W)) accumulated over all batches."""
        total = [torch.zeros_like(w) for w in self.point]
        value = 0.0
        for batch in self.loss.batches:
            params = self._leaves()
            loss = self._function(batch)(params)
            grads = torch.autograd.grad(loss, params)
            value += batch.weight * float(loss.detach())
            for acc, g in zip(total, grads):
                acc.add_(g, alpha=batch.weight)
        return value, tuple(total)

    def _batch_hvp(self, batch: Batch, probes: Vector) -> Vector:
        """Hv for stacked probes (leading probe axis of size k) on one calibration batch."""
        f = self._function(batch)
        if self.method == "double_backward":
            k = probes[0].shape[0]
            if k > 1 and self.batched_backward:
                try:
                    return self._vmapped_double_backward(f, probes)
                except RuntimeError as error:
                    if not _missing_batching_rule(error):
                        raise
                    self.batched_backward = False  # the same kernels would fail on every pass
            params = self._leaves()
            loss = f(params)
            if not loss.requires_grad:  # nothing differentiable between the weights and the loss: H = 0
                return tuple(torch.zeros_like(p) for p in probes)
            grads = torch.autograd.grad(loss, params, create_graph=True, materialize_grads=True)
            # The probes share the forward and first backward; each then costs one more
            # backward. (``is_grads_batched=True`` would batch those with the legacy vmap,
            # which lacks rules for convolution double-backward.)
            columns = [
                _second_backward(dot(grads, tuple(p[i] for p in probes)), params, retain=i < k - 1) for i in range(k)
            ]
            return tuple(torch.stack(parts) for parts in zip(*columns))

        def single(v: Vector) -> Vector:
            return torch.func.jvp(torch.func.grad(f), (self.point,), (v,))[1]

        if probes[0].shape[0] == 1:
            return tuple(h.unsqueeze(0) for h in single(tuple(p[0] for p in probes)))
        return torch.func.vmap(single)(probes)

    def _vmapped_double_backward(self, f: Callable[[Vector], torch.Tensor], probes: Vector) -> Vector:
        """Hv for stacked probes: one forward and first backward (the VJP's primal), then the
        k second backward passes as one batched pass. On few-weight, many-op models (the ONNX
        interpreter's transformers) this saves the per-pass overhead: bench/sensitivity.py."""
        # (output, vjp function); torch types the result as a pair or, with has_aux, a triple
        _, second_backward = torch.func.vjp(torch.func.grad(f), self.point)[:2]
        return torch.func.vmap(lambda v: second_backward(v)[0])(probes)

    def stacked(self, probes: Vector) -> Vector:
        """H applied to each of k stacked probes in one pass per calibration batch."""
        total = [torch.zeros_like(p) for p in probes]
        for batch in self.loss.batches:
            for acc, h in zip(total, self._batch_hvp(batch, probes)):
                acc.add_(h.detach(), alpha=batch.weight)
        self.num_hvps += probes[0].shape[0]
        return tuple(total)

    def __call__(self, v: Vector) -> Vector:
        """Hv for one vector."""
        return tuple(h[0] for h in self.stacked(tuple(t.unsqueeze(0) for t in v)))

    def map(self, make_vector: Callable[[int], Vector], count: int) -> Iterator[tuple[int, Vector]]:
        """Yield (k, H·make_vector(k)) for k < count, building only one pass's vectors at a time."""
        for start in range(0, count, self.probes_per_pass):
            chunk = [make_vector(k) for k in range(start, min(start + self.probes_per_pass, count))]
            stacked = self.stacked(tuple(torch.stack(parts) for parts in zip(*chunk)))
            for k in range(len(chunk)):
                yield start + k, tuple(h[k] for h in stacked)

    def many(self, vectors: Sequence[Vector]) -> list[Vector]:
        """Hv for each vector, ``probes_per_pass`` of them per pass."""
        return [product for _, product in self.map(lambda k: vectors[k], len(vectors))]
