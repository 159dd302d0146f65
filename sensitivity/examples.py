"""Small real models and data for tests, benchmarks and the demo (nothing is downloaded).

The data is scikit-learn's digits set (8x8 images, 10 classes, shipped inside the package).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import onnx
import torch
from torch import nn


@dataclass(frozen=True)
class Digits:
    train_x: np.ndarray  # float32 [N, 1, 8, 8], scaled to [0, 1]
    train_y: np.ndarray  # int64 [N]
    test_x: np.ndarray
    test_y: np.ndarray


def load_digits(test_fraction: float = 0.25, seed: int = 0, fold: int = 0) -> Digits:
    """The 1797 scikit-learn digits, shuffled by ``seed``. ``fold`` k holds out the k-th block of
    the shuffled order counted from its end (fold 0: the last ``test_fraction``), so folds
    0..⌈1/test_fraction⌉−1 hold out (almost) disjoint test sets: cross-validation."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    split = int(len(labels) * (1.0 - test_fraction))
    order = np.roll(np.random.default_rng(seed).permutation(len(labels)), fold * (len(labels) - split))
    train, test = order[:split], order[split:]
    return Digits(images[train], labels[train], images[test], labels[test])


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU x2, pooling, two Gemms: about 20k parameters, ~97% test accuracy."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(2 * width * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        x = torch.relu(self.fc1(x))
        x = torch.tanh(self.fc2(x))
        return self.fc3(x)


class TrainingData(Protocol):
    """What ``train`` reads: ``Digits``, or any task with the same training arrays."""

    @property
    def train_x(self) -> np.ndarray: ...

    @property
    def train_y(self) -> np.ndarray: ...


AnyModule = TypeVar("AnyModule", bound=nn.Module)


def train(model: AnyModule, digits: TrainingData, epochs: int = 8, seed: int = 0, lr: float = 3e-3) -> AnyModule:
    """Adam on the training split; a few seconds on a CPU."""
    torch.manual_seed(seed)
    x = torch.from_numpy(digits.train_x)
    y = torch.from_numpy(digits.train_y)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        predicted = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((predicted == y).mean())


def torchscript_export(model: nn.Module, args: tuple[Any, ...], **options: Any) -> bytes:
    """The serialized ONNX model of torch's TorchScript exporter (``dynamo=False``), written to
    memory; ``options`` go to ``torch.onnx.export`` (names, dynamic axes, opset, ...)."""
    buffer = io.BytesIO()
    # torch annotates ``f`` as a path, but this exporter writes to any file-like object
    torch.onnx.export(model, args, buffer, dynamo=False, **options)  # type: ignore[arg-type]
    return buffer.getvalue()


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    opset: int = 17,
    input_name: str = "input",
    output_name: str = "logits",
) -> onnx.ModelProto:
    """TorchScript-based export with a dynamic batch axis; initializers keep parameter names."""
    exported = torchscript_export(
        model.eval(),
        (example,),
        input_names=[input_name],
        output_names=[output_name],
        dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
        opset_version=opset,
        do_constant_folding=True,
    )
    model_proto = onnx.load_from_string(exported)
    _name_folded_weights(model_proto)
    return model_proto


def _name_folded_weights(model: onnx.ModelProto) -> None:
    """BatchNorm folding leaves weights named ``onnx::Conv_31``; name them after their module."""
    from sensitivity.layers import QUANTIZABLE_OPS, weight_index

    initializers = {init.name for init in model.graph.initializer}
    taken = set(initializers)
    renames: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in QUANTIZABLE_OPS or weight_index(node.op_type) != 1 or not node.name.startswith("/"):
            continue
        if len(node.input) < 2 or not node.input[1].startswith("onnx::") or node.input[1] not in initializers:
            continue
        new_name = ".".join(node.name.strip("/").split("/")[:-1]) + ".weight"
        if new_name not in taken and node.input[1] not in renames:
            renames[node.input[1]] = new_name
            taken.add(new_name)
    for init in model.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in model.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]


def trained_digits_cnn(seed: int = 0, epochs: int = 8, fold: int = 0) -> tuple[DigitsCNN, Digits]:
    digits = load_digits(seed=seed, fold=fold)
    torch.manual_seed(seed)
    return train(DigitsCNN(), digits, epochs=epochs, seed=seed), digits
