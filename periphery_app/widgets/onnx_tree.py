"""A directory tree that shows only folders and `.onnx` files."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from textual.widgets import DirectoryTree

_SKIP = {"__pycache__", "node_modules", "site-packages"}


class OnnxTree(DirectoryTree):
    """`DirectoryTree` filtered to `.onnx` files and the folders that may hold them."""

    DEFAULT_CSS = """
    OnnxTree {
        height: 1fr;
    }
    """

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        for path in paths:
            if path.name.startswith(".") or path.name in _SKIP:
                continue
            try:
                if path.is_dir() or path.suffix.lower() == ".onnx":
                    yield path
            except OSError:
                continue
