"""Measure an exported model with onnxruntime, beside the float model (the baseline).

The metric depends on what the model's first output is (``detect_kind``, from
``sensitivity.outputs``, which the calibration loss uses too), because one metric
cannot fit every task: argmax agreement of the flattened output scored onnxruntime's own int8
MiniLM (sentence-embedding cosine 0.41 to float, 38.7 % nearest-neighbour agreement) at 100 %,
drop 0.00, and an OCR recogniser ([N, T, C]) at 41 % where per-time-step agreement was 92 %.

- class scores ([N, C], or a Softmax/LogSoftmax/Sigmoid output, or rows that are probabilities):
  ``top1_accuracy`` with labels, else ``top1_agreement`` with the float model;
- embeddings (float rows of unit L2 norm, or a final LpNormalization / Div by a norm):
  ``cosine`` = 100 × mean cosine similarity to the float embeddings;
- sequences ([N, T, C] per-step class scores): ``step_agreement``, the percent of (sample, step)
  pairs with the same argmax over C;
- dense maps (rank ≥ 4) and other outputs: ``cosine``, per output, the worst output counting.

``metric`` overrides the choice: ``top1``, ``cosine``, ``neighbour_agreement`` (is each sample's
nearest neighbour among the others, by cosine, the same by float and quantized embeddings) or
``step_agreement``. Every metric is in percent with a float baseline of 100 (top-1 accuracy: the
float model's accuracy), and ``drop = baseline - metric`` in percentage points. Label-free
fidelity figures (agreement, KL of the softmaxed first output, SQNR, cosine, and per output
cosine and SQNR) are always computed; ``metric_reason`` says why the metric was chosen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from planner.batches import batches, session_fixed_batch
from planner.cost import cpu_session
from planner.export import ExportedModel, check_inputs
from sensitivity.outputs import detect_kind
from sensitivity.samples import SampleAxes, input_sample_axes, sample_count

LABELS_KEY = "labels"
# What a user may ask for (PlanRequest.metric, mpq plan --metric, the API's plan body).
METRICS = ("auto", "top1", "cosine", "neighbour_agreement", "step_agreement")


@dataclass(frozen=True)
class Fidelity:
    """How closely the quantized outputs follow the float outputs (first model output, as logits,
    flattened per sample), and per output."""

    top1_agreement: float  # percent of samples with the same argmax
    kl_divergence: float  # mean KL(softmax(float) || softmax(quantized)), nats
    sqnr_db: float  # 10·log10(Σ float² / Σ (float − quantized)²); inf when identical
    cosine_similarity: float  # mean over samples
    output_cosines: tuple[float, ...] = ()  # per model output, mean per-sample cosine
    output_sqnr_db: tuple[float, ...] = ()  # per model output
    step_agreement: float | None = None  # percent of (sample, step) argmax matches; rank-3 first outputs
    neighbour_agreement: float | None = None  # percent; embeddings with 3 or more samples


@dataclass(frozen=True)
class Evaluation:
    metric_name: str  # top1_accuracy, top1_agreement, cosine, neighbour_agreement or step_agreement
    metric: float  # percent, measured on the quantized model
    baseline: float  # percent, the same metric measured on the float model
    drop: float  # baseline − metric, percentage points
    num_samples: int
    fidelity: Fidelity  # quantized vs float
    baseline_fidelity: Fidelity  # float vs float: the reference values (100 %, 0, inf, 1)
    output_kind: str = "class_scores"  # class_scores, embeddings, sequence or dense
    metric_reason: str = ""  # why this metric: the rule that picked the kind, or the user's choice


def evaluate(
    quantized: ExportedModel | bytes | onnx.ModelProto,
    float_model: onnx.ModelProto | bytes,
    dataset: Mapping[str, np.ndarray],
    *,
    batch_size: int = 256,
    metric: str = "auto",
    sample_axes: SampleAxes | None = None,
) -> Evaluation:
    """Run both models over ``dataset`` (model inputs, optionally ``labels``) in batches and compare
    with ``metric`` (one of ``METRICS``; ``auto`` picks it from the output kind). Inputs are cut
    along their sample axes (``sensitivity.samples``, ``sample_axes`` merged over the declared ones)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}; got {metric!r}")
    float_proto = float_model if isinstance(float_model, onnx.ModelProto) else onnx.load_from_string(float_model)
    quantized_bytes = _model_bytes(quantized)
    feeds = check_inputs(float_proto, dataset, what="evaluation set", sample_axes=sample_axes)
    axes = input_sample_axes(float_proto, sample_axes)
    check_inputs(
        onnx.load_from_string(quantized_bytes), feeds, what="evaluation set (quantized model)", sample_axes=axes
    )
    labels = _labels(dataset, sample_count(feeds, axes))

    reference = run_batched_outputs(
        float_proto.SerializeToString(), feeds, batch_size, flatten=False, per_sample_only=True, sample_axes=axes
    )
    outputs = run_batched_outputs(
        quantized_bytes, feeds, batch_size, flatten=False, per_sample_only=True, sample_axes=axes
    )
    if len(reference) != len(outputs):
        raise ValueError(f"the models differ in per-sample outputs: float {len(reference)}, quantized {len(outputs)}")
    for index, (ref, out) in enumerate(zip(reference, outputs, strict=True)):
        if ref.shape != out.shape:
            raise ValueError(f"output {index} differs in shape: float {ref.shape}, quantized {out.shape}")
    kind, kind_reason = detect_kind(float_proto, reference[0])
    name, reason = choose_metric(metric, kind, kind_reason, labels is not None)
    value, baseline = measure_metric(name, reference, outputs, labels)
    return Evaluation(
        metric_name=name,
        metric=value,
        baseline=baseline,
        drop=baseline - value,
        num_samples=len(outputs[0]),
        fidelity=compare_all(reference, outputs, kind),
        baseline_fidelity=compare_all(reference, reference, kind),
        output_kind=kind,
        metric_reason=reason,
    )


def choose_metric(metric: str, kind: str, kind_reason: str, has_labels: bool) -> tuple[str, str]:
    """The metric's name and why: the user's choice, or the one that fits ``kind``."""
    if metric != "auto":
        name = ("top1_accuracy" if has_labels else "top1_agreement") if metric == "top1" else metric
        return name, f"chosen by the request (metric={metric!r}); {kind_reason}"
    if has_labels:
        return "top1_accuracy", f"labels given: top-1 accuracy; {kind_reason}"
    name = {"class_scores": "top1_agreement", "sequence": "step_agreement"}.get(kind, "cosine")
    return name, f"auto: {kind_reason}"


def measure_metric(
    name: str, reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray], labels: np.ndarray | None
) -> tuple[float, float]:
    """(quantized, float baseline) values of metric ``name``, both in percent."""
    if name == "top1_accuracy":
        if labels is None:
            raise ValueError("top1_accuracy needs labels in the evaluation set")
        return top1_accuracy(_flat(outputs[0]), labels), top1_accuracy(_flat(reference[0]), labels)
    if name == "top1_agreement":
        return _agreement(_flat(reference[0]), _flat(outputs[0])), 100.0
    if name == "step_agreement":
        return step_agreement(reference[0], outputs[0]), 100.0
    if name == "neighbour_agreement":
        return neighbour_agreement(reference[0], outputs[0]), 100.0
    # cosine: the worst output counts (a detector with destroyed boxes and intact scores is destroyed)
    return 100.0 * min(cosine_similarity(r, o) for r, o in zip(reference, outputs, strict=True)), 100.0


def run_batched(
    model_bytes: bytes, feeds: Mapping[str, np.ndarray], batch_size: int, sample_axes: SampleAxes | None = None
) -> np.ndarray:
    """The first output over all samples, as a float64 array ``[samples, -1]``."""
    return run_batched_outputs(model_bytes, feeds, batch_size, first_only=True, sample_axes=sample_axes)[0]


def run_batched_outputs(
    model_bytes: bytes,
    feeds: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    first_only: bool = False,
    flatten: bool = True,
    per_sample_only: bool = False,
    sample_axes: SampleAxes | None = None,
) -> list[np.ndarray]:
    """Every output (or the first only) over all samples, each as a float64 array ``[samples, -1]``,
    or with ``flatten=False`` in its own per-sample shape ``[samples, ...]``. ``per_sample_only``
    leaves out outputs after the first that are not one row per sample in every batch (a
    recurrent model's state, silero-vad's [2, N, 128]); otherwise they are an error. The inputs are
    cut along their sample axes: ``sample_axes`` merged over those of the model's declared shapes."""
    session = cpu_session(model_bytes)
    axes = _session_axes(model_bytes, session, sample_axes)
    chunks: list[list[np.ndarray | None]] = []
    for batch, real in batches(feeds, batch_size, session_fixed_batch(session, axes), axes):
        outputs = session.run(None, batch)[: 1 if first_only else None]
        rows = sample_count(batch, axes)
        chunks.append(
            [
                None
                if per_sample_only and index > 0 and not _is_per_sample(output, rows)
                else _rows(np.asarray(output), rows, index, flatten)[:real]
                for index, output in enumerate(outputs)
            ]
        )
    columns = list(zip(*chunks))
    return [np.concatenate(parts) for parts in columns if all(part is not None for part in parts)]


def _session_axes(model_bytes: bytes, session: Any, sample_axes: SampleAxes | None) -> dict[str, int | None]:
    """The sample axis of each session input: as given when the caller resolved them all (the
    planner does, once per model), else read off the model (parsed only then)."""
    names = [value.name for value in session.get_inputs()]
    if sample_axes is not None and set(names) <= set(sample_axes):
        return {name: sample_axes[name] for name in names}
    return input_sample_axes(onnx.load_from_string(model_bytes), sample_axes)


def _is_per_sample(output: np.ndarray, rows: int) -> bool:
    return np.ndim(output) > 0 and len(output) == rows


def _rows(output: np.ndarray, rows: int, index: int, flatten: bool = True) -> np.ndarray:
    """The output with its sample axis first: axis 0, or else the first axis as long as the run has
    samples (time-major outputs: ddddocr's CRNN gives [T, 1, C] for its one sample per run)."""
    axis = sample_axis(output.shape, rows)
    if axis is None:
        which = "first output" if index == 0 else f"output {index}"
        raise ValueError(
            f"the model's {which} has shape {output.shape}; expected an axis of {rows} (one row per sample of the run)"
        )
    output = np.moveaxis(output, axis, 0)
    return (output.reshape(rows, -1) if flatten else output).astype(np.float64)


def sample_axis(shape: tuple[int, ...], rows: int) -> int | None:
    """Axis 0 when it holds ``rows``, else the first axis that does (None: no axis does)."""
    return next((axis for axis, size in enumerate(shape) if size == rows), None) if shape else None


def _flat(values: np.ndarray) -> np.ndarray:
    return values.reshape(len(values), -1)


def _agreement(reference: np.ndarray, outputs: np.ndarray) -> float:
    """Percent of rows (of ``[rows, classes]``) with the same argmax."""
    return 100.0 * float(np.mean(reference.argmax(axis=-1) == outputs.argmax(axis=-1)))


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float(np.mean(logits.argmax(axis=1) == labels))


def step_agreement(reference: np.ndarray, outputs: np.ndarray) -> float:
    """Percent of (sample, step) pairs of ``[samples, steps, classes]`` scores with the same argmax
    over the last axis (a [samples, classes] output is one step)."""
    if reference.ndim < 2:
        raise ValueError(f"step_agreement needs [samples, steps, classes] outputs; got shape {reference.shape}")
    width = reference.shape[-1]
    return _agreement(reference.reshape(-1, width), outputs.reshape(-1, width))


def cosine_similarity(reference: np.ndarray, outputs: np.ndarray) -> float:
    """Mean over samples of the cosine between the flattened float and quantized outputs (1 where
    both are zero). With one value per sample, the cosine of the two [samples] columns instead:
    a per-sample cosine of scalars is only their sign agreement."""
    reference, outputs = _flat(reference), _flat(outputs)
    if reference.shape[1] == 1:
        reference, outputs = reference.T, outputs.T
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(outputs, axis=1)
    dots = np.sum(reference * outputs, axis=1)
    both_zero = (np.linalg.norm(reference, axis=1) == 0) & (np.linalg.norm(outputs, axis=1) == 0)
    cosines = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(both_zero, 1.0, 0.0))
    return float(np.mean(cosines))


# Nearest neighbours are found in blocks of this many rows: [block, samples] similarities at a time.
NEIGHBOUR_BLOCK = 1024


def neighbour_agreement(reference: np.ndarray, outputs: np.ndarray) -> float:
    """Percent of samples whose nearest other sample by cosine is the same under the float and the
    quantized outputs (flattened per sample): what a retrieval or clustering user sees."""
    if len(reference) < 3:
        raise ValueError(f"neighbour_agreement needs at least 3 samples; got {len(reference)}")
    return 100.0 * float(np.mean(_nearest(_flat(reference)) == _nearest(_flat(outputs))))


def _nearest(rows: np.ndarray) -> np.ndarray:
    unit = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), np.finfo(np.float64).tiny)
    nearest = np.empty(len(rows), dtype=np.int64)
    for start in range(0, len(rows), NEIGHBOUR_BLOCK):
        similarity = unit[start : start + NEIGHBOUR_BLOCK] @ unit.T
        block = np.arange(len(similarity))
        similarity[block, start + block] = -np.inf  # a sample is not its own neighbour
        nearest[start : start + len(similarity)] = similarity.argmax(axis=1)
    return nearest


def sqnr_db(reference: np.ndarray, outputs: np.ndarray) -> float:
    """10·log10(Σ float² / Σ (float − quantized)²); inf when identical."""
    noise = float(np.sum((reference - outputs) ** 2))
    signal = float(np.sum(reference**2))
    return float("inf") if noise == 0.0 else 10.0 * float(np.log10(signal / noise)) if signal > 0 else float("-inf")


def compare_all(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray], kind: str) -> Fidelity:
    """``compare_outputs`` of the flattened first output, with the per-output and kind-specific figures."""
    first = compare_outputs(_flat(reference[0]), _flat(outputs[0]))
    pairs = list(zip(reference, outputs, strict=True))
    return dataclasses.replace(
        first,
        output_cosines=tuple(cosine_similarity(r, o) for r, o in pairs),
        output_sqnr_db=tuple(sqnr_db(r, o) for r, o in pairs),
        step_agreement=step_agreement(reference[0], outputs[0]) if reference[0].ndim == 3 else None,
        neighbour_agreement=neighbour_agreement(reference[0], outputs[0])
        if kind == "embeddings" and len(reference[0]) >= 3
        else None,
    )


def compare_outputs(reference: np.ndarray, outputs: np.ndarray) -> Fidelity:
    """Label-free fidelity of ``outputs`` to ``reference`` (both ``[samples, classes]``)."""
    log_p, log_q = log_softmax(reference), log_softmax(outputs)
    kl = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=1)))
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(outputs, axis=1)
    dots = np.sum(reference * outputs, axis=1)
    cosine = float(np.mean(np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 1.0)))
    return Fidelity(
        top1_agreement=_agreement(reference, outputs),
        kl_divergence=max(kl, 0.0),
        sqnr_db=sqnr_db(reference, outputs),
        cosine_similarity=cosine,
    )


def log_softmax(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    """Log-softmax of logits along ``axis`` (the class axis of ``[samples, classes]``), shifted by the maximum."""
    shifted = logits - logits.max(axis=axis, keepdims=True)
    result: np.ndarray = shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))
    return result


def _labels(dataset: Mapping[str, np.ndarray], count: int) -> np.ndarray | None:
    labels = dataset.get(LABELS_KEY)
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != count or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array with {count} entries, got {labels.dtype} {labels.shape}")
    return labels


def _model_bytes(model: ExportedModel | bytes | onnx.ModelProto) -> bytes:
    if isinstance(model, ExportedModel):
        return model.model_bytes
    if isinstance(model, onnx.ModelProto):
        serialized: bytes = model.SerializeToString()
        return serialized
    return bytes(model)
