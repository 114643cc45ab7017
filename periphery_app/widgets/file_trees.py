"""Directory trees that show only folders and the files a screen can open: `.onnx` models, or
the data the quantize sources read (the core's name endings, so the tree lists what they read)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from textual.widgets import DirectoryTree

from periphery_core.quantize.sources import is_data_file

_SKIP = {"__pycache__", "node_modules", "site-packages"}


class FileTree(DirectoryTree):
    """`DirectoryTree` of folders (hidden and tool folders left out) and the files it `shows`."""

    DEFAULT_CSS = """
    FileTree {
        height: 1fr;
    }
    """

    def shows(self, path: Path) -> bool:
        """Whether to list this file; every file here, a subclass narrows it."""
        return True

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        for path in paths:
            if path.name.startswith(".") or path.name in _SKIP:
                continue
            try:
                if path.is_dir() or self.shows(path):
                    yield path
            except OSError:
                continue


class OnnxTree(FileTree):
    """Folders and `.onnx` files."""

    def shows(self, path: Path) -> bool:
        return path.suffix.lower() == ".onnx"


class DataTree(FileTree):
    """Folders and the files a quantize data source reads."""

    def shows(self, path: Path) -> bool:
        return is_data_file(path)
