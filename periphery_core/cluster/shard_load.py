"""A shard a node received, made into its stage's session holding as few copies as it can.

Made from the bytes, a stage held them five times over at its peak (the receive buffer, a copy
for ONNX Runtime, the checked proto, and ONNX Runtime's own parse and tensors): a node of a
0.69 GiB stage peaked at 3.56 GiB. A big shard's proto now writes its weights to a private
temporary file as it is checked (`onnx.save_model` moves each out as it goes) and is let go
before ONNX Runtime reads them back; the folder is removed once the session is made (ONNX
Runtime maps or copies what it needs). A small one goes from the bytes, as before.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx

from periphery_core.cluster.shard_policy import require_self_contained
from periphery_core.generate.stateful import StageState, stage_state
from periphery_core.runtime.chain import StageRunner
from periphery_core.runtime.session import SessionConfig

FILE_MIN = 64 << 20  # shards of this many bytes or more go through a file
PREFIX = "periphery-shard-"  # then the node's pid: a folder a killed node left is found


def build_stage(received: list[bytearray],
                config: SessionConfig) -> tuple[StageRunner, StageState | None]:
    """The session of the shard whose bytes `received` holds (this takes them out of it), and
    its decoder state, if it keeps one.

    Raises:
        ShardRefused: the shard reads data outside itself (shard_policy).
        RuntimeFailure: ONNX Runtime cannot load it.
    """
    data = received.pop()
    model = onnx.ModelProto()
    model.ParseFromString(data)
    require_self_contained(model)  # no reading of this host's files
    state = stage_state(model)
    scratch = tempfile.gettempdir()
    if len(data) < FILE_MIN or shutil.disk_usage(scratch).free < 2 * len(data):
        return StageRunner(model, config, serialized=bytes(data)), state
    del data
    _sweep(Path(scratch))
    with tempfile.TemporaryDirectory(prefix=f"{PREFIX}{os.getpid()}-", dir=scratch) as tmp:
        path = Path(tmp) / "shard.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="shard.onnx.data",
                        size_threshold=1024)
        del model  # (its weights are in the file now)
        return StageRunner(path, config), state


def _sweep(scratch: Path) -> None:
    """Remove the folders that nodes killed while building a stage left behind (their pid is
    in the name and no process has it now)."""
    for folder in scratch.glob(f"{PREFIX}*-*"):
        pid = folder.name[len(PREFIX):].partition("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue  # (alive, another user's)
