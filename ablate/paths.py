"""Checks of the folders the tool will write into, made before any work starts: a run that trains
for minutes and then cannot write its results has lost those minutes.

Nothing is created here (bad input must leave no empty folder behind); the check walks up to the
nearest folder that exists and asks whether this process may create files in it. No torch either:
these checks answer in a fraction of a second.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ablate.errors import AblateError, DataError


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


def output_paths(images: Sequence[Path], out_dir: Path) -> list[Path]:
    """out_dir/<stem>.png for each input image, checked before anything is decoded: no output may
    be one of the inputs (--out set to the images' own folder) or another input's output (two
    inputs with one stem). A previous run's drawings in out_dir are replaced, as a rerun should."""
    outputs = [out_dir / f"{Path(image).stem}.png" for image in images]
    inputs = {_identity(Path(image)): Path(image) for image in images}
    for image, output in zip(images, outputs):
        if not Path(image).is_file():
            raise DataError(f"{image}: no such image file")
        overwritten = inputs.get(_identity(output))
        if overwritten is not None:
            raise DataError(f"--out: writing {output} would overwrite the input image {overwritten}; "
                            "choose another --out folder")
    seen: dict[Path, Path] = {}
    for image, output in zip(images, outputs):
        first = seen.setdefault(_identity(output), Path(image))
        if first != Path(image):
            raise DataError(f"{first} and {image} would both be drawn to {output} (same file name); "
                            "infer them in two runs with different --out folders")
    return outputs


def _identity(path: Path) -> Path:
    """One name per file whatever the spelling (relative, '..', symlinks)."""
    return path.expanduser().resolve()
