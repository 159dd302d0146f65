"""Candidates (per-layer precision options) and configurations (a candidate for every layer).

The menu is fixed by DESIGN.md: ``fp32`` (unquantized), ``fp16`` (float16 weights and compute),
``w8a8`` and ``w4a8`` (integer weights, 8-bit activations), ``w8a16`` (int8 weights, 16-bit
activations: onnxruntime's 16-bit QDQ, opset 21), ``w8`` and ``w4`` (weight-only). Weights are
always quantized with the one quantizer Q_b in ``sensitivity.quantize`` (symmetric, per output
channel for integers; b = 16 is the float16 rounding).

A configuration maps a layer name (its ONNX weight initializer) to a candidate name. It is a
plain frozen value with JSON (de)serialization; ``validate`` checks it against a model's layers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from sensitivity.layers import Layer

FLOAT_BITS = 32  # what an unquantized weight or activation counts as in size and BOPS


@dataclass(frozen=True)
class Candidate:
    """One precision option for a layer; ``None`` bits means that tensor stays float32.

    ``float16``: the 16 bits are IEEE half precision (weights stored and the layer computed in
    float16), not an integer grid: no scales, no calibrated activation ranges.
    """

    name: str
    weight_bits: int | None
    activation_bits: int | None
    float16: bool = False

    @property
    def quantizes_weights(self) -> bool:
        return self.weight_bits is not None

    @property
    def quantizes_activations(self) -> bool:
        return self.activation_bits is not None

    @property
    def integer_weights(self) -> bool:
        """Weights on Q_b's integer grid (with per-channel scales)."""
        return self.quantizes_weights and not self.float16

    @property
    def integer_activations(self) -> bool:
        """Activations quantized to integers with calibrated ranges (``quantize_static``)."""
        return self.quantizes_activations and not self.float16

    @property
    def weight_only(self) -> bool:
        return self.quantizes_weights and not self.quantizes_activations

    @property
    def effective_weight_bits(self) -> int:
        """Bits per weight for cost accounting (fp32 counts as 32)."""
        return self.weight_bits if self.weight_bits is not None else FLOAT_BITS

    @property
    def effective_activation_bits(self) -> int:
        """Bits per activation for cost accounting (weight-only candidates compute in fp32)."""
        return self.activation_bits if self.activation_bits is not None else FLOAT_BITS


CANDIDATES: Mapping[str, Candidate] = MappingProxyType(
    {
        "fp32": Candidate("fp32", None, None),
        "fp16": Candidate("fp16", 16, 16, float16=True),
        "w8a8": Candidate("w8a8", 8, 8),
        "w4a8": Candidate("w4a8", 4, 8),
        "w8a16": Candidate("w8a16", 8, 16),
        "w8": Candidate("w8", 8, None),
        "w4": Candidate("w4", 4, None),
    }
)


def get_candidate(name: str) -> Candidate:
    """The candidate called ``name``; a clear ValueError for an unknown name."""
    try:
        return CANDIDATES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown candidate {name!r}; valid candidates: {', '.join(CANDIDATES)}") from None


def parse_candidates(text: str | Sequence[str]) -> tuple[Candidate, ...]:
    """``"fp32,w8a8,w4"`` (or a list of names) -> candidates, in the given order, without repeats."""
    names = [part.strip() for part in text.split(",")] if isinstance(text, str) else [str(n).strip() for n in text]
    names = [name for name in names if name]
    if not names:
        raise ValueError(f"no candidates given; valid candidates: {', '.join(CANDIDATES)}")
    unknown = [name for name in names if name not in CANDIDATES]
    if unknown:
        raise ValueError(
            f"unknown candidate(s) {', '.join(repr(n) for n in unknown)}; valid candidates: {', '.join(CANDIDATES)}"
        )
    return tuple(CANDIDATES[name] for name in dict.fromkeys(names))


@dataclass(frozen=True)
class Configuration(Mapping[str, str]):
    """A candidate name for every layer, keyed by layer (weight initializer) name.

    Behaves as a read-only ``Mapping[str, str]``. Candidate names are checked on construction;
    layer names are checked against a model with ``validate``.
    """

    assignments: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assignments = dict(self.assignments)
        bad_keys = [key for key in assignments if not isinstance(key, str) or not key]
        if bad_keys:
            raise ValueError(f"layer names must be non-empty strings, got {bad_keys!r}")
        unknown = sorted({str(name) for name in assignments.values() if name not in CANDIDATES})
        if unknown:
            raise ValueError(
                f"unknown candidate(s) {', '.join(repr(n) for n in unknown)} in configuration; "
                f"valid candidates: {', '.join(CANDIDATES)}"
            )
        object.__setattr__(self, "assignments", MappingProxyType(assignments))

    # Mapping protocol
    def __getitem__(self, layer: str) -> str:
        return self.assignments[layer]

    def __iter__(self) -> Iterator[str]:
        return iter(self.assignments)

    def __len__(self) -> int:
        return len(self.assignments)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.assignments.items())))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Configuration):
            return dict(self.assignments) == dict(other.assignments)
        if isinstance(other, Mapping):
            return dict(self.assignments) == dict(other)
        return NotImplemented

    def candidate(self, layer: str) -> Candidate:
        return CANDIDATES[self.assignments[layer]]

    @classmethod
    def uniform(cls, layers: Iterable[Layer | str], candidate: str) -> Configuration:
        """Every layer at the same candidate."""
        get_candidate(candidate)
        return cls({_layer_name(layer): candidate for layer in layers})

    def updated(self, changes: Mapping[str, str]) -> Configuration:
        """A new configuration with some layers' candidates replaced (or added)."""
        return Configuration({**self.assignments, **dict(changes)})

    def validate(self, layers: Iterable[Layer | str]) -> Configuration:
        """Check that this configuration names exactly the given layers; returns self."""
        expected = [_layer_name(layer) for layer in layers]
        unknown = [name for name in self.assignments if name not in set(expected)]
        missing = [name for name in expected if name not in self.assignments]
        problems = []
        if unknown:
            problems.append(f"unknown layer(s) {', '.join(repr(n) for n in unknown)}")
        if missing:
            problems.append(f"missing layer(s) {', '.join(repr(n) for n in missing)}")
        if problems:
            raise ValueError(
                f"configuration does not match the model: {'; '.join(problems)}; "
                f"the model's layers are {', '.join(repr(n) for n in expected)}"
            )
        return self

    def to_dict(self) -> dict[str, str]:
        return dict(self.assignments)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Configuration:
        if not isinstance(data, Mapping):
            raise ValueError(f"a configuration must be a JSON object of layer -> candidate, got {type(data).__name__}")
        bad = [key for key, value in data.items() if not isinstance(value, str)]
        if bad:
            raise ValueError(f"candidate names must be strings; bad entries for layer(s) {bad!r}")
        return cls(dict(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Configuration:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"configuration is not valid JSON: {error}") from None
        return cls.from_dict(data)


def as_configuration(configuration: Configuration | Mapping[str, str]) -> Configuration:
    return configuration if isinstance(configuration, Configuration) else Configuration(dict(configuration))


def _layer_name(layer: Layer | str) -> str:
    return layer if isinstance(layer, str) else layer.name
