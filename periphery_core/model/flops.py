"""Per-node FLOP estimates (placeholder: being written)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

ShapeOf = Callable[[str], "tuple[int, ...] | None"]
ValueOf = Callable[[str], "np.ndarray | None"]


def node_flops(node: onnx.NodeProto, shape_of: ShapeOf, value_of: ValueOf) -> int:
    """Estimated floating-point operations of one node (multiply-add = 2)."""
    return 0
