"""Real pretrained models that need LSTM and If: the interpreter against onnxruntime.

The models ship inside pip packages (the zoo extra installs them): ddddocr's ``common.onnx``
(CNN + bidirectional LSTM, opset 12) and silero-vad's ``silero_vad.onnx`` (If on the sample
rate around conv + LSTM branches, opset 16) and ``silero_vad_16k_op15.onnx``. Each test is
skipped when its package is not installed. The files are found with ``importlib.util.find_spec``,
which locates a package without importing it (``import ddddocr`` needs OpenCV, which the
interpreter has no use for).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sensitivity.onnx_program import load_onnx
from tests.zoo.models import resource_or_skip

pytestmark = pytest.mark.zoo

RTOL = 1e-4  # norm-relative, per output (as the op parity tests; silero's tiny probabilities measure ~2e-5)
ATOL = 1e-4


def _assert_close(actual: list[torch.Tensor], expected: list[np.ndarray]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        got = a.detach().numpy().astype(np.float64)
        assert got.shape == e.shape
        difference = np.abs(got - e)
        assert float(difference.max()) < ATOL, float(difference.max())
        assert float(np.linalg.norm(difference) / np.linalg.norm(e)) < RTOL


def test_ddddocr_common_matches_onnxruntime() -> None:
    path = resource_or_skip("ddddocr", "common.onnx")
    program = load_onnx(path)
    image = np.random.default_rng(0).random((1, 1, 64, 96), dtype=np.float32)  # width is dynamic
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input1": image})
    actual = program.forward(program.layer_weights, {"input1": torch.from_numpy(image)})
    _assert_close(actual, expected)
    assert {layer.op_type for layer in program.layers} >= {"Conv", "LSTM"}  # W and R are layers


@pytest.mark.parametrize("name", ["silero_vad.onnx", "silero_vad_16k_op15.onnx"])
@pytest.mark.parametrize("rate, chunk", [(16000, 512), (8000, 256)])
def test_silero_vad_streams_like_onnxruntime(name: str, rate: int, chunk: int) -> None:
    """Three chunks in a row, each run's state fed to the next (how the model is used)."""
    path = resource_or_skip("silero_vad", "data", name)
    program = load_onnx(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    state = np.zeros((2, 2, 128), np.float32)
    ours = torch.from_numpy(state)
    for _ in range(3):
        audio = (rng.standard_normal((2, chunk)) * 0.1).astype(np.float32)
        expected = session.run(None, {"input": audio, "state": state, "sr": np.array(rate, np.int64)})
        actual = program.forward(
            program.layer_weights, {"input": torch.from_numpy(audio), "state": ours, "sr": torch.tensor(rate)}
        )
        _assert_close(actual, expected)
        state, ours = expected[1], actual[1]


@pytest.mark.slow  # ~7 s: two second-order passes through the real model
def test_silero_vad_hvp_methods_agree() -> None:
    """Second order through the run-time If and the LSTM of a real model: double backward and
    forward-over-reverse give the same Hessian-vector product over its layers."""
    path = resource_or_skip("silero_vad", "data", "silero_vad_16k_op15.onnx")
    program = load_onnx(path)
    names = [layer.name for layer in program.layers]
    generator = torch.Generator().manual_seed(2)
    inputs = {
        "input": torch.randn(1, 512, generator=generator) * 0.1,
        "state": torch.zeros(2, 1, 128),
        "sr": torch.tensor(16000),
    }

    def loss(weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
        probability, state = program.forward(dict(zip(names, weights)), inputs)
        return (probability**2).sum() + (state**2).sum()

    point = tuple(program.layer_weights[name] for name in names)
    probe = tuple(torch.randn(w.shape, generator=generator) for w in point)
    forward = torch.func.jvp(torch.func.grad(loss), (point,), (probe,))[1]
    leaves = tuple(w.clone().requires_grad_() for w in point)
    gradient = torch.autograd.grad(loss(leaves), leaves, create_graph=True)
    backward = torch.autograd.grad(torch.stack([(g * v).sum() for g, v in zip(gradient, probe)]).sum(), leaves)
    for f, b in zip(forward, backward):
        assert float((f - b).norm() / b.norm().clamp_min(1e-12)) < 1e-4


def test_ddddocr_fixed_batch_of_1_takes_a_calibration_set_of_3() -> None:
    """The review's case: a model exported with batch 1 refused any larger calibration set
    (onnxruntime enforces the 1); every stage now runs it in batches of exactly 1."""
    from planner.export import check_inputs, validate_artifact
    from planner.latency import measure_latency
    from sensitivity.results import TraceConfig
    from sensitivity.run import compute_sensitivity

    path = resource_or_skip("ddddocr", "common.onnx")
    model_bytes = path.read_bytes()
    feeds = {"input1": np.random.default_rng(0).random((3, 1, 64, 64), dtype=np.float32)}
    assert check_inputs(onnx.load_from_string(model_bytes), feeds).keys() == {"input1"}
    validate_artifact(model_bytes, feeds, batch_size=64)  # runs onnxruntime on 3 batches of 1
    assert measure_latency(model_bytes, feeds, device="cpu", warmup=1, repeats=2, batch_size=8).batch_size == 1
    program = load_onnx(path)
    assert program.fixed_batch_size == 1
    config = TraceConfig(seed=0, min_probes=2, max_probes=2, batch_size=256, device="cpu")
    result = compute_sensitivity(program, feeds, config)
    assert result.traces is not None
    assert result.num_samples == 3 and all(np.isfinite(t.trace) for t in result.traces)
