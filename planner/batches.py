"""Batches of samples for onnxruntime runs, including models whose batch dim is fixed.

A model exported with batch 1 (or any fixed N) takes exactly N samples per run: the samples are cut
into runs of N, the last one padded by repeating a sample, and only the real rows are kept. The
model itself is never edited to make its batch dim dynamic.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from sensitivity.normalize import common_fixed_dim, padded_rows


def session_fixed_batch(session) -> int | None:
    """The fixed batch size of an onnxruntime session's inputs, or None when it is dynamic."""
    return common_fixed_dim([(value.shape or [None])[0] for value in session.get_inputs()])


def batches(
    feeds: Mapping[str, np.ndarray], batch_size: int, fixed: int | None
) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """(the feeds of one run, how many of its rows are real samples), over all samples in order."""
    size = fixed or batch_size
    count = len(next(iter(feeds.values())))
    for start in range(0, count, size):
        stop = min(start + size, count)
        rows = padded_rows(start, stop, fixed)
        yield {name: array[rows] for name, array in feeds.items()}, stop - start
