"""What a model says about its own dimensions, beyond its graph's symbolic names.

Exporters leave sizes symbolic that the model's files pin elsewhere:

- an ONNX Runtime GenAI folder's `genai_config.json` gives each KV-cache input's head count and
  head size (GroupQueryAttention refuses a cache whose last dimension is not the head size);
- a Hugging Face `config.json` beside the model gives the same for optimum-style exports;
- export metadata (`metadata_props`), such as Ultralytics' `imgsz`, gives an image size.

`declared_dims` turns these into values for the graph's symbolic dimension names, which
`shapes.resolve_input_shapes` uses before falling back to defaults. `model_file` finds the
model in a folder a user passes instead of a file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from periphery_core.errors import ModelLoadError
from periphery_core.model.shapes import dim_symbol, graph_inputs, is_fixed


@dataclass(frozen=True)
class DeclaredDims:
    """Symbolic dimension name (or `input:index` for an unnamed one) -> size, and where from."""

    dims: dict[str, int] = field(default_factory=dict)
    source: str = ""  # e.g. "genai_config.json"; empty when the model declares nothing
    # name -> the names it is the sum of: a GenAI decoder's total_sequence_length is
    # past_sequence_length + sequence_length.
    sums: dict[str, tuple[str, ...]] = field(default_factory=dict)


GENAI_CONFIG = "genai_config.json"
HF_CONFIG = "config.json"


def model_file(folder: Path) -> Path:
    """The model of a folder: the one `genai_config.json` names, else `model.onnx`, else the
    folder's only `.onnx` file.

    Raises:
        ModelLoadError: none or several candidates, said with what to pass instead.
    """
    config = folder / GENAI_CONFIG
    if config.is_file():
        name = read_json(config).get("model", {}).get("decoder", {}).get("filename", "")
        if isinstance(name, str) and name and (folder / name).is_file():
            return folder / name
    if (folder / "model.onnx").is_file():
        return folder / "model.onnx"
    found = sorted(folder.glob("*.onnx"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ModelLoadError(f"{folder} is a folder with no .onnx model in it")
    names = ", ".join(p.name for p in found[:6]) + (", ..." if len(found) > 6 else "")
    raise ModelLoadError(f"{folder} holds several .onnx models ({names}): pass one of them")


def declared_dims(path: Path, proto: onnx.ModelProto) -> DeclaredDims:
    """The symbolic dimensions that the files beside the model, or its metadata, pin."""
    for reader in (_genai_dims, _hf_dims, _metadata_dims):
        found = reader(path, proto)
        if found.dims:
            return found
    return DeclaredDims()


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file beside a model; {} if it is missing or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _cache_dims(proto: onnx.ModelProto, patterns: list[str], kv_heads: int | None,
                head_size: int | None, source: str) -> DeclaredDims:
    """Sizes for the KV-cache inputs named by `patterns` ("past_key_values.%d.key"):
    [batch, kv_heads, past_length, head_size]."""
    regexes = [re.compile("^" + re.escape(p).replace("%d", r"\d+") + "$") for p in patterns if p]
    dims: dict[str, int] = {}
    for vi in graph_inputs(proto):
        if not any(r.match(vi.name) for r in regexes):
            continue
        shape = vi.type.tensor_type.shape.dim
        if len(shape) != 4:
            continue
        for index, size in ((1, kv_heads), (2, 0), (3, head_size)):
            if size is not None and not is_fixed(shape[index]):
                dims.setdefault(dim_symbol(shape[index], vi.name, index), size)
    return DeclaredDims(dims, source if dims else "")


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _genai_dims(path: Path, proto: onnx.ModelProto) -> DeclaredDims:
    config = path.parent / GENAI_CONFIG
    if not config.is_file():
        return DeclaredDims()
    decoder = read_json(config).get("model", {}).get("decoder", {})
    if not isinstance(decoder, dict):
        return DeclaredDims()
    inputs = decoder.get("inputs", {}) if isinstance(decoder.get("inputs"), dict) else {}
    patterns = [str(inputs.get("past_key_names", "past_key_values.%d.key")),
                str(inputs.get("past_value_names", "past_key_values.%d.value"))]
    heads = _int(decoder.get("num_attention_heads"))
    found = _cache_dims(proto, patterns, _int(decoder.get("num_key_value_heads")) or heads,
                        _int(decoder.get("head_size")), GENAI_CONFIG)
    past = next((k for k, v in found.dims.items() if v == 0), None)
    by_name = {vi.name: vi.type.tensor_type.shape.dim for vi in graph_inputs(proto)}
    ids = by_name.get(str(inputs.get("input_ids", "input_ids")), [])
    mask = by_name.get(str(inputs.get("attention_mask", "attention_mask")), [])
    if past and len(ids) == 2 and len(mask) == 2 and not is_fixed(ids[1]) \
            and not is_fixed(mask[1]):
        seq, total = dim_symbol(ids[1], "input_ids", 1), dim_symbol(mask[1], "attention_mask", 1)
        if len({seq, total, past}) == 3:
            return DeclaredDims(found.dims, found.source, {total: (past, seq)})
    return found


def _hf_dims(path: Path, proto: onnx.ModelProto) -> DeclaredDims:
    config = path.parent / HF_CONFIG
    if not config.is_file():
        return DeclaredDims()
    cfg = read_json(config)
    heads = _int(cfg.get("num_attention_heads"))
    hidden = _int(cfg.get("hidden_size"))
    head_size = _int(cfg.get("head_dim")) or (hidden // heads if hidden and heads else None)
    return _cache_dims(proto, ["past_key_values.%d.key", "past_key_values.%d.value"],
                       _int(cfg.get("num_key_value_heads")) or heads, head_size, HF_CONFIG)


def _metadata_dims(path: Path, proto: onnx.ModelProto) -> DeclaredDims:
    """Ultralytics-style `imgsz` metadata ("[640, 640]"): the last two dimensions of a
    single rank-4 image input."""
    meta = {p.key: p.value for p in proto.metadata_props}
    raw = meta.get("imgsz")
    if raw is None:
        return DeclaredDims()
    sizes = [int(v) for v in re.findall(r"\d+", raw)]
    if len(sizes) == 1:
        sizes *= 2
    images = [vi for vi in graph_inputs(proto) if len(vi.type.tensor_type.shape.dim) == 4]
    if len(sizes) != 2 or len(images) != 1:
        return DeclaredDims()
    shape = images[0].type.tensor_type.shape.dim
    dims = {dim_symbol(shape[i], images[0].name, i): size
            for i, size in ((2, sizes[0]), (3, sizes[1])) if not is_fixed(shape[i])}
    return DeclaredDims(dims, "the model's imgsz metadata" if dims else "")
