"""Where Mirador keeps state that outlives a process (escalations, rollout decisions,
logs): the XDG state directory, unless the config names a file."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    """$XDG_STATE_HOME/mirador (~/.local/state/mirador without it)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "mirador"


def state_file(configured: str, default_name: str, config_dir: Path | None = None) -> Path:
    """A state file named in the config: empty = state_dir()/default_name; `~` expands; a
    relative path is read from the config file's folder (like every path in the config)."""
    if not configured:
        return state_dir() / default_name
    path = Path(os.path.expanduser(configured))
    if not path.is_absolute() and config_dir is not None:
        path = config_dir / path
    return path
