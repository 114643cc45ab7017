"""Calibration and evaluation data sources on the real corpus, and their error lines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from periphery_core.errors import DataError
from periphery_core.model.shapes import InputSpec, resolve_input_shapes
from periphery_core.quantize.sources import StsbSource, open_source, spec_for, spec_path
from periphery_core.runtime.session import SessionConfig, make_session
from tests.conftest import MODELS, SHARED_DATA, require_shared

DATASETS = SHARED_DATA / "datasets"
MNIST_IMAGES = DATASETS / "mnist" / "t10k-images-idx3-ubyte.gz"
MNIST_LABELS = DATASETS / "mnist" / "t10k-labels-idx1-ubyte.gz"
MINILM = MODELS / "all-MiniLM-L6-v2"
TOKENIZER = MINILM / "tokenizer.json"

MNIST_INPUT = InputSpec("Input3", np.dtype(np.float32), (1, 1, 28, 28))
IMAGE_INPUT = InputSpec("images", np.dtype(np.float32), (1, 3, 224, 224))
TEXT_INPUTS = [InputSpec(n, np.dtype(np.int64), (1, 1))
               for n in ("input_ids", "attention_mask", "token_type_ids")]


def inputs_of(path: Path) -> list[InputSpec]:
    return resolve_input_shapes(onnx.load(str(path), load_external_data=False))[0]


@pytest.fixture(scope="module")
def shared() -> None:
    require_shared()


# --------------------------------------------------------------------------------------------
# random


def test_random_source_is_seeded_and_batch_independent() -> None:
    source = open_source("random", [*TEXT_INPUTS, MNIST_INPUT], seed=3)
    assert len(source) == 32 and source.labels() is None
    one = list(source.batches(1))
    four = list(source.batches(4))
    assert len(one) == 32 and len(four) == 8
    assert four[0]["Input3"].shape == (4, 1, 28, 28)
    assert four[0]["input_ids"].dtype == np.int64
    np.testing.assert_array_equal(four[1]["Input3"][2], one[6]["Input3"][0])
    again = next(open_source("random", [*TEXT_INPUTS, MNIST_INPUT], seed=3,
                             samples=2).batches(2))
    np.testing.assert_array_equal(again["Input3"], four[0]["Input3"][:2])
    assert len(open_source("random", [MNIST_INPUT], samples=5)) == 5


# --------------------------------------------------------------------------------------------
# npz / npy


def test_npz_folder_with_and_without_batch_dim_and_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(5):
        shape = (1, 1, 28, 28) if i % 2 else (1, 28, 28)
        np.savez(tmp_path / f"s{i}.npz", Input3=rng.random(shape, dtype=np.float32))
    np.save(tmp_path / "labels.npy", np.arange(5))
    source = open_source(f"npz:{tmp_path}", [MNIST_INPUT])
    batches = list(source.batches(2))
    assert [b["Input3"].shape for b in batches] == [(2, 1, 28, 28)] * 2 + [(1, 1, 28, 28)]
    np.testing.assert_array_equal(source.labels(), np.arange(5))
    limited = open_source(f"npz:{tmp_path}", [MNIST_INPUT], samples=3)
    assert len(limited) == 3
    np.testing.assert_array_equal(limited.labels(), np.arange(3))


def test_npy_folder_runs_mnist(shared: None, tmp_path: Path) -> None:
    for i in range(3):
        np.save(tmp_path / f"{i}.npy", np.zeros((1, 28, 28), np.float32))
    model = MODELS / "mnist-8.onnx"
    source = open_source(f"npy:{tmp_path}", inputs_of(model))
    sess = make_session(model, SessionConfig())
    outputs = [sess.run(None, feeds)[0] for feeds in source.batches(1)]
    assert len(outputs) == 3 and outputs[0].shape == (1, 10)


# --------------------------------------------------------------------------------------------
# images


def test_images_nchw_from_the_model_shape(shared: None) -> None:
    model = MODELS / "light_squeezenet_randw.onnx"
    inputs = inputs_of(model)
    source = open_source(f"images:{DATASETS / 'images'}?mean=0.485,0.456,0.406"
                         "&std=0.229,0.224,0.225", inputs)
    assert len(source) == 5 and source.labels() is None
    batch = next(source.batches(2))
    assert batch[inputs[0].name].shape == (2, 3, 224, 224)
    assert batch[inputs[0].name].dtype == np.float32
    out = make_session(model, SessionConfig()).run(None, next(source.batches(1)))
    assert np.all(np.isfinite(out[0]))


def test_images_nhwc_gray_scale_and_labels(shared: None, tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("RGB", (40, 20), (0, 0, 255)).save(tmp_path / "blue.png")
    (tmp_path / "labels.txt").write_text("red.png\t1\nblue.png\t0\n")
    nhwc = InputSpec("x", np.dtype(np.float32), (1, 8, 16, 3))
    source = open_source(f"images:{tmp_path}?layout=nhwc&scale=1", [nhwc])
    batch = next(source.batches(2))["x"]
    assert batch.shape == (2, 8, 16, 3)
    # Name order: blue.png, red.png.
    np.testing.assert_allclose(batch[0, 0, 0], [0, 0, 255])
    np.testing.assert_allclose(batch[1, 0, 0], [255, 0, 0])
    np.testing.assert_array_equal(source.labels(), [0, 1])
    gray = InputSpec("x", np.dtype(np.float32), (1, 1, 5, 5))
    g = next(open_source(f"images:{tmp_path}?size=10x12&gray=1", [gray]).batches(1))["x"]
    assert g.shape == (1, 1, 10, 12) and 0 < g.max() < 1


def test_images_real_photo_values(shared: None) -> None:
    spec = InputSpec("x", np.dtype(np.float32), (1, 3, 224, 224))
    raw = next(open_source(f"images:{DATASETS / 'images'}", [spec]).batches(1))["x"]
    norm = next(open_source(f"images:{DATASETS / 'images'}?mean=0.5&std=0.25",
                            [spec]).batches(1))["x"]
    assert raw.min() >= 0 and raw.max() <= 1 and raw.std() > 0.05
    np.testing.assert_allclose(norm, (raw - 0.5) / 0.25, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# mnist


def test_mnist_range_labels_and_scaling(shared: None) -> None:
    source = open_source(f"mnist:{MNIST_IMAGES}?range=200:10000", [MNIST_INPUT])
    assert len(source) == 9800
    labels = source.labels()
    assert labels is not None and len(labels) == 9800
    full = open_source(f"mnist:{MNIST_IMAGES}?labels={MNIST_LABELS}", [MNIST_INPUT])
    assert len(full) == 10000
    full_labels = full.labels()
    assert full_labels is not None
    np.testing.assert_array_equal(labels, full_labels[200:])
    assert full_labels[:5].tolist() == [7, 2, 1, 0, 4]  # the MNIST test set's first digits
    first = next(source.batches(1))["Input3"]
    assert first.shape == (1, 1, 28, 28) and first.dtype == np.float32
    assert first.min() == 0 and first.max() == 1  # default scale 255: pixels in [0, 1]
    raw = next(open_source(f"mnist:{MNIST_IMAGES}?range=200:201&scale=1",
                           [MNIST_INPUT]).batches(1))["Input3"]
    np.testing.assert_allclose(raw, first * 255, rtol=1e-6)
    flat = InputSpec("x", np.dtype(np.float32), (1, 784))
    assert next(open_source(f"mnist:{MNIST_IMAGES}", [flat],
                            samples=3).batches(3))["x"].shape == (3, 784)


# --------------------------------------------------------------------------------------------
# text and STS-B


def test_text_matches_minilm_inputs_and_runs(shared: None, tmp_path: Path) -> None:
    model = MINILM / "model.onnx"
    inputs = inputs_of(model)
    text = tmp_path / "sentences.txt"
    text.write_text("A cat sits on the mat.\n\nHello!\n" + "word " * 300 + "\n")
    source = open_source(f"text:{text}?tokenizer={TOKENIZER}&max_length=64", inputs)
    assert len(source) == 3 and source.labels() is None
    batches = list(source.batches(2))
    assert set(batches[0]) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(a.dtype == np.int64 for a in batches[0].values())
    # Padded to the longest in the batch; the long line truncated to max_length.
    assert batches[0]["input_ids"].shape == (2, 9)
    assert batches[0]["attention_mask"][1].tolist() == [1, 1, 1, 1] + [0] * 5
    assert batches[1]["input_ids"].shape == (1, 64)
    sess = make_session(model, SessionConfig(exact=False))
    hidden = sess.run(None, batches[0])[0]
    assert hidden.shape == (2, 9, 384)


def test_text_only_the_inputs_the_model_has(shared: None, tmp_path: Path) -> None:
    text = tmp_path / "s.txt"
    text.write_text("one\n")
    inputs = [InputSpec("input_ids", np.dtype(np.int32), (1, 1))]
    # A relative tokenizer path resolves beside the data file.
    (tmp_path / "tok.json").write_bytes(TOKENIZER.read_bytes())
    feeds = next(open_source(f"text:{text}?tokenizer=tok.json&padding=max_length&max_length=8",
                             inputs).batches(1))
    assert list(feeds) == ["input_ids"] and feeds["input_ids"].dtype == np.int32
    assert feeds["input_ids"].shape == (1, 8)


def test_stsb_pairs_and_gold_scores(shared: None) -> None:
    source = open_source(f"stsb:{DATASETS / 'stsb' / 'sts-test.tsv'}?tokenizer={TOKENIZER}",
                         inputs_of(MINILM / "model.onnx"))
    assert isinstance(source, StsbSource)
    assert source.pair_count == 1379 and len(source) == 2 * 1379
    gold = source.labels()
    assert gold is not None and gold[:3].tolist() == [2.5, 3.6, 5.0]
    first, second = next(source.pairs(4))
    assert first["input_ids"].shape[0] == second["input_ids"].shape[0] == 4
    interleaved = next(source.batches(2))
    np.testing.assert_array_equal(interleaved["input_ids"][0, :9], first["input_ids"][0, :9])
    np.testing.assert_array_equal(interleaved["input_ids"][1][interleaved["attention_mask"][1]
                                                               == 1],
                                  second["input_ids"][0][second["attention_mask"][0] == 1])
    assert open_source(f"stsb:{DATASETS / 'stsb' / 'sts-test.tsv'}?tokenizer={TOKENIZER}",
                       inputs_of(MINILM / "model.onnx"), samples=10).pair_count == 10


# --------------------------------------------------------------------------------------------
# Errors


def _bad_npz_rank(folder: Path) -> str:
    np.savez(folder / "a.npz", Input3=np.zeros((28, 28), np.float32))
    return f"npz:{folder}"


def _bad_npz_dtype(folder: Path) -> str:
    np.savez(folder / "a.npz", Input3=np.zeros((1, 1, 28, 28), np.float64))
    return f"npz:{folder}"


def _bad_npz_name(folder: Path) -> str:
    np.savez(folder / "a.npz", image=np.zeros((1, 1, 28, 28), np.float32))
    return f"npz:{folder}"


def _many_samples_in_one_file(folder: Path) -> str:
    np.savez(folder / "a.npz", Input3=np.zeros((4, 1, 28, 28), np.float32))
    return f"npz:{folder}"


def _bad_labels(folder: Path) -> str:
    np.savez(folder / "a.npz", Input3=np.zeros((1, 1, 28, 28), np.float32))
    np.save(folder / "labels.npy", np.arange(3))
    return f"npz:{folder}"


def _not_a_picture(folder: Path) -> str:
    (folder / "x.jpg").write_text("not a jpeg")
    return f"images:{folder}"


ERRORS = [
    ("unknown scheme", lambda d: f"csv:{d}", "unknown data scheme 'csv'"),
    ("no scheme", lambda d: str(d), "has no scheme"),
    ("missing folder", lambda d: f"npz:{d / 'nope'}", "data folder not found"),
    ("file for folder", lambda d: f"npy:{MNIST_IMAGES}", "needs a folder"),
    ("npz file not npz", lambda d: f"npz:{MNIST_IMAGES}", "is not a .npz archive"),
    ("missing file", lambda d: f"mnist:{d / 'nope.gz'}", "data file not found"),
    ("empty npz folder", lambda d: f"npz:{d}", "holds no .npz files"),
    ("empty image folder", lambda d: f"images:{d}", "holds no .jpg or .png"),
    ("npz wrong rank", _bad_npz_rank, "has rank 2; the model expects rank 4"),
    ("npz wrong dtype", _bad_npz_dtype, "is float64; the model expects float32"),
    ("npz wrong name", _bad_npz_name, "has no array named 'Input3'"),
    ("npz batch of many", _many_samples_in_one_file, "holds 4 samples"),
    ("labels mismatch", _bad_labels, "one label per sample file"),
    ("not a picture", _not_a_picture, "is not a readable picture"),
    ("unknown option", lambda d: f"mnist:{MNIST_IMAGES}?sclae=1", "unknown option 'sclae'"),
    ("bad range", lambda d: f"mnist:{MNIST_IMAGES}?range=a:b", "range=a:b is not START:STOP"),
    ("range too far", lambda d: f"mnist:{MNIST_IMAGES}?range=0:20000", "STOP <= 10000"),
    ("bad scale", lambda d: f"mnist:{MNIST_IMAGES}?scale=x", "scale=x is not a number"),
    ("zero std", lambda d: f"mnist:{MNIST_IMAGES}?std=0", "std cannot be 0"),
    ("labels file as images", lambda d: f"mnist:{MNIST_LABELS}", "not images"),
    ("not idx", lambda d: f"mnist:{TOKENIZER}", "not an idx file"),
    ("bad option syntax", lambda d: f"mnist:{MNIST_IMAGES}?range", "is not KEY=VALUE"),
    ("random with a path", lambda d: f"random:{d}", "takes no path"),
]


@pytest.mark.parametrize(("spec_of", "expected"), [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])
def test_errors_are_one_clear_line(shared: None, tmp_path: Path, spec_of, expected) -> None:
    with pytest.raises(DataError) as info:
        open_source(spec_of(tmp_path), [MNIST_INPUT])
    assert expected in info.value.message
    assert "\n" not in info.value.message


IMAGE_ERRORS = [
    ("bad size", "?size=big", "is not HxW"),
    ("bad layout", "?layout=chw", "neither nchw nor nhwc"),
    ("bad gray", "?gray=yes", "must be 0 or 1"),
    ("gray on colour", "?gray=1", "has 3 channels"),
    ("mean count", "?mean=1,2", "mean has 2 values"),
    ("wrong layout", "?layout=nhwc", "has 224 channels in nhwc layout"),
]


@pytest.mark.parametrize(("query", "expected"), [e[1:] for e in IMAGE_ERRORS],
                         ids=[e[0] for e in IMAGE_ERRORS])
def test_image_option_errors(shared: None, query: str, expected: str) -> None:
    with pytest.raises(DataError, match=expected):
        open_source(f"images:{DATASETS / 'images'}{query}", [IMAGE_INPUT])


def test_text_errors(shared: None, tmp_path: Path) -> None:
    text = tmp_path / "s.txt"
    text.write_text("hello\n")
    with pytest.raises(DataError, match="needs a tokenizer"):
        open_source(f"text:{text}", TEXT_INPUTS)
    with pytest.raises(DataError, match="tokenizer file not found"):
        open_source(f"text:{text}?tokenizer=nope.json", TEXT_INPUTS)
    with pytest.raises(DataError, match="text data fills inputs named"):
        open_source(f"text:{text}?tokenizer={TOKENIZER}", [MNIST_INPUT])
    with pytest.raises(DataError, match="max_length must be positive"):
        open_source(f"text:{text}?tokenizer={TOKENIZER}&max_length=0", TEXT_INPUTS)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="holds no sentences"):
        open_source(f"text:{empty}?tokenizer={TOKENIZER}", TEXT_INPUTS)
    with pytest.raises(DataError, match="not an STS-B row"):
        open_source(f"stsb:{text}?tokenizer={TOKENIZER}", TEXT_INPUTS)


def test_source_arguments_errors() -> None:
    with pytest.raises(DataError, match="samples must be positive"):
        open_source("random", [MNIST_INPUT], samples=0)
    with pytest.raises(DataError, match="batch size must be positive"):
        next(open_source("random", [MNIST_INPUT]).batches(0))
    with pytest.raises(DataError, match="npy: works for single-input models"):
        open_source("npy:.", TEXT_INPUTS)


# --------------------------------------------------------------------------------------------
# from a path to its spec (what the app's file picker fills in)

def test_spec_for_names_the_source_that_reads_a_file_or_folder(shared: None,
                                                               tmp_path: Path) -> None:
    pictures, stsb = DATASETS / "images", DATASETS / "stsb"
    assert spec_for(MNIST_IMAGES) == f"mnist:{MNIST_IMAGES}"
    assert spec_for(stsb / "sts-dev.tsv") == f"stsb:{stsb / 'sts-dev.tsv'}"
    assert spec_for(stsb / "readme.txt") == f"text:{stsb / 'readme.txt'}"
    assert spec_for(pictures) == f"images:{pictures}"
    assert spec_for(pictures / "bus.jpg") == f"images:{pictures}"  # a sample names its folder
    assert spec_for(MODELS / "mnist-8.onnx") is None
    assert spec_for(tmp_path) is None  # an empty folder

    rng = np.random.default_rng(0)
    for i in range(2):
        np.savez(tmp_path / f"s{i}.npz", Input3=rng.random((1, 1, 28, 28), dtype=np.float32))
    for i in range(3):  # labels.npy is no sample: 2 .npy and 2 .npz, the first scheme wins
        np.save(tmp_path / ("labels.npy" if i == 0 else f"extra{i}.npy"), np.arange(2))
    assert spec_for(tmp_path) == f"npz:{tmp_path}"
    assert spec_for(tmp_path / "s0.npz") == f"npz:{tmp_path / 's0.npz'}"  # a source by itself
    for path in (tmp_path, tmp_path / "s0.npz", MNIST_IMAGES):
        spec = spec_for(path)
        assert spec is not None and spec_path(spec) == path
        assert len(open_source(spec, [MNIST_INPUT])) > 0
    assert spec_path("random") is None
    assert spec_path(f"{tmp_path / 's0.npz'}") == tmp_path / "s0.npz"  # a bare FILE.npz
