"""The store of decoded images (ablate.data.decoded) and CocoDetection reading through it
(data.cache_images): same pixels as decoding each file, built once, rebuilt when it cannot be trusted.

Every test writes its own small image folder and cache folder under tmp_path.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
import shutil
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ablate.data import coco, decoded
from ablate.data.coco import CocoDetection, decode_image
from ablate.errors import DataError
from conftest import write_tiny_image

# name -> ((w, h), PIL mode): sizes differ, and every mode decode_image converts to RGB is there.
IMAGES = {
    "a.png": ((64, 48), "RGB"),
    "b.png": ((40, 60), "L"),
    "c.png": ((33, 17), "RGBA"),
    "d.jpg": ((48, 40), "RGB"),
    "e.png": ((20, 30), "P"),
    "f.bmp": ((25, 19), "RGB"),  # torchvision.io cannot: decode_image's PIL path
}


def _image_folder(root: Path) -> tuple[Path, list[str]]:
    folder = root / "images"
    folder.mkdir(parents=True)
    for seed, (name, (size, mode)) in enumerate(IMAGES.items()):
        write_tiny_image(folder / name, size, mode, seed=seed)
    return folder, list(IMAGES)


def _sizes(names: list[str]) -> np.ndarray:
    """int64 [N, 2] (h, w) of the images of IMAGES named."""
    return np.array([IMAGES[n][0][::-1] for n in names], dtype=np.int64).reshape(-1, 2)


def _open(folder: Path, names: list[str], cache: Path, decode=decode_image, **kw) -> decoded.DecodedImages:
    return decoded.open_images(folder, names, sizes=_sizes(names), decode=decode, cache_dir=cache, **kw)


class CountingDecoder:
    """decode_image that counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, path: Path) -> torch.Tensor:
        self.calls += 1
        return decode_image(path)


def _stores(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "decoded").iterdir() if p.is_dir())


def _assert_one_line(error: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message


# ----------------------------------------------------------------------------- contents


def test_pixels_are_byte_identical_to_decoding_each_file(tmp_path):
    folder, names = _image_folder(tmp_path)
    store = _open(folder, names, tmp_path / "cache")
    assert len(store) == len(names)
    for i, name in enumerate(names):
        expected = decode_image(folder / name)
        got = store[i]
        assert got.dtype == torch.uint8 and got.shape == expected.shape == (3, *_sizes([name])[0]), name
        assert torch.equal(got, expected), name
        assert got.stride() == expected.stride(), name  # same memory layout: the transforms take the same path
    assert store.sizes.tolist() == _sizes(names).tolist()


def test_store_layout_and_no_file_in_the_image_folder(tmp_path):
    folder, names = _image_folder(tmp_path)
    before = sorted(os.listdir(folder))
    store = _open(folder, names, tmp_path / "cache")
    assert sorted(os.listdir(folder)) == before  # nothing written next to the user's images
    assert store.folder.parent == tmp_path / "cache" / "decoded"
    assert (store.folder / "pixels").stat().st_size == 3 * int((store.sizes[:, 0] * store.sizes[:, 1]).sum())
    assert np.load(store.folder / "index.npy").dtype == np.int64
    assert json.loads((store.folder / "about.json").read_text())["count"] == len(names)
    assert not list(store.folder.glob("*.tmp-*"))


def test_each_read_is_a_fresh_writable_copy(tmp_path):
    folder, names = _image_folder(tmp_path)
    store = _open(folder, names, tmp_path / "cache")
    first = store[0]
    first.zero_()  # a transform writing in place must not reach the store
    assert torch.equal(store[0], decode_image(folder / names[0]))


def test_pickles_as_its_folder(tmp_path):
    folder, names = _image_folder(tmp_path)
    store = _open(folder, names, tmp_path / "cache")
    data = pickle.dumps(store)
    assert len(data) < 1000  # not the pixels
    again = pickle.loads(data)
    assert all(torch.equal(again[i], store[i]) for i in range(len(names)))


def test_no_image(tmp_path):
    folder, _ = _image_folder(tmp_path)
    store = _open(folder, [], tmp_path / "cache")
    assert len(store) == 0 and store.sizes.shape == (0, 2)


def test_silent_unless_asked(tmp_path, capfd):
    folder, names = _image_folder(tmp_path)
    _open(folder, names, tmp_path / "quiet")
    assert capfd.readouterr() == ("", "")
    shown = _open(folder, names, tmp_path / "shown", progress=True)  # a rich bar (transient)
    assert torch.equal(shown[5], decode_image(folder / names[5]))


# ----------------------------------------------------------------------------- built once, keyed by the files


def test_second_open_does_not_decode(tmp_path):
    folder, names = _image_folder(tmp_path)
    counting = CountingDecoder()
    first = _open(folder, names, tmp_path / "cache", decode=counting)
    assert counting.calls == len(names)
    mtime = (first.folder / "pixels").stat().st_mtime_ns
    second = _open(folder, names, tmp_path / "cache", decode=counting)
    assert counting.calls == len(names)
    assert second.folder == first.folder and (second.folder / "pixels").stat().st_mtime_ns == mtime
    assert len(_stores(tmp_path / "cache")) == 1


def test_edited_image_gives_a_new_store(tmp_path):
    folder, names = _image_folder(tmp_path)
    cache = tmp_path / "cache"
    old = _open(folder, names, cache)
    path = folder / names[0]
    stat = path.stat()
    write_tiny_image(path, IMAGES[names[0]][0], "RGB", seed=99)  # other pixels, same size in pixels
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # whatever the clock's resolution
    new = _open(folder, names, cache)
    assert new.folder != old.folder
    assert torch.equal(new[0], decode_image(path)) and not torch.equal(new[0], old[0])
    assert len(_stores(cache)) == 2


def test_key_covers_exactly_the_images_named(tmp_path):
    folder, names = _image_folder(tmp_path)
    keys = {decoded.store_key(folder, names), decoded.store_key(folder, names[:2]),
            decoded.store_key(folder, names[::-1]), decoded.store_key(folder, names, decoder="other")}
    assert len(keys) == 4
    assert decoded.store_key(folder, names) == decoded.store_key(folder / ".." / "images", names)


@pytest.mark.parametrize("damage", ["no index", "short pixels", "no pixels"])
def test_half_written_store_is_rebuilt(tmp_path, damage):
    folder, names = _image_folder(tmp_path)
    cache = tmp_path / "cache"
    store = _open(folder, names, cache)
    pixels, index = store.folder / "pixels", store.folder / "index.npy"
    del store
    if damage == "no index":
        index.unlink()
    elif damage == "short pixels":
        os.truncate(pixels, pixels.stat().st_size - 1)
    else:
        pixels.unlink()
    (pixels.parent / "pixels.tmp-123").write_bytes(b"left by a killed build")
    assert not decoded.is_complete(pixels.parent)
    counting = CountingDecoder()
    rebuilt = _open(folder, names, cache, decode=counting)
    assert counting.calls == len(names)
    assert decoded.is_complete(rebuilt.folder) and not list(rebuilt.folder.glob("*.tmp-*"))
    assert all(torch.equal(rebuilt[i], decode_image(folder / n)) for i, n in enumerate(names))


def _logged_decode(log: str, path: Path) -> torch.Tensor:
    """decode_image, slowed down (so that the two processes overlap) and logged, one line a file."""
    import time

    time.sleep(0.05)
    with open(log, "a") as f:
        f.write(f"{os.getpid()} {path.name}\n")
    return decode_image(path)


def _open_in_process(folder: str, names: list[str], cache: str, log: str, barrier, out: str) -> None:
    barrier.wait()  # both ask for the store at the same moment
    store = _open(Path(folder), names, Path(cache), decode=partial(_logged_decode, log))
    digest = hashlib.sha256(b"".join(store[i].numpy().tobytes() for i in range(len(store)))).hexdigest()
    Path(out).write_text(json.dumps({"folder": str(store.folder), "digest": digest}))


@pytest.mark.slow  # two processes importing torch: a race needs real processes
def test_two_processes_at_once_build_one_store(tmp_path):
    folder, names = _image_folder(tmp_path)
    cache, log = tmp_path / "cache", tmp_path / "decodes.log"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    procs = [context.Process(target=_open_in_process,
                             args=(str(folder), names, str(cache), str(log), barrier, str(tmp_path / f"{k}.json")))
             for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    results = [json.loads((tmp_path / f"{k}.json").read_text()) for k in range(2)]
    assert results[0] == results[1]
    expected = hashlib.sha256(b"".join(decode_image(folder / n).numpy().tobytes() for n in names)).hexdigest()
    assert results[0]["digest"] == expected
    assert _stores(cache) == [Path(results[0]["folder"])]
    decodes = log.read_text().split("\n")[:-1]
    assert len(decodes) == len(names)  # one process decoded, the other waited and mapped its store
    assert len({line.split()[0] for line in decodes}) == 1


# ----------------------------------------------------------------------------- errors


def test_not_enough_disk_space_is_one_line(tmp_path, monkeypatch):
    folder, names = _image_folder(tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**12, used=10**12 - 5000, free=5000))
    with pytest.raises(DataError) as e:
        _open(folder, names, cache)
    needed = 3 * int(np.prod(_sizes(names), axis=1).sum())
    _assert_one_line(e, str(cache / "decoded"), f"{needed:,} bytes needed", "5,000 free",
                     "data.cache_dir", "--set data.cache_images=false")
    assert not any(decoded.is_complete(s) for s in _stores(cache))


def test_corrupt_image_is_one_line_naming_it(tmp_path):
    folder, names = _image_folder(tmp_path)
    (folder / names[2]).write_bytes(b"this is not an image")
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as e:
        _open(folder, names, cache)
    _assert_one_line(e, str(folder / names[2]), "cannot decode image")
    (store,) = _stores(cache)
    assert not decoded.is_complete(store) and not list(store.glob("*.tmp-*"))


# ----------------------------------------------------------------------------- through CocoDetection


def _ds(root: Path, cache: Path, **kw) -> CocoDetection:
    return CocoDetection(root, "train", min_size=48, max_size=1000, cache_dir=cache, **kw)


def test_dataset_reads_the_same_samples_through_the_store(tiny_coco, tmp_path):
    plain = _ds(tiny_coco, tmp_path / "cache")
    cached = _ds(tiny_coco, tmp_path / "cache", cache_images=True)
    assert cached._store is not None and len(cached._store) == len(plain) == 4  # gray, JPEG, two sizes
    for i in range(len(plain)):
        image, target = cached[i]
        expected_image, expected_target = plain[i]
        assert torch.equal(cached._raw(i)[0], decode_image(tiny_coco / "train2017" / str(plain._files[i])))
        assert torch.equal(image, expected_image)
        assert torch.equal(target["boxes"], expected_target["boxes"])


def test_dataset_opens_a_built_store_without_decoding(tiny_coco, tmp_path, monkeypatch):
    _ds(tiny_coco, tmp_path / "cache", cache_images=True)
    counting = CountingDecoder()
    monkeypatch.setattr(coco, "decode_image", counting)
    ds = _ds(tiny_coco, tmp_path / "cache", cache_images=True)
    ds[0], ds[3]
    assert counting.calls == 0


def test_dataset_store_holds_only_the_first_max_images(tiny_coco, tmp_path):
    ds = _ds(tiny_coco, tmp_path / "cache", cache_images=True, max_images=2)
    assert len(ds._store) == 2
    full = _ds(tiny_coco, tmp_path / "cache", cache_images=True)
    assert full._store.folder != ds._store.folder
    assert torch.equal(full._raw(1)[0], ds._raw(1)[0])


def test_dataset_size_differing_from_the_annotation_is_one_line(tiny_coco, tmp_path):
    ann = tiny_coco / "annotations" / "instances_train2017.json"
    doc = json.loads(ann.read_text())
    doc["images"][1]["width"] = 41
    ann.write_text(json.dumps(doc))
    with pytest.raises(DataError) as e:
        _ds(tiny_coco, tmp_path / "cache", cache_images=True)
    _assert_one_line(e, str(tiny_coco / "train2017" / "000000000002.jpg"), "image is 40x60 pixels",
                     "says 41x60", "image id 2")
    # Fixed, the annotation reads the same store: the files did not change.
    doc["images"][1]["width"] = 40
    ann.write_text(json.dumps(doc))
    assert len(_stores(tmp_path / "cache")) == 1
    _ds(tiny_coco, tmp_path / "cache", cache_images=True)
    assert len(_stores(tmp_path / "cache")) == 1


def test_dataset_corrupt_image_is_one_line_at_construction(tiny_coco, tmp_path):
    image = tiny_coco / "train2017" / "000000000003.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError) as e:
        _ds(tiny_coco, tmp_path / "cache", cache_images=True)
    _assert_one_line(e, str(image), "cannot decode image")
