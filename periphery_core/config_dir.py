"""The one folder Periphery keeps a user's settings in: the app's recent models and the
default cluster key folder (`keys/`).

`$PERIPHERY_CONFIG_DIR` when set (the test suite points it at a folder of its own, so no test
reads or writes the user's), else `~/.config/periphery`.
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_ENV = "PERIPHERY_CONFIG_DIR"


def config_dir() -> Path:
    """The folder Periphery keeps its settings in."""
    override = os.environ.get(CONFIG_ENV)
    return Path(override) if override else Path.home() / ".config" / "periphery"
