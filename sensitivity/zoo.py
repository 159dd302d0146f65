"""Small torch architectures to export to ONNX: test material for the ONNX interpreter.

They cover the op patterns real exports contain (attention written out with MatMul,
Reshape, Transpose and Softmax; LayerNorm and GELU, decomposed before opsets 17/20;
depthwise convolutions, HardSwish, pooling, ConvTranspose, Resize, Concat, Pad, Sigmoid)
while staying tiny enough to export and run in milliseconds. Nothing is downloaded.
``TinyTokenTransformer`` adds an embedding over int64 token ids, trained in seconds on a
seeded synthetic task (``trained_tiny_transformer``), for the sensitivity benchmarks.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn

from sensitivity.examples import DigitsCNN, DigitsMLP, export_onnx, torchscript_export, train


class TinyTransformerBlock(nn.Module):
    """A pre-norm encoder block on [batch, tokens, dim]: self-attention and a GELU MLP."""

    def __init__(self, dim: int = 16, heads: int = 2, hidden: int = 32) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        return x.reshape(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        h = self.norm1(x)
        q, k, v = (self._split_heads(f(h)) for f in (self.query, self.key, self.value))
        scores = q @ k.transpose(-2, -1) / math.sqrt(dim // self.heads)
        attended = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(batch, tokens, dim)
        x = x + self.proj(attended)
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class TinyTokenTransformer(nn.Module):
    """Token ids [batch, tokens] (int64) -> class logits [batch, classes].

    An embedding table (exported as a Gather) plus learned positions, one
    ``TinyTransformerBlock`` (attention as MatMul/Softmax, LayerNorm, GELU MLP), a final
    LayerNorm, mean pooling over tokens and a linear head.

    Not in ``ZOO``: its input is integer token ids, not the float tensors the ZOO models
    take; ``trained_tiny_transformer`` and ``export_tiny_transformer`` are its builders.
    """

    def __init__(
        self, vocab: int = 16, tokens: int = 8, dim: int = 16, heads: int = 2, hidden: int = 32, classes: int = 4
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(0.1 * torch.randn(tokens, dim))
        self.block = TinyTransformerBlock(dim, heads, hidden)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.block(self.embedding(ids) + self.position)
        return self.head(self.norm(x).mean(dim=1))


@dataclass(frozen=True)
class TokenTask:
    """A synthetic sequence-classification task: which token group is the most frequent.

    Token t belongs to group t % classes; the label is the group with the most tokens in
    the sequence (ties to the lowest group). Arrays as ``Digits``: ids int64 [N, tokens].
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def token_task(
    samples: int = 3072, vocab: int = 16, tokens: int = 8, classes: int = 4, test_fraction: float = 0.25, seed: int = 0
) -> TokenTask:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(samples, tokens), dtype=np.int64)
    counts = np.stack([(ids % classes == group).sum(axis=1) for group in range(classes)], axis=1)
    labels = counts.argmax(axis=1).astype(np.int64)
    split = int(samples * (1.0 - test_fraction))
    return TokenTask(ids[:split], labels[:split], ids[split:], labels[split:])


@dataclass(frozen=True)
class TokenTaskSpec:
    """The shape of a ``token_task``, the model that fits it and the epochs to train it."""

    samples: int = 3072
    vocab: int = 16
    tokens: int = 8
    classes: int = 4
    epochs: int = 6

    def task(self, seed: int = 0, samples: int | None = None, test_fraction: float = 0.25) -> TokenTask:
        """This task's data; ``samples`` overrides the count (fresh evaluation sets)."""
        return token_task(samples or self.samples, self.vocab, self.tokens, self.classes, test_fraction, seed)


# Eight groups over sixteen tokens: majorities are narrower, so 4-bit weights cost accuracy where
# the default task loses ~0.1 pp: 1.3-2.2 pp with the block and head at 4 bits (seeds 0-2), 4.5 pp
# with the embedding too (seed 0). Quantized allocations can then be told apart by accuracy, not
# only by their loss (bench/planner.py). ~6 s on one core, ~98 %.
HARD_TOKEN_TASK = TokenTaskSpec(samples=8192, vocab=32, tokens=16, classes=8, epochs=20)


def trained_tiny_transformer(
    seed: int = 0, spec: TokenTaskSpec = TokenTaskSpec()
) -> tuple[TinyTokenTransformer, TokenTask]:
    """``TinyTokenTransformer`` trained with Adam on ``spec.task(seed)``. With the default spec:
    ~2 s on one core, ~99% test accuracy (the most frequent class is 34%)."""
    task = spec.task(seed)
    torch.manual_seed(seed)
    model = TinyTokenTransformer(spec.vocab, spec.tokens, classes=spec.classes)
    # ``train`` only reads the arrays of its data argument, so the token task stands in for digits.
    return train(model, task, epochs=spec.epochs, seed=seed), task


def export_tiny_transformer(model: TinyTokenTransformer, opset: int = 17) -> onnx.ModelProto:
    """ONNX export with input ``input`` (int64 ids, dynamic batch) and output ``logits``;
    MatMul weights are named after their modules (``block.query.weight``, stored [in, out])."""
    tokens = model.position.shape[0]
    with warnings.catch_warnings():
        # The tracer warns that the attention scale becomes a constant: it is (fixed head size).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        return export_onnx(model, torch.zeros(2, tokens, dtype=torch.int64), opset=opset)


class TinyMobileUNet(nn.Module):
    """An encoder-decoder on [batch, 3, 16, 16] -> [batch, 2, 32, 32].

    Strided stem, depthwise + pointwise block with HardSwish, average pooling, nearest
    upsampling with a skip Concat, reflect Pad, a Sigmoid channel gate, ConvTranspose and
    bilinear upsampling.
    """

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.depthwise = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.pointwise = nn.Conv2d(width, 2 * width, 1)
        self.pool = nn.AvgPool2d(2)
        self.middle = nn.Conv2d(2 * width, width, 3, padding=1)
        self.up_nearest = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse = nn.Conv2d(2 * width, width, 3)  # after a reflect pad of 1
        self.gate = nn.Conv2d(width, width, 1)
        self.deconv = nn.ConvTranspose2d(width, width // 2, 2, stride=2)
        self.up_linear = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.head = nn.Conv2d(width // 2, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = nn.functional.hardswish(self.stem(x))  # 8x8
        x = nn.functional.hardswish(self.pointwise(self.depthwise(skip)))
        x = torch.relu(self.middle(self.pool(x)))  # 4x4
        x = torch.cat([self.up_nearest(x), skip], dim=1)  # 8x8
        x = self.fuse(nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"))
        x = x * torch.sigmoid(self.gate(x.mean(dim=(2, 3), keepdim=True)))
        x = self.deconv(x)  # 16x16
        return self.head(self.up_linear(x))  # 32x32


@dataclass(frozen=True)
class ZooModel:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # with batch 2; the export's example batch


ZOO: dict[str, ZooModel] = {
    "digits_cnn": ZooModel("digits_cnn", DigitsCNN, (2, 1, 8, 8)),
    "digits_mlp": ZooModel("digits_mlp", DigitsMLP, (2, 1, 8, 8)),
    "transformer_block": ZooModel("transformer_block", TinyTransformerBlock, (2, 5, 16)),
    "mobile_unet": ZooModel("mobile_unet", TinyMobileUNet, (2, 3, 16, 16)),
}


def build(name: str, seed: int = 0) -> nn.Module:
    """A freshly initialized zoo model in eval mode; BatchNorm statistics are randomized so
    that folding them into the convolutions is exercised."""
    torch.manual_seed(seed)
    model = ZOO[name].build().eval()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            mean, var = module.running_mean, module.running_var
            if mean is not None and var is not None:  # None without track_running_stats
                mean.uniform_(-0.5, 0.5)
                var.uniform_(0.5, 2.0)
    return model


def export(model: nn.Module, example: torch.Tensor, opset: int = 17, dynamo: bool = False) -> onnx.ModelProto:
    """Export with a dynamic batch axis, graph input ``input`` and output ``output``.

    ``dynamo=False`` uses the TorchScript exporter with constant folding; ``dynamo=True``
    uses ``torch.export`` with onnxscript (opset 18 or later). Initializers keep the
    exporter's names (parameter names, or ``onnx::...`` for folded/transposed weights).
    """
    if not dynamo:
        exported = torchscript_export(
            model.eval(),
            (example,),
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
        )
        return onnx.load_from_string(exported)
    program = torch.onnx.export(
        model.eval(),
        (example,),
        dynamo=True,
        input_names=["input"],
        output_names=["output"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
        opset_version=opset,
        verbose=False,
    )
    assert program is not None  # the dynamo exporter always returns its program
    buffer = io.BytesIO()
    onnx.save(program.model_proto, buffer)
    return onnx.load_from_string(buffer.getvalue())
