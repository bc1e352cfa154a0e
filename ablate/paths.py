"""Checks of the folders the tool will write into, made before any work starts: a run that trains
for minutes and then cannot write its results has lost those minutes.

Nothing is created here (bad input must leave no empty folder behind); the check walks up to the
nearest folder that exists and asks whether this process may create files in it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ablate.errors import AblateError


def check_writable_folder(path: str | Path, what: str) -> Path:
    """`path` as a Path, once it is (or can be created as) a folder this process may write into;
    else one AblateError naming `what` (the option or key that set it) and the path at fault."""
    path = Path(path).expanduser()
    for existing in (path, *path.parents):
        if not existing.exists():
            continue
        if not existing.is_dir():
            raise AblateError(f"{what}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise AblateError(f"{what}: {existing} is not writable (permission denied)")
        return path
    return path
