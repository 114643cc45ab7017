"""Periphery's Textual app: plan, deploy and watch a sharded ONNX pipeline from a terminal.

Everything headless lives in `periphery_core`; this package only draws it and runs the core's
blocking operations in thread workers.
"""
