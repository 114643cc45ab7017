"""Periphery's headless core: model analysis, shard planning, extraction and execution.

Nothing in this package imports a UI toolkit, so a child host can run it without one.
"""

__version__ = "0.1.0"
