"""Layers kept out of quantization: the request's exclusion list, and structural constants.

Not every constant weight is a learned layer. YOLOv8's DFL head ends in a fixed 1×1 Conv holding
``arange(16)`` (it turns 16 bin probabilities into an expected distance); quantizing it moves every
box, and its Hessian trace ranked it third most sensitive of the model. So:

- **exclusion list** (``PlanRequest.exclude``, like onnxruntime's ``nodes_to_exclude``): layer
  names (weight initializers), node names, or fnmatch-style patterns (``*``, ``?``, ``[seq]``)
  matched against both. A matched layer stays ``fp32`` in every configuration the search
  considers. A pattern that matches no layer is a ValueError naming it: a typo would otherwise
  quantize what the user meant to protect.
- **structural constants**: a weight of at most ``STRUCTURAL_MAX_PARAMS`` values, all integers,
  is a fixed projection, not a learned layer. It is offered only the candidates whose weight
  quantizer Q_b reproduces it exactly (besides ``fp32``). Q_b is symmetric per channel with
  scale max|w|/(2^(b-1)−1), so integers are exact only when that scale divides them: ``arange(16)``
  gets scale 15/127 at 8 bits, and 1 becomes 8·15/127 ≈ 0.945; it stays ``fp32``.

Both become one thing, ``LayerCandidates``: the candidates each layer is offered. The objective
takes them per layer (``planner.objective``), so no search needs to know about exclusions.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from planner.candidates import CANDIDATES
from planner.checks import json_object, text, texts
from planner.objective import FP32, uniform_within
from sensitivity.checks import shown
from sensitivity.layers import Layer, find_layers, weight_array
from sensitivity.quantize import dequantized

# Patterns in one request, and the length of each: node names of deep models are paths of a few
# hundred characters at most; onnxruntime users list up to a few hundred nodes to exclude.
MAX_EXCLUDE_PATTERNS = 256
MAX_EXCLUDE_PATTERN_LENGTH = 1024
# At most this many values, all integers: a fixed projection (DFL's arange(16) has 16).
STRUCTURAL_MAX_PARAMS = 1024
STRUCTURAL_CONSTANT = "structural constant"
SHOWN_LAYERS = 5  # layer names an unmatched pattern's error lists


@dataclass(frozen=True)
class Exclusion:
    """A layer the search may not quantize freely: why, and what it is still offered."""

    layer: str
    node_name: str
    scope: str
    reason: str  # "exclude pattern '...'" or STRUCTURAL_CONSTANT
    candidates: tuple[str, ...]  # what it is still offered: ("fp32",) when excluded outright

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "node_name": self.node_name,
            "scope": self.scope,
            "reason": self.reason,
            "candidates": list(self.candidates),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Exclusion:
        fields = json_object(data, "an exclusion", ("layer", "node_name", "scope", "reason", "candidates"))
        return cls(
            layer=text("layer", fields["layer"]),
            node_name=text("node_name", fields["node_name"]),
            scope=text("scope", fields["scope"]),
            reason=text("reason", fields["reason"]),
            candidates=texts("candidates", fields["candidates"]),
        )


@dataclass(frozen=True)
class LayerCandidates:
    """The candidates each layer is offered (graph order), and the exclusions that narrowed them."""

    offered: Mapping[str, tuple[str, ...]]
    exclusions: tuple[Exclusion, ...] = ()

    def uniform(self, candidate: str) -> dict[str, str]:
        """Every layer at ``candidate`` where offered, the others at fp32 (``objective.uniform_within``)."""
        return uniform_within(self.offered, candidate)


def check_exclude(value: Any) -> tuple[str, ...]:
    """The request's ``exclude``: a list of names or patterns, or one comma-separated string (its parts
    stripped, empty parts dropped); repeats dropped, order kept; bounded in count and length."""
    patterns = [part.strip() for part in value.split(",")] if isinstance(value, str) else value
    if isinstance(value, str):
        patterns = [part for part in patterns if part]
    ok = (
        isinstance(patterns, list | tuple)
        and len(patterns) <= MAX_EXCLUDE_PATTERNS
        and all(isinstance(p, str) and 0 < len(p) <= MAX_EXCLUDE_PATTERN_LENGTH for p in patterns)
    )
    if not ok:
        raise ValueError(
            f"exclude must be a list of at most {MAX_EXCLUDE_PATTERNS} layer names, node names or glob patterns, "
            f"each 1 to {MAX_EXCLUDE_PATTERN_LENGTH} characters; got {shown(value)}"
        )
    return tuple(dict.fromkeys(patterns))


def match_patterns(layers: Sequence[Layer], patterns: Sequence[str]) -> dict[str, str]:
    """Layer name -> the first pattern matching its name or its node name. A pattern matching no layer
    is a ValueError naming it, with a few of the model's layer and node names to compare."""
    compiled = [(pattern, re.compile(fnmatch.translate(pattern), re.DOTALL)) for pattern in patterns]

    def matches(pattern: str, regex: re.Pattern[str], layer: Layer) -> bool:
        # equal first: a literal name holding '[' is not a character class to its owner
        return any(name == pattern or regex.fullmatch(name) for name in (layer.name, layer.node_name))

    matched: dict[str, str] = {}
    unmatched = []
    for pattern, regex in compiled:
        hits = [layer.name for layer in layers if matches(pattern, regex, layer)]
        if not hits:
            unmatched.append(pattern)
        for name in hits:
            matched.setdefault(name, pattern)
    if unmatched:
        examples = ", ".join(f"{layer.name!r} (node {layer.node_name!r})" for layer in layers[:SHOWN_LAYERS])
        more = f", ... ({len(layers)} layers)" if len(layers) > SHOWN_LAYERS else ""
        raise ValueError(
            f"exclude pattern(s) {shown(unmatched)} match no layer name or node name of the model; "
            f"its layers are {examples}{more}"
        )
    return matched


def is_structural_constant(weight: np.ndarray) -> bool:
    """A few values, all integers (``arange``, one-hot selections): a fixed projection, not learned."""
    values = np.asarray(weight, dtype=np.float64)
    return 0 < values.size <= STRUCTURAL_MAX_PARAMS and bool(np.all(np.isfinite(values) & (values == np.round(values))))


def exact_candidates(weight: np.ndarray, channel_axis: int, candidates: Sequence[str]) -> tuple[str, ...]:
    """fp32 and those of ``candidates`` whose weight quantizer reproduces ``weight`` exactly."""
    values = np.asarray(weight, dtype=np.float32)
    weight_bits = {CANDIDATES[c].weight_bits for c in candidates}
    exact_bits = {
        bits
        for bits in weight_bits
        if bits is not None and np.array_equal(dequantized(values, bits, channel_axis), values)
    }
    return (FP32, *(c for c in candidates if CANDIDATES[c].weight_bits in exact_bits))


def layer_candidates(model: onnx.ModelProto, candidates: Sequence[str], exclude: Sequence[str] = ()) -> LayerCandidates:
    """What each layer of ``model`` (normalised: its layer names are the plan's) is offered: the
    request's ``candidates``; ``fp32`` alone for a layer an ``exclude`` pattern matches; fp32 and the
    exactly reproducing candidates for a structural constant. ValueError for a pattern matching nothing."""
    layers = find_layers(model)
    matched = match_patterns(layers, exclude)
    offered: dict[str, tuple[str, ...]] = {}
    exclusions = []
    for layer in layers:
        names, reason = tuple(candidates), None
        if layer.name in matched:
            names, reason = (FP32,), f"exclude pattern {matched[layer.name]!r}"
        elif layer.num_params <= STRUCTURAL_MAX_PARAMS:
            weight = weight_array(model, layer.name)
            if is_structural_constant(weight):
                exact = exact_candidates(weight, layer.channel_axis, candidates)
                if any(c not in exact for c in candidates):  # nothing to restrict when every one is exact
                    names, reason = exact, STRUCTURAL_CONSTANT
        offered[layer.name] = names
        if reason is not None:
            exclusions.append(Exclusion(layer.name, layer.node_name, layer.scope, reason, names))
    return LayerCandidates(offered, tuple(exclusions))
