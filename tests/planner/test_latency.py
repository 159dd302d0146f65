"""Measured latency in real onnxruntime sessions (figures are never asserted against targets)."""

import onnxruntime as ort
import pytest
import torch

from planner.candidates import Configuration
from planner.export import export_model
from planner.latency import CPU_PROVIDER, CUDA_PROVIDER, gpu_description, measure_latency
from sensitivity.examples import DigitsCNN, export_onnx, load_digits
from sensitivity.layers import find_layers

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
