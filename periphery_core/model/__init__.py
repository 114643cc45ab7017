"""Loading a model: `load_model` and the input shapes it is run at.

The analysis (`model.analysis`) and the profiler (`model.profile`) are imported from their
modules, not re-exported here: both run the model in ONNX Runtime, and `periphery_core.runtime`
imports from this package (loading, shapes), so re-exporting them here would close an import
cycle between the two packages (tests/test_import_graph.py).
"""

from periphery_core.model.loading import LoadedModel, load_model
from periphery_core.model.shapes import parse_input_shape

__all__ = [
    "LoadedModel",
    "load_model",
    "parse_input_shape",
]
