"""Loading ONNX files, including external data and models over 2 GB.

A model is loaded once into a `LoadedModel`, which keeps the proto, the file's path, its sha256
(plans record it so that a plan is applied only to the model it was made for) and whether the
weights live in external files. Every failure becomes one `ModelLoadError` line.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from periphery_core.errors import ModelLoadError
from periphery_core.model.declared import DeclaredDims, declared_dims, model_file

# Protobuf cannot serialize a message of 2 GiB or more; above this (a margin below that limit),
# shards and temporary copies are written with external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# A model written and then let go (`save_model(keep=False)`) above this size gets external data
# too: serialising it whole would hold a second copy of its weights while it is written.
RELEASE_THRESHOLD = 256 << 20


@dataclass(frozen=True)
class LoadedModel:
    """An ONNX model and where it came from."""

    path: Path
    proto: onnx.ModelProto
    sha256: str
    has_external_data: bool
    checker_ok: bool  # passes onnx.checker's full check; shards are then held to it too
    # Symbolic dimensions the files beside the model or its metadata pin (model.declared).
    declared: DeclaredDims = field(default_factory=DeclaredDims)

    @property
    def name(self) -> str:
        """The file's name; with its folder for a generic `model.onnx` (an export folder's
        name says which model it is: `all-MiniLM-L6-v2/model.onnx`)."""
        return display_name(self.path)


def display_name(path: Path) -> str:
    """A model file's name for people: `folder/model.onnx` where the file name says nothing."""
    if path.name == "model.onnx" and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(
        init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer
    )


def load_model(path: str | os.PathLike[str], weights: bool = True) -> LoadedModel:
    """Load an ONNX model with its external data.

    `path` may be a folder: an ONNX Runtime GenAI or Hugging Face export folder, or one holding
    a single model (see `declared.model_file`). `weights=False` leaves external data on disk:
    the graph, the shapes and the hash without the bytes, for a caller that lets ONNX Runtime
    read the model from its path (`verify` on a model of many GiB).

    Raises:
        ModelLoadError: the file is missing, not ONNX, truncated, or its external data is missing.
    """
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model file not found: {p}")
    if p.is_dir():
        p = model_file(p)
    if p.stat().st_size == 0:
        raise ModelLoadError(f"{p} is empty: expected an ONNX model")
    _refuse_text(p)
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"{p} is not a readable ONNX model (it may be truncated or not ONNX at all): "
            f"{_first_line(exc)}"
        ) from None
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise ModelLoadError(f"{p} holds no ONNX graph: is it really an ONNX model?")
    external = _uses_external_data(proto)
    if external and weights:
        _load_external(proto, p)
    _check_structure(proto, p)
    return LoadedModel(
        path=p, proto=proto, sha256=file_sha256(p), has_external_data=external,
        checker_ok=passes_checker(proto), declared=declared_dims(p, proto),
    )


def _refuse_text(path: Path) -> None:
    """A file that is text, whatever its name (a plan, a config), is said to be so."""
    with path.open("rb") as handle:
        raw = handle.read(256)
    try:
        head = raw.decode("utf-8").lstrip().encode()
    except UnicodeDecodeError:
        return  # binary, as an ONNX model is
    if head[:1] in (b"{", b"["):
        raise ModelLoadError(f"{path} is JSON, not an ONNX model (a plan file? open it on the "
                             "Shards screen, or pass it to --plan)")
    if head.startswith((b"#", b"version", b"model")) and b"\0" not in head:
        raise ModelLoadError(f"{path} is a text file (TOML?), not an ONNX model")


SKELETON_KEEP_BYTES = 4096


def skeleton(model: onnx.ModelProto, keep_bytes: int = SKELETON_KEEP_BYTES) -> onnx.ModelProto:
    """A copy without the weights' bytes, for shape inference and checks.

    Initializers above `keep_bytes` become typed graph inputs: inference and the checker still
    know their types and shapes, and small initializers (shape constants, axes) keep their
    values so constant propagation still works. Serialising a 90 MB model for every inference
    pass is what this avoids.
    """
    light = onnx.ModelProto()
    for field_name in ("ir_version", "producer_name", "producer_version", "domain",
                       "model_version", "doc_string"):
        setattr(light, field_name, getattr(model, field_name))
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = model.graph
    g = light.graph
    g.name = graph.name
    g.node.extend(graph.node)
    g.output.extend(graph.output)
    g.value_info.extend(graph.value_info)
    g.sparse_initializer.extend(graph.sparse_initializer)
    listed = {i.name for i in graph.input}
    g.input.extend(graph.input)
    for init in graph.initializer:
        if _approx_nbytes(init) <= keep_bytes:
            g.initializer.append(init)
            continue
        if init.name not in listed:
            g.input.append(
                onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
            )
    return light


def _approx_nbytes(t: onnx.TensorProto) -> int:
    """A tensor's bytes from its shape and type, without touching its data."""
    count = 1
    for d in t.dims:
        count *= d
    if t.data_type == onnx.TensorProto.STRING:
        return count * 8
    return count * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def passes_checker(model: onnx.ModelProto) -> bool:
    """Whether the model passes onnx.checker's full check (weights' bytes aside)."""
    try:
        onnx.checker.check_model(skeleton(model), full_check=True)
    except Exception:  # many real models fail the checker yet run fine in ONNX Runtime
        return False
    return True


def _check_structure(proto: onnx.ModelProto, path: Path) -> None:
    """Every tensor a node reads must be defined: catches files cut at a field boundary."""
    graph = proto.graph
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    defined |= {i.values.name for i in graph.sparse_initializer}
    for node in graph.node:
        for name in node.input:
            if name and name not in defined:
                raise ModelLoadError(
                    f"{path} is incomplete or not topologically sorted: node "
                    f"'{node.name or node.op_type}' reads '{name}', which nothing defines "
                    "(is the file truncated?)"
                )
        defined.update(node.output)
    for out in graph.output:
        if out.name not in defined:
            raise ModelLoadError(
                f"{path} is incomplete: output '{out.name}' is produced by no node "
                "(is the file truncated?)"
            )


def _load_external(proto: onnx.ModelProto, path: Path) -> None:
    base = path.parent
    for init in proto.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in init.external_data if e.key == "location"), "")
        if not location or not (base / location).is_file():
            raise ModelLoadError(
                f"external data file '{location}' for tensor '{init.name}' is missing: "
                f"keep it in {base} beside {path.name}"
            )
    try:
        onnx.load_external_data_for_model(proto, str(base))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot read external data of {path.name}: {_first_line(exc)}"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def approx_size(model: onnx.ModelProto) -> int:
    """About how many bytes `model` serialises to: its weights' bytes from their shapes, plus
    the graph's own size. `ByteSize()` would tell exactly, but protobuf's C backend computes it
    by encoding the whole message: a transient copy of every weight (1.8 GiB for a 0.9 GiB
    shard), which is what writing a big model one shard at a time must not hold."""
    weights = sum(_approx_nbytes(t) for t in model.graph.initializer
                  if t.data_location != onnx.TensorProto.EXTERNAL)
    return weights + skeleton(model).ByteSize()


def save_model(model: onnx.ModelProto, path: Path, *, keep: bool = True) -> None:
    """Write a model, moving weights to a `<name>.data` file when the proto is too big.

    `keep=False`: the caller is done with `model`, so a proto of `RELEASE_THRESHOLD` or more
    has its weights written straight to the data file and dropped from memory as they go,
    rather than serialised whole (a copy of every byte) or brought back after.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()  # onnx appends to an existing data file
    size = approx_size(model)
    if not keep and size >= RELEASE_THRESHOLD:
        onnx.save_model(model, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
    elif size >= EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
        # Saving moved the weights out of the proto in place: bring them back so the caller's
        # model stays usable (same peak memory as saving a copy would need, without the copy).
        onnx.load_external_data_for_model(model, str(path.parent))
        for init in model.graph.initializer:
            init.ClearField("external_data")
            init.ClearField("data_location")
    else:
        onnx.save_model(model, str(path))
