"""Measured latency in real onnxruntime sessions (figures are never asserted against targets)."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from planner.candidates import Configuration
from planner.export import export_model
from planner.latency import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    compare_latency,
    gpu_description,
    measure_latency,
    median_interval,
)
from sensitivity.examples import DigitsCNN, export_onnx, load_digits
from sensitivity.layers import find_layers
from tests.models import matmul_chain_model

pytestmark = pytest.mark.slow  # real latency measurements, repeated

HAS_CUDA = CUDA_PROVIDER in ort.get_available_providers() and gpu_description() != ""


@pytest.fixture(scope="module")
def models():
    """An untrained digits CNN, float and w8a8: latency needs real graphs, not trained weights."""
    torch.manual_seed(0)
    data = load_digits()
    proto = export_onnx(DigitsCNN(), torch.from_numpy(data.train_x[:1]))
    quantized = export_model(proto, Configuration.uniform(find_layers(proto), "w8a8"), {"input": data.train_x[:64]})
    return proto.SerializeToString(), quantized.model_bytes, {"input": data.test_x}


@pytest.mark.parametrize("which", [0, 1])
def test_cpu_measurement_is_complete(models, which):
    model_bytes, inputs = models[which], models[2]
    result = measure_latency(model_bytes, inputs, device="cpu", warmup=2, repeats=10, batch_size=16, threads=1)
    assert result.provider == CPU_PROVIDER
    assert 0 < result.p50_ms <= result.p90_ms and result.mean_ms > 0
    assert (result.batch_size, result.repeats) == (16, 10)
    assert result.onnxruntime_version == ort.__version__
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        model_name = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    assert model_name in result.device_description


def test_batch_larger_than_the_inputs_is_tiled(models):
    model_bytes, _, inputs = models
    few = {"input": inputs["input"][:3]}
    result = measure_latency(model_bytes, few, device="auto", warmup=0, repeats=2, batch_size=8)
    assert result.batch_size == 8
    assert result.provider == (CUDA_PROVIDER if HAS_CUDA else CPU_PROVIDER)


def test_bad_arguments_are_named(models):
    model_bytes, _, inputs = models
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        measure_latency(model_bytes, inputs, device="tpu")
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(model_bytes, inputs, repeats=0)
    with pytest.raises(ValueError, match="batch_size"):
        measure_latency(model_bytes, inputs, batch_size=0)
    with pytest.raises(ValueError, match=r"missing \['input'\]"):
        measure_latency(model_bytes, {"images": inputs["input"]})
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="no usable CUDA provider"):
            measure_latency(model_bytes, inputs, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime's CUDA provider and a GPU")
def test_cuda_measurement(models):
    model_bytes, _, inputs = models
    result = measure_latency(model_bytes, inputs, device="cuda", warmup=2, repeats=10, batch_size=16)
    assert result.provider == CUDA_PROVIDER and result.device_description == gpu_description()


# ---------------------------------------------------------------- compare_latency: interleaved, relative


@pytest.fixture(scope="module")
def chains():
    """One MatMul step and 24 of them (the same graph, 24x the work), with 64 samples of x."""
    inputs = {"x": np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)}
    return matmul_chain_model(1).SerializeToString(), matmul_chain_model(24).SerializeToString(), inputs


def test_a_model_against_itself_is_about_one(chains):
    light, _, inputs = chains
    (result,) = compare_latency([light], light, inputs, device="cpu", batch_size=8, threads=1, warmup=5, max_rounds=30)
    # The median of the rounds' ratios; its 90 % interval is the spread (wider on a busy machine).
    assert abs(result.ratio - 1.0) <= max(2 * result.ratio_spread, 0.15)
    assert 0 <= result.ratio_spread < 0.5
    assert 5 <= result.rounds <= 30
    assert result.measurement.repeats == 5 * result.rounds and result.measurement.batch_size == 8
    assert result.measurement.provider == CPU_PROVIDER and result.reference_p50_ms > 0


def test_more_work_has_a_larger_ratio_and_each_model_its_own(chains):
    light, heavy, inputs = chains
    same, slower = compare_latency(
        [light, heavy], light, inputs, device="cpu", batch_size=8, threads=1, warmup=2, max_rounds=10
    )
    # 24x the MatMuls: an order of magnitude that holds under any load, compared within one run.
    assert slower.ratio > 3 and slower.ratio > same.ratio + slower.ratio_spread
    assert slower.measurement.p50_ms > same.measurement.p50_ms
    assert slower.rounds == same.rounds  # rounds run for every model until all are stable
    # The reference's median is one figure of the run, shared by all.
    assert slower.reference_p50_ms == same.reference_p50_ms


def test_rounds_stop_when_stable_and_at_max_rounds_otherwise(chains):
    light, heavy, inputs = chains
    (loose,) = compare_latency([heavy], light, inputs, device="cpu", warmup=0, min_rounds=3, target_spread=100.0)
    assert loose.rounds == 3
    (strict,) = compare_latency(
        [heavy], light, inputs, device="cpu", warmup=0, min_rounds=3, max_rounds=7, target_spread=1e-12
    )
    assert strict.rounds == 7 and strict.ratio_spread > 1e-12
    assert strict.measurement.repeats == 7 * 5


def test_median_interval_is_the_order_statistics_interval():
    values = list(range(1, 11))  # n = 10: P(B <= 1) = 11/1024 <= 5 %, P(B <= 2) = 56/1024 > 5 %
    assert median_interval(values) == (2.0, 9.0)
    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few for 90 %: the whole range
    # Coverage checked by simulation: the median of a symmetric distribution (0) is inside >= 90 %.
    rng = np.random.default_rng(0)
    inside = [low <= 0 <= high for low, high in (median_interval(rng.standard_normal(20)) for _ in range(2000))]
    assert 0.9 <= np.mean(inside) <= 0.97


def test_compare_bad_arguments_are_named(chains):
    light, heavy, inputs = chains
    with pytest.raises(ValueError, match="models is empty"):
        compare_latency([], light, inputs)
    with pytest.raises(ValueError, match="sequence of serialized ONNX models"):
        compare_latency(heavy, light, inputs)
    with pytest.raises(ValueError, match=r"models\[1\] must be"):
        compare_latency([heavy, "model.onnx"], light, inputs)
    with pytest.raises(ValueError, match="reference must be"):
        compare_latency([heavy], b"", inputs)
    with pytest.raises(ValueError, match="min_rounds must be >= 2"):
        compare_latency([heavy], light, inputs, min_rounds=1)
    with pytest.raises(ValueError, match="max_rounds must be >= min_rounds"):
        compare_latency([heavy], light, inputs, min_rounds=6, max_rounds=5)
    with pytest.raises(ValueError, match="runs per model"):
        compare_latency([heavy], light, inputs, max_rounds=50_000, runs_per_round=5)
    with pytest.raises(ValueError, match="target_spread"):
        compare_latency([heavy], light, inputs, target_spread=float("nan"))
    with pytest.raises(ValueError, match="repeats"):
        compare_latency([heavy], light, inputs, runs_per_round=0)
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        compare_latency([heavy], light, inputs, device="tpu")
    with pytest.raises(ValueError, match=r"missing \['x'\]"):
        compare_latency([heavy], light, {"input": inputs["x"]})
