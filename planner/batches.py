"""Batches of samples for onnxruntime runs, including models whose batch dim is fixed.

A model exported with batch 1 (or any fixed N) takes exactly N samples per run: the samples are cut
into runs of N, the last one padded by repeating a sample, and only the real rows are kept. The
model itself is never edited to make its batch dim dynamic. Each input is cut along its own sample
axis, and an input shared by every sample goes whole to every run (``sensitivity.samples``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from sensitivity.normalize import common_fixed_dim, padded_rows
from sensitivity.samples import SampleAxes, sample_count, take_samples


def session_fixed_batch(session: Any, axes: SampleAxes) -> int | None:
    """The fixed batch size of an onnxruntime session's (``InferenceSession``) per-sample inputs (their dim on the sample
    axis), or None when it is dynamic; shared inputs do not count."""
    dims = [
        (value.shape or [])[axis] if axis < len(value.shape or []) else None
        for value in session.get_inputs()
        for axis in [axes.get(value.name, 0)]
        if axis is not None
    ]
    return common_fixed_dim(dims)


def batches(
    feeds: Mapping[str, np.ndarray], batch_size: int, fixed: int | None, axes: SampleAxes
) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """(the feeds of one run, how many of its rows are real samples), over all samples in order."""
    size = fixed or batch_size
    count = sample_count(feeds, axes)
    for start in range(0, count, size):
        stop = min(start + size, count)
        yield take_samples(feeds, padded_rows(start, stop, fixed), axes), stop - start
