"""Measure an exported model with onnxruntime, beside the float model (the baseline).

With ``labels`` in the evaluation set the metric is top-1 accuracy; without, it is top-1 agreement
with the float model. Both are in percent, shown beside the float baseline, and
``drop = baseline - metric`` in percentage points. Label-free fidelity figures (agreement, KL
divergence of the softmaxed logits, output SQNR, cosine similarity) are always computed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from planner.batches import batches, session_fixed_batch
from planner.cost import cpu_session
from planner.export import ExportedModel, check_inputs

LABELS_KEY = "labels"


@dataclass(frozen=True)
class Fidelity:
    """How closely the quantized outputs follow the float outputs (first model output, as logits)."""

    top1_agreement: float  # percent of samples with the same argmax
    kl_divergence: float  # mean KL(softmax(float) || softmax(quantized)), nats
    sqnr_db: float  # 10·log10(Σ float² / Σ (float − quantized)²); inf when identical
    cosine_similarity: float  # mean over samples


@dataclass(frozen=True)
class Evaluation:
    metric_name: str  # "top1_accuracy" (with labels) or "top1_agreement" (without)
    metric: float  # percent, measured on the quantized model
    baseline: float  # percent, the same metric measured on the float model
    drop: float  # baseline − metric, percentage points
    num_samples: int
    fidelity: Fidelity  # quantized vs float
    baseline_fidelity: Fidelity  # float vs float: the reference values (100 %, 0, inf, 1)


def evaluate(
    quantized: ExportedModel | bytes | onnx.ModelProto,
    float_model: onnx.ModelProto | bytes,
    dataset: Mapping[str, np.ndarray],
    *,
    batch_size: int = 256,
) -> Evaluation:
    """Run both models over ``dataset`` (model inputs, optionally ``labels``) in batches and compare."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    float_proto = float_model if isinstance(float_model, onnx.ModelProto) else onnx.load_from_string(float_model)
    quantized_bytes = _model_bytes(quantized)
    feeds = check_inputs(float_proto, dataset, what="evaluation set")
    check_inputs(onnx.load_from_string(quantized_bytes), feeds, what="evaluation set (quantized model)")
    labels = _labels(dataset, len(next(iter(feeds.values()))))

    reference = run_batched(float_proto.SerializeToString(), feeds, batch_size)
    outputs = run_batched(quantized_bytes, feeds, batch_size)
    if reference.shape != outputs.shape:
        raise ValueError(f"first outputs differ in shape: float {reference.shape}, quantized {outputs.shape}")
    fidelity = compare_outputs(reference, outputs)
    baseline_fidelity = compare_outputs(reference, reference)
    if labels is not None:
        name = "top1_accuracy"
        metric, baseline = top1_accuracy(outputs, labels), top1_accuracy(reference, labels)
    else:
        name = "top1_agreement"
        metric, baseline = fidelity.top1_agreement, baseline_fidelity.top1_agreement
    return Evaluation(
        metric_name=name,
        metric=metric,
        baseline=baseline,
        drop=baseline - metric,
        num_samples=len(outputs),
        fidelity=fidelity,
        baseline_fidelity=baseline_fidelity,
    )


def run_batched(model_bytes: bytes, feeds: Mapping[str, np.ndarray], batch_size: int) -> np.ndarray:
    """The first output over all samples, as a float64 array ``[samples, -1]``."""
    return run_batched_outputs(model_bytes, feeds, batch_size, first_only=True)[0]


def run_batched_outputs(
    model_bytes: bytes, feeds: Mapping[str, np.ndarray], batch_size: int, *, first_only: bool = False
) -> list[np.ndarray]:
    """Every output (or the first only) over all samples, each as a float64 array ``[samples, -1]``."""
    session = cpu_session(model_bytes)
    chunks: list[list[np.ndarray]] = []
    for batch, real in batches(feeds, batch_size, session_fixed_batch(session)):
        outputs = session.run(None, batch)[: 1 if first_only else None]
        rows = len(next(iter(batch.values())))
        chunks.append([_rows(np.asarray(output), rows, index)[:real] for index, output in enumerate(outputs)])
    return [np.concatenate(parts) for parts in zip(*chunks)]


def _rows(output: np.ndarray, rows: int, index: int) -> np.ndarray:
    if output.ndim == 0 or len(output) != rows:
        which = "first output" if index == 0 else f"output {index}"
        raise ValueError(f"the model's {which} has shape {output.shape}; expected one row per sample")
    return output.reshape(rows, -1).astype(np.float64)


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float(np.mean(logits.argmax(axis=1) == labels))


def compare_outputs(reference: np.ndarray, outputs: np.ndarray) -> Fidelity:
    """Label-free fidelity of ``outputs`` to ``reference`` (both ``[samples, classes]``)."""
    agreement = 100.0 * float(np.mean(reference.argmax(axis=1) == outputs.argmax(axis=1)))
    log_p, log_q = log_softmax(reference), log_softmax(outputs)
    kl = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=1)))
    noise = float(np.sum((reference - outputs) ** 2))
    signal = float(np.sum(reference**2))
    sqnr = float("inf") if noise == 0.0 else 10.0 * float(np.log10(signal / noise)) if signal > 0 else float("-inf")
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(outputs, axis=1)
    dots = np.sum(reference * outputs, axis=1)
    cosine = float(np.mean(np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 1.0)))
    return Fidelity(top1_agreement=agreement, kl_divergence=max(kl, 0.0), sqnr_db=sqnr, cosine_similarity=cosine)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of ``[samples, classes]`` logits, shifted by the row maximum."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))


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
        return model.SerializeToString()
    return bytes(model)
