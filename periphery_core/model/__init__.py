"""Model loading and analysis: what each node of an ONNX graph costs."""

from periphery_core.model.analysis import ModelAnalysis, NodeInfo, TensorInfo, analyze
from periphery_core.model.loading import LoadedModel, load_model
from periphery_core.model.shapes import parse_input_shape

__all__ = [
    "LoadedModel",
    "ModelAnalysis",
    "NodeInfo",
    "TensorInfo",
    "analyze",
    "load_model",
    "parse_input_shape",
]
