"""A set's images decoded once per machine into one file, memory-mapped by every process that reads it.

`data.cache_images` exists for sets read every epoch, where decoding would compete with the training
step for the CPU. Decoding them in each process cost every run of a grid (and every one of its worker
processes) the whole decode again (~3 s for the embedded set's 4,000 train PNGs) and a private copy
of the pixels (~200 MB). Here the first process to need a set decodes it into a store under the ablate
cache; every process after it, at once or in a later run, maps the same file: opening costs the stat
of each image file, and the pixels live once, in the page cache, shared by all the processes.

A store is the folder `<cache>/decoded/<key>/` holding

    pixels      uint8, the images one after another, each [h, w, 3] (pixel-major, RGB)
    index.npy   int64 [N, 2]: (h, w) of each image; image i starts at byte 3 * sum(h * w) of the
                images before it
    about.json  the image folder and image count it was decoded from, for a person looking at the cache

Pixel-major because that is how the decoders leave them: `ablate.data.coco.decode_image` returns a
[3, h, w] view of [h, w, 3] memory, so writing an image is one plain copy (making it channel-major
first cost more than decoding it), and reading one gives back a tensor of the very shape and strides
decoding gives.

The key hashes the image folder's absolute path and, in order, each image's file name, size and
modification time (ns), so an edited, added, removed or reordered image gives another store (the
old one stays until the cache is cleared). A store is complete when its index exists and its pixel
file has the size the index implies; the index is moved into place last, so a build that was killed
leaves at worst an incomplete store, which the next process rebuilds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ablate.data.synth import default_cache_dir
from ablate.errors import DataError

# Bump when the files' layout changes: it is part of the key, so stores of the old layout are not read.
FORMAT_VERSION = 1
PIXELS = "pixels"
INDEX = "index.npy"
ABOUT = "about.json"
LOCK = ".lock"
# Free space asked for beyond the store itself: the run goes on to write checkpoints and logs,
# often to the same disk, and should not be the one that fills it.
MARGIN_FRACTION = 0.05
MARGIN_BYTES = 64 * 2**20

Decoder = Callable[[Path], torch.Tensor]  # a file -> uint8 [3, h, w] RGB, DataError if it cannot


# ----------------------------------------------------------------------------- where a store lives


def store_key(img_dir: str | Path, file_names: Sequence[str], *, decoder: str = "") -> str:
    """Hex digest naming the store of these images of `img_dir` (in this order).

    `decoder` names what decodes them (library versions): another decoder may give other pixels for
    the same file. Costs one stat per image (4,000 files: ~10 ms).
    """
    folder = str(Path(img_dir).resolve())
    files = []
    for name in file_names:
        try:
            st = os.stat(os.path.join(folder, name))  # str, not Path: a third of the time for 4,000 files
        except OSError as e:
            raise DataError(f"{os.path.join(folder, name)}: cannot read image ({e.strerror})") from None
        files.append([name, st.st_size, st.st_mtime_ns])
    # JSON: no file name, whatever characters it holds, can make two lists read alike.
    described = json.dumps({"format": FORMAT_VERSION, "decoder": decoder, "folder": folder, "files": files})
    return hashlib.sha256(described.encode()).hexdigest()[:24]


def store_folder(key: str, cache_dir: str | Path | None = None) -> Path:
    """<cache_dir>/decoded/<key>; cache_dir None or "" means `default_cache_dir()` ($ABLATE_CACHE or
    ~/.cache/ablate), as for the embedded set."""
    base = Path(cache_dir) if cache_dir else default_cache_dir()
    return base / "decoded" / key


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds a whole store: an index, and a pixel file of exactly the size it implies."""
    try:
        sizes = np.load(folder / INDEX)
        return (folder / PIXELS).stat().st_size == _num_bytes(sizes)
    except (OSError, ValueError, EOFError):
        return False


def _num_bytes(sizes: np.ndarray) -> int:
    """Bytes of the pixels of images of `sizes` (int [N, 2] h, w)."""
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    return 3 * int((sizes[:, 0] * sizes[:, 1]).sum())


# ----------------------------------------------------------------------------- reading


class DecodedImages:
    """A complete store, mapped read-only: `len(store)` images, `store.sizes` int64 [N, 2] (h, w),
    `store[i]` a fresh uint8 [3, h, w] tensor (a view of [h, w, 3] memory, as decode_image's).

    Pickles as its folder (mapped again on the other side): a DataLoader that starts its workers by
    spawning would otherwise send the whole set, pixels included, to each of them.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.sizes: np.ndarray = np.load(self.folder / INDEX)
        areas = 3 * self.sizes[:, 0] * self.sizes[:, 1]
        self._offsets = np.concatenate([[0], np.cumsum(areas)]).astype(np.int64)  # int64 [N + 1]
        total = int(self._offsets[-1])
        # np.memmap refuses an empty file; a store of no pixel has nothing to map.
        self._pixels = (np.memmap(self.folder / PIXELS, dtype=np.uint8, mode="r", shape=(total,)) if total
                        else np.zeros(0, np.uint8))

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> torch.Tensor:
        h, w = (int(v) for v in self.sizes[i])
        # A copy (np.array of the slice): the transforms must never write into pages other processes
        # read, and torch warns about tensors over read-only memory.
        pixels = np.array(self._pixels[self._offsets[i]:self._offsets[i + 1]])
        return torch.from_numpy(pixels).view(h, w, 3).permute(2, 0, 1)

    def __getstate__(self) -> dict:
        return {"folder": str(self.folder)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["folder"])


# ----------------------------------------------------------------------------- building


def open_images(img_dir: str | Path, file_names: Sequence[str], *, sizes: np.ndarray, decode: Decoder,
                cache_dir: str | Path | None = None, decoder: str = "", progress: bool = False) -> DecodedImages:
    """The store of `file_names` (relative to `img_dir`), built first if no process has built it.

    `sizes` int [N, 2] (h, w): the sizes the caller expects (its annotations'), used only to check
    the disk space before building; the store keeps the decoded sizes, for the caller to compare.
    `decode` turns a file into uint8 [3, h, w]; `decoder` names it in the key (see `store_key`).
    Two processes asking at once: one builds under the store's lock, the other waits and then maps it.
    """
    img_dir = Path(img_dir)
    folder = store_folder(store_key(img_dir, file_names, decoder=decoder), cache_dir)
    if not is_complete(folder):
        with _locked(folder):
            if not is_complete(folder):  # unless built by the process we waited for
                _build(folder, [img_dir / name for name in file_names], sizes=sizes, decode=decode,
                       source=img_dir, progress=progress)
    return DecodedImages(folder)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold the exclusive lock of the store `folder` (created if need be); blocks while another
    process holds it. The kernel drops it if the process dies, so a killed build blocks no one."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise DataError(f"{folder}: cannot create the decoded-image cache folder ({e.strerror}); set "
                        "data.cache_dir to a writable folder, or --set data.cache_images=false") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def check_free_space(folder: Path, needed: int) -> None:
    """One-line DataError unless the disk of `folder` has room for `needed` bytes and a margin."""
    free = shutil.disk_usage(folder).free
    wanted = needed + int(needed * MARGIN_FRACTION) + MARGIN_BYTES
    if free < wanted:
        raise DataError(f"{folder}: not enough free disk space to keep the decoded images ({needed:,} bytes "
                        f"needed plus a {wanted - needed:,}-byte margin, {free:,} free); free some, set "
                        "data.cache_dir to a folder on another disk, or --set data.cache_images=false")


def _build(folder: Path, paths: Sequence[Path], *, sizes: np.ndarray, decode: Decoder, source: Path,
           progress: bool) -> None:
    """Decode `paths` into the store `folder`, whose lock this process holds."""
    check_free_space(folder, _num_bytes(sizes))
    (folder / INDEX).unlink(missing_ok=True)  # incomplete, or it would not be rebuilt
    for stale in folder.glob("*.tmp-*"):  # left by a killed build (the lock says none is running)
        stale.unlink(missing_ok=True)
    tmp_pixels, tmp_index = folder / f"{PIXELS}.tmp-{os.getpid()}", folder / f"index.tmp-{os.getpid()}.npy"
    try:
        with open(tmp_pixels, "wb") as f:
            decoded = _write_pixels(f, paths, decode, progress)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp_index, "wb") as f:
            np.save(f, decoded)
            f.flush()
            os.fsync(f.fileno())
        (folder / ABOUT).write_text(json.dumps({"images": str(source.resolve()), "count": len(paths),
                                                "bytes": _num_bytes(decoded)}, indent=1) + "\n")
        os.replace(tmp_pixels, folder / PIXELS)
        os.replace(tmp_index, folder / INDEX)  # last: from here on the store is complete
        _fsync_folder(folder)
    except OSError as e:
        raise DataError(f"{folder}: cannot write the decoded images ({e.strerror or e}); set data.cache_dir "
                        "to another folder, or --set data.cache_images=false") from None
    finally:
        tmp_pixels.unlink(missing_ok=True)
        tmp_index.unlink(missing_ok=True)


def _write_pixels(f, paths: Sequence[Path], decode: Decoder, progress: bool) -> np.ndarray:
    """Decode each of `paths` and append it to the file `f` as uint8 [h, w, 3]; returns int64 [N, 2] (h, w)."""
    sizes = np.zeros((len(paths), 2), dtype=np.int64)
    with _progress_bar(len(paths), progress) as advance:
        for i, path in enumerate(paths):
            image = decode(path)
            if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"{path}: the decoder gave {image.dtype} {tuple(image.shape)}, "
                                 "not uint8 [3, h, w]")
            # No copy for decode_image's tensors (already [h, w, 3] in memory); one for any other decoder.
            f.write(image.permute(1, 2, 0).contiguous().numpy())
            sizes[i] = image.shape[1:]
            advance()
    return sizes


@contextlib.contextmanager
def _progress_bar(total: int, show: bool) -> Iterator[Callable[[], None]]:
    """An `advance()` for `total` steps: a transient rich bar when `show`, nothing otherwise."""
    if not show:
        yield lambda: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("decoding the images once for every run", total=total)
        yield lambda: bar.advance(task)


def _fsync_folder(folder: Path) -> None:
    """Make the renames durable: a crash just after must not bring back the old names."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
