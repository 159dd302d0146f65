"""Where each model input holds its samples: the one reading every part of mpq counts and slices by.

Most inputs hold samples on axis 0, but not all: silero-vad takes ``input`` [B, 576], a recurrent
``state`` declared [2, ?, 128] (samples on axis 1) and ``sr``, a rank-0 sample rate that is the
same for every sample. An input's **sample axis** is an int, or None for a **shared** input (the
whole array goes to every run, it is never sliced or counted).

``input_sample_axes(model)`` reads them off the declared input shapes (``static_dims``):

- a declared rank of 0: shared (None);
- axis 0 when its dim 0 is dynamic, or the shape is undeclared, or no dim is dynamic at all;
- axis 0 when every non-scalar input's dim 0 is the same fixed N: the model takes batches of
  exactly N (ddddocr's ``input1`` [1, 1, 64, image_width]: a batch of 1 with a dynamic width);
- otherwise the first dynamic axis: a fixed dim 0 beside inputs whose batch is dynamic is no
  batch (silero's ``state`` [2, ?, 128] gives 1).

A user's ``sample_axes`` (``{"state": 1, "sr": None}``) is merged over the inferred axes, for
models whose declared shapes are missing or misleading. Arrays that are not model inputs
(``labels``) hold their samples on axis 0. ``sample_count`` and ``take_samples`` are the only
ways the calibration and evaluation sets are counted and sliced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from sensitivity.checks import is_int, shown
from sensitivity.normalize import common_fixed_dim, static_dims

SampleAxes = Mapping[str, int | None]
# Bounds of a user's sample_axes (from JSON: API bodies, stored plan requests): one entry per model
# input, named as ONNX names them; no model has an input of rank 256.
MAX_SAMPLE_AXES = 256
MAX_INPUT_NAME_LENGTH = 1024
MAX_SAMPLE_AXIS = 255


def input_sample_axes(model: onnx.ModelProto, sample_axes: SampleAxes | None = None) -> dict[str, int | None]:
    """Each fed graph input's sample axis (None: shared), inferred as the module doc says, with
    ``sample_axes`` merged over them; a ValueError names an unknown input or an axis out of range."""
    declared = _declared_dims(model)
    inferred = {name: _inferred_axis(dims, _has_fixed_batch(declared)) for name, dims in declared.items()}
    overrides = check_sample_axes(sample_axes or {})
    unknown = sorted(set(overrides) - set(declared))
    if unknown:
        raise ValueError(
            f"sample_axes names {shown(unknown)}, which are not inputs of the model; its inputs are {list(declared)}"
        )
    for name, axis in overrides.items():
        dims = declared[name]
        if axis is not None and dims is not None and axis >= len(dims):
            raise ValueError(
                f"sample axis {axis} of input {name!r} is out of range: its declared shape "
                f"{show_dims(dims)} has rank {len(dims)}"
            )
    return {**inferred, **overrides}


def check_sample_axes(value: Any) -> dict[str, int | None]:
    """A user's ``sample_axes`` as plain data: a mapping of input names to an axis (an int) or None
    (shared), bounded in size; a ValueError says what it accepts."""
    ok = (
        isinstance(value, Mapping)
        and len(value) <= MAX_SAMPLE_AXES
        and all(
            isinstance(name, str)
            and 0 < len(name) <= MAX_INPUT_NAME_LENGTH
            and (axis is None or (is_int(axis) and 0 <= axis <= MAX_SAMPLE_AXIS))
            for name, axis in value.items()
        )
    )
    if not ok:
        raise ValueError(
            f"sample_axes must map at most {MAX_SAMPLE_AXES} input names to an axis in "
            f"[0, {MAX_SAMPLE_AXIS}] or null (shared by every sample); got {shown(value)}"
        )
    return {name: None if axis is None else int(axis) for name, axis in value.items()}


def fixed_batch(model: onnx.ModelProto, sample_axes: SampleAxes | None = None) -> int | None:
    """N when every per-sample input's declared dim on its sample axis is the same fixed N (the
    model takes batches of exactly N samples), else None; shared inputs do not count."""
    declared = _declared_dims(model)
    axes = input_sample_axes(model, sample_axes)
    return common_fixed_dim([_dim(declared[name], axis) for name, axis in axes.items() if axis is not None])


def sample_count(feeds: Mapping[str, np.ndarray], axes: SampleAxes, *, what: str = "inputs") -> int:
    """The number of samples the per-sample arrays of ``feeds`` hold (arrays not in ``axes`` on
    axis 0); a ValueError names them when they disagree or none holds samples."""
    counts = {
        name: _count(name, np.asarray(array), axis)
        for name, array in feeds.items()
        for axis in [axes.get(name, 0)]
        if axis is not None
    }
    if not counts:
        raise ValueError(f"{what}: no array holds samples (every input is shared by all samples: {list(feeds)})")
    if len(set(counts.values())) > 1:
        listing = ", ".join(
            f"{name!r} {count} (axis {axes.get(name, 0)} of shape {np.shape(feeds[name])})"
            for name, count in counts.items()
        )
        raise ValueError(f"{what}: the per-sample arrays hold different numbers of samples: {listing}")
    return next(iter(counts.values()))


def take_samples(feeds: Mapping[str, np.ndarray], rows: slice | np.ndarray, axes: SampleAxes) -> dict[str, np.ndarray]:
    """The samples ``rows`` (a slice, or indices as from ``padded_rows``) of every per-sample array,
    along its own axis (arrays not in ``axes`` along axis 0); shared arrays pass unchanged."""
    return {name: _take(array, rows, axes.get(name, 0)) for name, array in feeds.items()}


def one_sample_shapes(feeds: Mapping[str, np.ndarray], axes: SampleAxes) -> dict[str, tuple[int, ...]]:
    """Each array's shape with one sample (per-sample costs such as BOPS are counted on it)."""
    return {name: tuple(array.shape) for name, array in take_samples(feeds, slice(0, 1), axes).items()}


def show_dims(dims: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _count(name: str, array: np.ndarray, axis: int) -> int:
    if array.ndim <= axis:
        raise ValueError(
            f"{name!r} has shape {array.shape}, but holds its samples on axis {axis}: give an array "
            f"of rank at least {axis + 1}"
        )
    return int(array.shape[axis])


def _take(array: np.ndarray, rows: slice | np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None:
        return array
    if axis == 0:
        return array[rows]  # as before there were sample axes: a slice stays a view
    if isinstance(rows, slice):
        return array[(slice(None),) * axis + (rows,)]
    return np.take(array, rows, axis=axis)


def _declared_dims(model: onnx.ModelProto) -> dict[str, list[int | None] | None]:
    """Each fed graph input (old exporters also list initializers as inputs) and its declared dims."""
    constants = {init.name for init in model.graph.initializer}
    return {value.name: static_dims(value) for value in model.graph.input if value.name not in constants}


def _has_fixed_batch(declared: Mapping[str, list[int | None] | None]) -> bool:
    """Whether every non-scalar input's dim 0 is the same fixed N (then axis 0 is the batch)."""
    return common_fixed_dim([_dim(dims, 0) for dims in declared.values() if dims != []]) is not None


def _inferred_axis(dims: list[int | None] | None, fixed_batch: bool) -> int | None:
    if dims == []:
        return None  # rank 0: one value for every sample
    if dims is None or dims[0] is None or fixed_batch or None not in dims:
        return 0
    return dims.index(None)  # dim 0 is fixed while the batch is dynamic: the first dynamic dim holds it


def _dim(dims: list[int | None] | None, axis: int) -> int | None:
    return dims[axis] if dims is not None and axis < len(dims) else None
