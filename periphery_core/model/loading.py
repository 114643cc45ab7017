"""Loading ONNX files, including external data and models over 2 GB.

A model is loaded once into a `LoadedModel`, which keeps the proto, the file's path, its sha256
(plans record it so that a plan is applied only to the model it was made for) and whether the
weights live in external files. Every failure becomes one `ModelLoadError` line.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

import onnx
from google.protobuf.message import DecodeError

from periphery_core.errors import ModelLoadError
from periphery_core.model.declared import DeclaredDims, declared_dims, model_file

# Protobuf cannot serialize a message of 2 GiB or more; above this (a margin below that limit),
# shards and temporary copies are written with external data.
PROTOBUF_LIMIT = (1 << 31) - 1  # what a protobuf parser accepts in one message
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# A model written and then let go (`save_model(keep=False)`) above this size gets external data
# too: serialising it whole would hold a second copy of its weights while it is written.
RELEASE_THRESHOLD = 256 << 20


@dataclass(frozen=True)
class DataFiles:
    """Where a model's external weights lie, as its file declared them: a deploy sends a big
    weight's bytes from its data file (shard_parts) rather than copying the ones `proto`
    holds, so the master holds the model's weights once, never a stage's twice more."""

    folder: Path
    headers: Mapping[str, onnx.TensorProto]  # initializer -> its declaration (no bytes)
    stamps: Mapping[str, tuple[int, int]]  # data file -> (size, mtime_ns) when it was read

    def header(self, name: str) -> onnx.TensorProto | None:
        """`name`'s declaration while its data file is still the one read at load; None for
        a weight read from no file, or from one changed since (its bytes are `proto`'s)."""
        head = self.headers.get(name)
        if head is None:
            return None
        location = external_location(head)
        try:
            stat = (self.folder / location).stat()
        except OSError:
            return None
        return head if (stat.st_size, stat.st_mtime_ns) == self.stamps.get(location) else None


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
    data_files: DataFiles | None = None  # where the weights read from data files lie

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


def load_model(
    path: str | os.PathLike[str], weights: bool | Literal["small"] = True
) -> LoadedModel:
    """Load an ONNX model with its external data.

    `path` may be a folder: an ONNX Runtime GenAI or Hugging Face export folder, or one holding
    a single model (see `declared.model_file`). `weights=False` leaves external data on disk:
    the graph, the shapes and the hash without the bytes, for a caller that lets ONNX Runtime
    read the model from its path (`verify` on a model of many GiB). `weights="small"` loads
    only the initializers `skeleton` keeps (and tensors in node attributes): shape inference
    and the checker then see what they see with every weight, and the big ones stay on disk
    for a caller that copies them file to file (`save_model(weights_dir=...)`).

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
    files = _data_files(proto, p.parent) if external else None
    if external and weights:
        _load_external(proto, p, small_only=weights == "small")
    _check_structure(proto, p)
    return LoadedModel(
        path=p, proto=proto, sha256=file_sha256(p), has_external_data=external,
        checker_ok=passes_checker(proto), declared=declared_dims(p, proto), data_files=files,
    )


def _data_files(proto: onnx.ModelProto, folder: Path) -> DataFiles:
    """The declarations of the top-level initializers kept in data files, before they are read."""
    headers: dict[str, onnx.TensorProto] = {}
    stamps: dict[str, tuple[int, int]] = {}
    for init in proto.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        head = onnx.TensorProto()
        head.CopyFrom(init)  # (no bytes yet: cheap)
        headers[init.name] = head
        location = external_location(init)
        if location not in stamps:
            try:
                stat = (folder / location).stat()
            except OSError:
                continue  # (missing: _load_external says so)
            stamps[location] = (stat.st_size, stat.st_mtime_ns)
    return DataFiles(folder=folder, headers=headers, stamps=stamps)


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
        if approx_nbytes(init) <= keep_bytes:
            g.initializer.append(init)
            continue
        if init.name not in listed:
            g.input.append(
                onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
            )
    return light


def external_location(t: onnx.TensorProto) -> str:
    """The file an external tensor's `location` names ("" if none)."""
    return next((e.value for e in t.external_data if e.key == "location"), "")


def approx_nbytes(t: onnx.TensorProto) -> int:
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


def _initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """A graph's initializers, then its subgraphs': the order onnx writes them to a data file."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs
            for sub in subs:
                yield from _initializers(sub)


def _load_external(proto: onnx.ModelProto, path: Path, *, small_only: bool = False) -> None:
    base = path.parent
    for init in proto.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = external_location(init)
        if not location or not (base / location).is_file():
            raise ModelLoadError(
                f"external data file '{location}' for tensor '{init.name}' is missing: "
                f"keep it in {base} beside {path.name}"
            )
    # onnx's loader reads every tensor marked external: the big ones are unmarked meanwhile.
    left = [t for t in _initializers(proto.graph) if small_only
            and t.data_location == onnx.TensorProto.EXTERNAL
            and approx_nbytes(t) > SKELETON_KEEP_BYTES]
    for t in left:
        t.data_location = onnx.TensorProto.DEFAULT
    try:
        onnx.load_external_data_for_model(proto, str(base))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot read external data of {path.name}: {_first_line(exc)}"
        ) from None
    finally:
        for t in left:
            t.data_location = onnx.TensorProto.EXTERNAL


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def approx_size(model: onnx.ModelProto) -> int:
    """About how many bytes `model` serialises to: its weights' bytes from their shapes, plus
    the graph's own size. `ByteSize()` would tell exactly, but protobuf's C backend computes it
    by encoding the whole message: a transient copy of every weight (1.8 GiB for a 0.9 GiB
    shard), which is what writing a big model one shard at a time must not hold."""
    weights = sum(approx_nbytes(t) for t in model.graph.initializer
                  if t.data_location != onnx.TensorProto.EXTERNAL)
    return weights + skeleton(model).ByteSize()


def save_model(model: onnx.ModelProto, path: Path, *, keep: bool = True,
               weights_dir: Path | None = None) -> None:
    """Write a model, moving weights to a `<name>.data` file when the proto is too big.

    `keep=False`: the caller is done with `model`, so a proto of `RELEASE_THRESHOLD` or more
    has its weights written straight to the data file and dropped from memory as they go,
    rather than serialised whole (a copy of every byte) or brought back after.

    `weights_dir`: the folder of the external data that `model`'s initializers still point into
    (a shard of a model loaded with `weights="small"`). With `keep=False`, a big model's are
    copied from there into its data file a block at a time, never held in memory; otherwise
    they are read into `model` first and it is written as if it had been loaded whole.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()  # onnx appends to an existing data file
    size = approx_size(model) + sum(approx_nbytes(t) for t in model.graph.initializer
                                    if t.data_location == onnx.TensorProto.EXTERNAL)
    if not keep and size >= RELEASE_THRESHOLD:
        _save_released(model, path, data, weights_dir)
        return
    if weights_dir is not None:
        onnx.load_external_data_for_model(model, str(weights_dir))
    if size >= EXTERNAL_DATA_THRESHOLD:
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


# What `onnx.save_model(..., size_threshold=1024)` moves to the data file: it compares
# `sys.getsizeof` of a tensor's bytes (their length plus the bytes object's header) with the
# threshold. The same rule makes a file written by `_save_released` the one onnx would write.
_DATA_FILE_MIN_BYTES = 1024 - sys.getsizeof(b"")
_COPY_BLOCK = 16 << 20


def _save_released(model: onnx.ModelProto, path: Path, data: Path,
                   weights_dir: Path | None) -> None:
    """What `onnx.save_model` with all tensors in one data file writes (same order, offsets and
    bytes), with the weights still on disk copied from file to file rather than read in. Those
    are the big ones (`load_model(weights="small")` loads the rest), so all go to the file."""
    moved: list[tuple[onnx.TensorProto, Path | None, int, int]] = []
    for t in _initializers(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            if weights_dir is None:
                raise ModelLoadError(f"tensor '{t.name}' is not loaded and no folder to read "
                                     "it from was given")
            moved.append((t, *external_range(t, weights_dir)))
        elif t.HasField("raw_data") and len(t.raw_data) >= _DATA_FILE_MIN_BYTES:
            moved.append((t, None, 0, len(t.raw_data)))
    if moved:
        with data.open("wb") as out:
            for t, source, offset, length in moved:
                start = out.tell()
                if source is None:
                    out.write(t.raw_data)
                    t.ClearField("raw_data")
                else:
                    _copy_range(source, offset, length, out)
                del t.external_data[:]
                t.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", data.name), ("offset", str(start)),
                                   ("length", str(length))):
                    entry = t.external_data.add()
                    entry.key, entry.value = key, value
    onnx.save_model(model, str(path))


def external_range(t: onnx.TensorProto, base: Path) -> tuple[Path, int, int]:
    """The file, offset and length of an external tensor's bytes, checked against the file."""
    info = {e.key: e.value for e in t.external_data}
    location = Path(info.get("location", ""))
    source = base / location
    if location.is_absolute() or ".." in location.parts or not source.is_file():
        raise ModelLoadError(f"external data file '{location}' for tensor '{t.name}' is "
                             f"missing: keep it in {base} beside the model")
    offset = int(info.get("offset", 0))
    size = source.stat().st_size
    length = int(info["length"]) if "length" in info else size - offset
    if offset < 0 or length < 0 or offset + length > size:
        raise ModelLoadError(f"external data of tensor '{t.name}' lies past the end of "
                             f"'{location}' (is the file truncated?)")
    return source, offset, length


def _copy_range(source: Path, offset: int, length: int, out: BinaryIO) -> None:
    with source.open("rb") as handle:
        handle.seek(offset)
        while length:
            block = handle.read(min(length, _COPY_BLOCK))
            if not block:
                raise ModelLoadError(f"{source.name} ended while its weights were copied")
            out.write(block)
            length -= len(block)
