"""Checks of the folders the tool will write into, made before any work starts: a run that trains
for minutes and then cannot write its results has lost those minutes.

Nothing is created here (bad input must leave no empty folder behind); the check walks up to the
nearest folder that exists and asks whether this process may create files in it. No torch either:
these checks answer in a fraction of a second.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from ablate.errors import AblateError, DataError


# Bytes of one file or folder name on every common file system (ext4, XFS, APFS, NTFS in UTF-16 units).
NAME_MAX = 255


def check_name_lengths(path: str | Path, what: str) -> Path:
    """`path` as a Path, once no part of it is longer than NAME_MAX bytes (the file system refuses
    such a name: OSError 'File name too long' wherever it was first used); else one AblateError."""
    path = Path(path).expanduser()
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            raise AblateError(f"{what}: the name '{part[:40]}...' is {size} bytes long, more than a file system "
                              f"allows ({NAME_MAX})")
    return path


def check_writable_folder(path: str | Path, what: str) -> Path:
    """`path` as a Path, once it is (or can be created as) a folder this process may write into;
    else one AblateError naming `what` (the option or key that set it) and the path at fault.
    The nearest existing folder is asked by creating (and at once removing) a nameless file in it:
    permission bits say yes to root on /sys or a read-only mount, where creating anything fails."""
    path = check_name_lengths(path, what)
    for existing in (path, *path.parents):
        if not existing.exists():
            continue
        if not existing.is_dir():
            raise AblateError(f"{what}: {existing} is {'a file, not' if existing.is_file() else 'not'} a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise AblateError(f"{what}: {existing} is not writable (permission denied)")
        try:
            tempfile.TemporaryFile(dir=existing).close()
        except OSError as e:
            raise AblateError(f"{what}: cannot create files in {existing} ({e.strerror})") from None
        return path
    return path


# The PNG text chunk that marks a file as drawn by `ablate infer` (ablate.visualize.save_png).
SOFTWARE_KEY, SOFTWARE = "Software", "ablate infer"


def is_our_drawing(path: Path) -> bool:
    """Whether `path` is a PNG that `ablate infer` drew (its Software text chunk says so)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.info.get(SOFTWARE_KEY) == SOFTWARE
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


def output_paths(images: Sequence[Path], out_dir: Path) -> list[Path]:
    """out_dir/<stem>.png for each input image, checked before anything is decoded: no output may
    be one of the inputs (--out set to the images' own folder) or another input's output (two
    inputs with one stem), a link (which would write outside --out), or any file but a drawing
    of an earlier `ablate infer`, which a rerun replaces (a user's photo.png beside photo.jpg stays)."""
    outputs = [out_dir / f"{Path(image).stem}.png" for image in images]
    inputs = {_identity(Path(image)): Path(image) for image in images}
    for image, output in zip(images, outputs):
        if not Path(image).is_file():
            raise DataError(f"{image}: no such image file")
        overwritten = inputs.get(_identity(output))
        if overwritten is not None:
            raise DataError(f"--out: writing {output} would overwrite the input image {overwritten}; "
                            "choose another --out folder")
        if output.is_symlink():
            raise DataError(f"--out: {output} is a link; ablate infer writes no file through one "
                            "(remove it or choose another --out folder)")
        if output.exists() and not is_our_drawing(output):
            raise DataError(f"--out: {output} exists and is no drawing of ablate infer; it is kept "
                            "(remove it or choose another --out folder)")
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


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` through `write(file)` into a temporary file of the same folder, flushed to disk,
    then renamed over `path`: a writer that dies or fails mid-way leaves the previous file whole
    (and, unless killed outright, no temporary file either)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a leftover, or a link there: never written through
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
