"""Make `assets/demo-resnet.onnx`, the demo model Periphery ships (no download, no torch).

A small residual CNN for 3x128x128 images with seeded random weights: a stride-2 stem, eight
residual blocks in two widths, global pooling and a classifier. About 1.9 GFLOPs per image, heavy
enough that pipelining it across nodes shows, small enough (3 MB) to keep in the repository.
Run `python assets/make_demo_model.py` to rebuild it; the output is byte-for-byte reproducible.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUT = Path(__file__).resolve().parent / "demo-resnet.onnx"


def build(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def weight(name: str, shape: tuple[int, ...], fan_in: int) -> str:
        w = rng.standard_normal(shape).astype(np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        inits.append(numpy_helper.from_array(w, name))
        return name

    def bias(name: str, n: int) -> str:
        inits.append(numpy_helper.from_array(np.zeros(n, np.float32) + 0.01, name))
        return name

    def conv(x: str, name: str, cin: int, cout: int, stride: int = 1, k: int = 3) -> str:
        w = weight(f"{name}.w", (cout, cin, k, k), cin * k * k)
        b = bias(f"{name}.b", cout)
        nodes.append(helper.make_node(
            "Conv", [x, w, b], [f"{name}.out"], name=name, kernel_shape=[k, k],
            strides=[stride, stride], pads=[k // 2] * 4,
        ))
        return f"{name}.out"

    def relu(x: str, name: str) -> str:
        nodes.append(helper.make_node("Relu", [x], [f"{name}.out"], name=name))
        return f"{name}.out"

    x = relu(conv("image", "stem", 3, 48, stride=2), "stem.relu")
    width = 48
    for i, (cout, stride) in enumerate([(48, 1)] * 4 + [(96, 2)] + [(96, 1)] * 3):
        h = relu(conv(x, f"block{i}.conv1", width, cout, stride), f"block{i}.relu1")
        h = conv(h, f"block{i}.conv2", cout, cout)
        skip = x if (stride == 1 and cout == width) else conv(x, f"block{i}.proj", width, cout,
                                                              stride, k=1)
        nodes.append(helper.make_node("Add", [h, skip], [f"block{i}.sum"], name=f"block{i}.add"))
        x = relu(f"block{i}.sum", f"block{i}.relu2")
        width = cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["features"], name="flatten"))
    w = weight("classifier.w", (width, 10), width)
    b = bias("classifier.b", 10)
    nodes.append(helper.make_node("Gemm", ["features", w, b], ["logits"], name="classifier"))
    graph = helper.make_graph(
        nodes, "demo_resnet",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 128, 128])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                              producer_name="periphery-assets")
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> int:
    model = build()
    onnx.save_model(model, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
