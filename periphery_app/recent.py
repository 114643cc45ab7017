"""Recently opened models, kept in `recent.json` in the user's config folder
(`periphery_core.config_dir`). A missing or damaged file reads as an empty list: the list is a
convenience, never a reason to fail.
"""

from __future__ import annotations

import json
from pathlib import Path

from periphery_core.config_dir import config_dir
from periphery_core.model.loading import display_name

MAX_RECENT = 10


def recent_path() -> Path:
    return config_dir() / "recent.json"


def load_recent() -> list[Path]:
    """Recent model paths, most recent first, dropping ones that no longer exist."""
    try:
        data = json.loads(recent_path().read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(data, list):
        return []
    return [Path(p) for p in data if isinstance(p, str) and Path(p).is_file()][:MAX_RECENT]


def remember(path: Path) -> list[Path]:
    """Put `path` first in the recent list and save it.

    Args:
        path: A model that was opened successfully.

    Returns:
        The new list.
    """
    resolved = path.resolve()
    items = [resolved, *(p for p in load_recent() if p.resolve() != resolved)][:MAX_RECENT]
    target = recent_path()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps([str(p) for p in items], indent=1) + "\n")
    except OSError:
        pass  # a read-only home must not stop a model from opening
    return items


def distinct_names(paths: list[Path]) -> list[str]:
    """Each path's name for the recent list; paths whose names are the same (one model in two
    checkouts) also show as much of their folders as tells them apart:
    `demo-resnet.onnx (main/assets)`, `demo-resnet.onnx (copy/assets)`."""
    names = [display_name(p) for p in paths]
    out = list(names)
    for name in set(names):
        same = [i for i, n in enumerate(names) if n == name]
        if len(same) < 2:
            continue
        folders = {i: paths[i].parent.parts for i in same}
        depth = max(len(f) for f in folders.values())
        tails = {i: str(paths[i].parent) for i in same}
        for keep in range(1, depth + 1):
            tails = {i: str(Path(*f[-keep:])) for i, f in folders.items()}
            if len(set(tails.values())) == len(same) or keep == depth:
                break
        for i in same:
            out[i] = f"{name} ({tails[i]})"
    return out
