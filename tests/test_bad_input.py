"""Every kind of bad input we know of, run through the real CLI (`python cli.py ...` in a
subprocess): each must end with exit code != 0, no traceback, and exactly one `error:` line that
names the file, key or value at fault.

The same cases write the table of docs/bad-input.md, so its messages are the real ones:

    .venv/bin/python tests/test_bad_input.py          # rewrites the table in docs/bad-input.md
    ABLATE_WRITE_TABLE=1 .venv/bin/pytest tests/test_bad_input.py   # the same, from the test run

and `test_the_readme_table_is_the_real_output` fails when the table and the outputs part.
Commands run in a scratch folder with relative paths, so the messages are the same on every machine.
Cases that need a trained model share one, trained once (2 iterations on a 4-image COCO set).
The cases' processes run side by side, one per core (`run_cases`). Each is its own process, forked
from a zygote that imported torch and the command line once (tests/cli_zygote.py): started fresh,
each spent ~3.5 CPU seconds on imports, most of this file's minutes. Each case is still its own test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import cli_zygote  # noqa: E402
from conftest import write_tiny_coco  # noqa: E402

from ablate.errors import printable  # noqa: E402

TABLE_DOC = REPO / "docs" / "bad-input.md"  # the bad-input table (README.md points to it)
START, END = "<!-- bad-input:start -->", "<!-- bad-input:end -->"
SECRET = "s3cret"  # the password of the URLs below: it must never be printed
DEAD_SERVER = f"http://ablate:{SECRET}@127.0.0.1:9"  # nothing listens on port 9 (discard)


@dataclass
class Case:
    """One bad input: the command, the text its one error line must hold, and what else to check."""

    id: str
    kind: str  # its description in the table
    args: list[str]
    needles: tuple[str, ...]
    cwd: str = "."  # relative to the scratch folder
    env: dict[str, str] = field(default_factory=dict)
    exit_code: int = 1
    only_line: bool = True  # the error line is the whole output
    needs_model: bool = False
    # The folder (relative to the scratch folder) the command writes into, or whose contents its
    # outcome depends on. Cases naming the same folder run one after another, in CASES order, as
    # they did when every case ran alone; the others run at once. Found by listing the files each
    # case left behind; a new case that writes must say where.
    writes: str | None = None
    # Files (relative to the scratch folder) the user had before the command, which it must leave
    # byte for byte as they were (KEPT holds their contents).
    keeps: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()  # text the error line must not hold


TRAIN = ["train", "smoke", "--no-progress"]

CASES = [
    # --- seeds
    Case("seed-negative", "negative seed", [*TRAIN, "--seed", "-1"], ("--seed", "train.seed", "-1")),
    Case("seed-too-big", "seed >= 2**32", [*TRAIN, "--seed", "4294967296"], ("train.seed", "4294967296")),
    Case("seeds-toml-negative", "negative seed in a file's `seeds`", ["train", "seed-neg.toml"],
         ("seed-neg.toml", "'seeds'", "-1")),
    Case("seeds-toml-empty", "empty `seeds`", ["train", "seeds-empty.toml"], ("seeds-empty.toml", "'seeds'")),
    Case("seeds-count-negative", "`--seeds -3`", ["run", "smoke", "--seeds", "-3"], ("--seeds", "-3")),
    Case("seeds-count-zero", "`--seeds 0` (show)", ["show", "smoke", "--seeds", "0"], ("--seeds", "0")),
    Case("set-seed-negative", "negative seed by --set", [*TRAIN, "--set", "train.seed=-5"], ("train.seed", "-5")),
    # --- rich markup in names, values and paths
    Case("markup-name", "markup in an experiment name", ["train", "[/bold]"], ("'[/bold]'",)),
    Case("markup-value", "markup in a --set value", [*TRAIN, "--set", "loss.cls=[/red]"], ("loss.cls", "'[/red]'")),
    Case("markup-path", "markup in a data path", [*TRAIN, "--data", "coco:[red]nowhere"], ("[red]nowhere",)),
    Case("markup-key", "markup in a --set key", [*TRAIN, "--set", "[bold]x=1"], ("'[bold]x'",)),
    Case("nan-value", "NaN value", [*TRAIN, "--set", "loss.gamma=NaN"], ("loss.gamma", "nan")),
    Case("bbox-brackets", "a bbox that is not [x, y, w, h]", [*TRAIN, "--data", "coco:badbox"],
         ("instances_train2017.json", "[x, y, w, h]")),
    # --- config values
    Case("unknown-key", "unknown config key", [*TRAIN, "--set", "loss.gama=1"], ("loss.gama", "loss.gamma")),
    Case("wrong-type", "value of the wrong type", [*TRAIN, "--set", "train.iterations=many"],
         ("train.iterations", "many")),
    Case("set-no-equals", "--set without =", [*TRAIN, "--set", "loss.gamma"], ("--set", "loss.gamma")),
    Case("bad-choice", "value not among the choices", [*TRAIN, "--set", "loss.box=l3"], ("loss.box", "l3")),
    Case("alpha-range", "alpha outside [0, 1]", [*TRAIN, "--set", "loss.alpha=1.5"], ("loss.alpha",)),
    Case("head-channels-3", "`model.head_channels=3` (GroupNorm)", [*TRAIN, "--set", "model.head_channels=3"],
         ("model.head_channels", "3")),
    Case("head-channels-18", "head channels GroupNorm cannot split", [*TRAIN, "--set", "model.head_channels=18"],
         ("model.head_channels", "18")),
    Case("device", "`train.device=foo`", [*TRAIN, "--set", "train.device=foo"], ("train.device", "foo")),
    Case("min-size-0", "`data.min_size=0`", [*TRAIN, "--set", "data.min_size=0"], ("data.min_size", "0")),
    Case("max-size-negative", "negative `data.max_size`", [*TRAIN, "--set", "data.max_size=-5"],
         ("data.max_size", "-5")),
    Case("max-train-images", "negative `data.max_train_images`", [*TRAIN, "--set", "data.max_train_images=-1"],
         ("data.max_train_images", "-1")),
    Case("warmup-negative", "negative `train.warmup_iters`", [*TRAIN, "--set", "train.warmup_iters=-1"],
         ("train.warmup_iters", "-1")),
    Case("synth-size", "`synth.image_size=0`", ["data", "synth", "--no-progress", "--set", "synth.image_size=0"],
         ("synth.image_size",)),
    Case("num-scales-0", "no anchor scale", [*TRAIN, "--set", "model.num_scales=0"], ("model.num_scales",)),
    Case("batch-0", "batch size 0", [*TRAIN, "--set", "train.batch_size=0"], ("train.batch_size",)),
    Case("bad-preset", "unknown --preset", ["run", "smoke", "--preset", "huge"], ("--preset", "huge")),
    Case("bad-data-option", "--data neither synth nor coco:PATH", [*TRAIN, "--data", "imagenet"],
         ("--data", "imagenet")),
    # --- experiment files
    Case("unknown-experiment", "unknown experiment", ["train", "no-such-experiment"], ("no-such-experiment",)),
    Case("non-utf8", "experiment file not UTF-8", ["train", "latin1.toml"], ("latin1.toml", "UTF-8")),
    Case("malformed-toml", "malformed TOML", ["train", "malformed.toml"], ("malformed.toml", "TOML")),
    Case("unknown-top-key", "unknown key in a file", ["train", "unknown-key.toml"], ("unknown-key.toml", "grids")),
    Case("paper-table", "bad `report.paper_table`", ["show", "paper-table.toml"],
         ("paper-table.toml", "report.paper_table", "z")),
    Case("baseline", "`baseline` naming no cell", ["show", "baseline.toml"], ("baseline.toml", "baseline", "nope")),
    Case("list-bad-file", "one bad file in ./experiments (`ablate list`: the others are listed)", ["list"],
         ("broken.toml", "loss.cls"), cwd="listing", only_line=False),
    # --- data
    Case("images-empty", "`images: []`", [*TRAIN, "--data", "coco:noimages"],
         ("noimages/annotations/instances_train2017.json", "'images'")),
    Case("categories-empty", "`categories: []`", [*TRAIN, "--data", "coco:nocats"],
         ("nocats/annotations/instances_train2017.json", "'categories'")),
    Case("data-missing", "missing data folder", [*TRAIN, "--data", "coco:nowhere"], ("nowhere",)),
    Case("json-truncated", "truncated annotation JSON", [*TRAIN, "--data", "coco:truncated"],
         ("truncated/annotations/instances_train2017.json",)),
    # --- output folders
    Case("train-out-file", "train `--out` naming a file", [*TRAIN, "--out", "afile"], ("--out", "afile")),
    Case("out-dir-file", "`train.out_dir` under a file", [*TRAIN, "--set", "train.out_dir=afile/runs"],
         ("train.out_dir", "afile")),
    # --- checkpoints
    Case("ckpt-missing", "missing checkpoint", ["eval", "nothing.pt", "--no-progress"], ("nothing.pt",)),
    Case("ckpt-not-one", "a file that is no checkpoint", ["eval", "afile", "--no-progress"],
         ("afile", "not an ablate checkpoint")),
    Case("ckpt-model-mismatch", "checkpoint that does not fit the model (`--set model.num_scales=2`)",
         ["eval", "model.pt", "--no-progress", "--set", "model.num_scales=2"], ("model.pt", "cls_subnet"),
         needs_model=True),
    Case("ckpt-no-classes", "checkpoint without class names", ["eval", "noclass.pt", "--no-progress"],
         ("noclass.pt", "class_names"), needs_model=True),
    Case("ckpt-other-categories", "val set with other categories", ["eval", "model.pt", "--no-progress",
                                                                    "--data", "coco:othercats"],
         ("model.pt", "'cow'"), needs_model=True),
    Case("eval-out-file", "eval `--out` naming a file", ["eval", "model.pt", "--no-progress", "--out", "afile"],
         ("--out", "afile"), needs_model=True),
    Case("infer-out-file", "infer `--out` naming a file", ["infer", "model.pt", "in.png", "--out", "afile"],
         ("--out", "afile"), needs_model=True),
    Case("infer-overwrite-input", "infer `--out` in the input's folder", ["infer", "model.pt", "in.png", "--out", "."],
         ("in.png", "overwrite"), needs_model=True),
    Case("infer-same-stem", "two inputs with the same stem", ["infer", "model.pt", "a/img.png", "b/img.jpg",
                                                              "--out", "drawn"],
         ("a/img.png", "b/img.jpg", "drawn/img.png"), needs_model=True, writes="drawn"),
    Case("infer-missing-image", "missing input image", ["infer", "model.pt", "nothere.png", "--out", "drawn"],
         ("nothere.png",), needs_model=True, writes="drawn"),
    Case("infer-not-image", "input that is no image", ["infer", "model.pt", "notimage.png", "--out", "drawn"],
         ("notimage.png",), needs_model=True, writes="drawn"),  # creates drawn/
    Case("loss-cdf-out-file", "loss-cdf `--out` naming a file", ["analyze", "loss-cdf", "model.pt", "--out", "afile"],
         ("--out", "afile"), needs_model=True),
    Case("findings-reports-file", "findings `--reports` naming a file", ["findings", "--reports", "afile"],
         ("--reports", "afile")),
    Case("gammas", "`--gammas` not numbers", ["analyze", "loss-cdf", "model.pt", "--gammas", "a,b"],
         ("--gammas", "a,b")),
    # --- tracking store and queue
    Case("server-show", "unreachable tracking server (show)", ["show", "smoke"], ("tracking store", "127.0.0.1:9"),
         env={"MLFLOW_TRACKING_URI": DEAD_SERVER}),
    Case("server-run", "unreachable tracking server (run)", ["run", "smoke", "--no-progress"],
         ("tracking store", "127.0.0.1:9"), env={"MLFLOW_TRACKING_URI": DEAD_SERVER}),
    Case("server-report", "unreachable tracking server (report)", ["report", "smoke"],
         ("tracking store", "127.0.0.1:9"), env={"MLFLOW_TRACKING_URI": DEAD_SERVER}),
    Case("server-ui", "unreachable tracking server (ui)", ["ui"], ("tracking store", "127.0.0.1:9"),
         env={"MLFLOW_TRACKING_URI": DEAD_SERVER}),
    Case("store-under-file", "sqlite store under a file", ["show", "smoke"], ("tracking store", "afile"),
         env={"MLFLOW_TRACKING_URI": "sqlite:///afile/mlflow.db"}),
    Case("artifacts-file", "./mlartifacts is a file (checked before training)", ["run", "smoke", "--no-progress"],
         ("artifact store", "mlartifacts"), cwd="artifacts-file", writes="artifacts-file"),
    Case("queue-folder-file", "./.ablate is a file", ["run", "smoke", "--no-progress"], ("queue folder", ".ablate"),
         cwd="queue-file", writes="queue-file"),
    Case("queue-unreachable", "unreachable queue server",
         ["run", "smoke", "--storage", f"postgresql://ablate:{SECRET}@127.0.0.1:9/queue"], ("--storage", "127.0.0.1:9")),
    Case("grid-out-dir-file", "a grid's `train.out_dir` under a file (checked before any cell)",
         ["run", "smoke", "--no-progress", "--set", "train.out_dir=../afile/runs"], ("train.out_dir", "afile"),
         cwd="grid-out", only_line=False, writes="grid-out"),
    Case("checkpoint-every", "negative `--checkpoint-every`", ["run", "smoke", "--checkpoint-every", "-1"],
         ("--checkpoint-every",)),
    # --- issue 21, first group: these lost data or gave a wrong result without a word
    Case("infer-user-file", "infer `--out` holding a file of the user's named like an output",
         ["infer", "model.pt", "photos/photo.jpg", "--out", "photos"], ("photos/photo.png", "exists", "kept"),
         needs_model=True, keeps=("photos/photo.png",)),
    Case("infer-out-link", "infer `--out` holding a link to a file outside it",
         ["infer", "model.pt", "in.png", "--out", "trap"], ("trap/in.png", "link"), needs_model=True,
         keeps=("outside.png",)),
    Case("val-split-is-train", "`data.val_split` naming the train split (split files)",
         [*TRAIN, "--data", "coco:train=tiny/annotations/instances_train2017.json@tiny/train2017,"
          "val=tiny/annotations/instances_val2017.json@tiny/val2017", "--set", "data.val_split=train"],
         ("data.val_split", "'train'")),
    Case("name-not-utf8-train", "experiment file whose name is not UTF-8 (train)", ["train", "caf\udce9.toml"],
         ("caf\\udce9.toml", "not printable UTF-8")),
    Case("name-not-utf8-show", "experiment file whose name is not UTF-8 (show)", ["show", "caf\udce9.toml"],
         ("caf\\udce9.toml", "not printable UTF-8")),
    Case("storage-device", "`--storage` naming a device", ["run", "smoke", "--storage", "/dev/full"],
         ("--storage", "/dev/full", "URL")),
    Case("storage-not-url", "`--storage` neither URL nor journal", ["run", "smoke", "--storage", "not a url"],
         ("--storage", "'not a url'", "URL")),
    Case("max-seeds-huge", "`--max-seeds 1000`", ["run", "smoke", "--until-settled", "--max-seeds", "1000", "--dry-run"],
         ("--max-seeds 1000", "max_seeds must be <= 32", "1000"), absent=("/",)),
    Case("max-seeds-zero", "`--max-seeds 0` (refused before any store opens)",
         ["run", "smoke", "--until-settled", "--max-seeds", "0"], ("--max-seeds 0", "max_seeds=0"), absent=("/",),
         env={"MLFLOW_TRACKING_URI": DEAD_SERVER}),
    Case("infer-bomb", "a 20000x20000 px PNG of 60 bytes (infer)", ["infer", "model.pt", "bomb.png", "--out", "drawn"],
         ("bomb.png", "decompression-bomb"), needs_model=True, writes="drawn"),
    Case("train-bomb", "a 20000x20000 px PNG in a training set, images cached",
         [*TRAIN, "--data", "coco:bombset", "--set", "data.cache_images=true"],
         ("bombset/train2017/000000000001.png", "decompression-bomb")),
    # --- issue 21: COCO files
    Case("coco-id-huge", "an image `id` above 2**63", [*TRAIN, "--data", "coco:hugeid"],
         ("hugeid/annotations/instances_train2017.json", "image id", "'id'", "64-bit")),
    Case("coco-category-id-huge", "a `category_id` above 2**63", [*TRAIN, "--data", "coco:hugecat"],
         ("hugecat/annotations/instances_train2017.json", "annotation id 1", "'category_id'", "64-bit")),
    Case("coco-iscrowd-yes", '`iscrowd: "yes"`', [*TRAIN, "--data", "coco:crowdyes"],
         ("crowdyes/annotations/instances_train2017.json", "annotation id 1", "'iscrowd'", "'yes'")),
    Case("coco-width-nan", "image `width` NaN", [*TRAIN, "--data", "coco:nanwidth"],
         ("nanwidth/annotations/instances_train2017.json", "image id 1", "'width'", "nan")),
    Case("coco-height-inf", "image `height` Infinity", [*TRAIN, "--data", "coco:infheight"],
         ("infheight/annotations/instances_train2017.json", "image id 1", "'height'", "inf")),
    Case("coco-deep", "a JSON nested 100,000 deep", [*TRAIN, "--data", "coco:deepjson"],
         ("deepjson/annotations/instances_train2017.json", "nested too deeply")),
    Case("coco-duplicate-category", "a category id listed twice", [*TRAIN, "--data", "coco:dupcat"],
         ("dupcat/annotations/instances_train2017.json", "category id 3", "twice")),
    # --- issue 21: images
    Case("train-thin-image", "a 20000x20 px image in a training set", [*TRAIN, "--data", "coco:thinset"],
         ("thinset/train2017/000000000001.png", "20000x20", "data.max_size=128", "0 px", "image id 1")),
    Case("eval-thin-image", "a 20000x20 px image in the val split (eval)",
         ["eval", "model.pt", "--no-progress", "--data", "coco:thinval"],
         ("thinval/val2017/000000000010.png", "20000x20", "0 px"), needs_model=True),
    Case("infer-thin-image", "a 20x20000 px image (infer)", ["infer", "model.pt", "tall.png", "--out", "drawn"],
         ("tall.png", "20x20000", "0 px"), needs_model=True, writes="drawn"),
    # --- issue 21: Pascal VOC
    Case("voc-box-inf", "a VOC box with an `inf` corner", [*TRAIN, "--data", "voc:vocinf"],
         ("vocinf/Annotations/000005.xml", "object #1", "<xmin>", "'inf'")),
    Case("voc-box-nan", "a VOC box with a `nan` corner", [*TRAIN, "--data", "voc:vocnan"],
         ("vocnan/Annotations/000005.xml", "object #1", "<ymax>", "'nan'")),
    Case("voc-split-folder", "`ImageSets/Main/val.txt` a folder", [*TRAIN, "--data", "voc:vocdir"],
         ("vocdir/ImageSets/Main/val.txt", "a folder")),
    Case("voc-split-latin1", "a VOC split file in Latin-1", [*TRAIN, "--data", "voc:voclatin"],
         ("voclatin/ImageSets/Main/train.txt", "UTF-8")),
    Case("voc-split-traversal", "a VOC split line `../Annotations/000005`", [*TRAIN, "--data", "voc:voctrav"],
         ("voctrav/ImageSets/Main/train.txt", "'../Annotations/000005'", "holds a path")),
    Case("voc-size-names-xml", "a VOC image of another size than its XML says", [*TRAIN, "--data", "voc:vocsize"],
         ("vocsize/JPEGImages/000005.jpg", "vocsize/Annotations/000005.xml says 64x48")),
    # --- issue 21: files and folders
    Case("checkpoint-dir-file", "`--checkpoint-dir` naming a file", ["run", "smoke", "--checkpoint-dir", "afile"],
         ("--checkpoint-dir", "afile is a file")),
    Case("checkpoint-dir-device", "`--checkpoint-dir /dev/full`", ["run", "smoke", "--checkpoint-dir", "/dev/full"],
         ("--checkpoint-dir", "/dev/full is not a folder")),
    Case("infer-out-system", "infer `--out` under a system path no one may write", ["infer", "model.pt", "in.png",
                                                                                     "--out", "/sys/ablate-out"],
         ("--out", "/sys")),
    Case("list-link-loop", "`./experiments` a link to itself (`ablate list`)", ["list"],
         ("experiments", "link that leads to no folder"), cwd="loop"),
    Case("experiment-is-folder", "`experiments/adir.toml` a folder", ["train", "adir"],
         ("unknown experiment 'adir'",), cwd="adir", absent=("adir,", "known: adir")),
    # --- issue 21: config values
    Case("device-mps", "`train.device=mps` without MPS", [*TRAIN, "--set", "train.device=mps"],
         ("train.device", "mps")),
    Case("iterations-huge", "`train.iterations` 10**23", [*TRAIN, "--set", "train.iterations=100000000000000000000000"],
         ("train.iterations", "1e+23")),
    Case("toml-deep", "a TOML with arrays nested 1,000 deep", ["train", "deep.toml"], ("deep.toml", "nested too deeply")),
    Case("gamma-huge", "`loss.gamma=1e308`", [*TRAIN, "--set", "loss.gamma=1e308"], ("loss.gamma", "1e+308")),
    Case("iou-above-1", "IoU thresholds above 1 (no anchor can match)",
         [*TRAIN, "--set", "matcher.fg_iou_thresh=1.5", "--set", "matcher.bg_iou_thresh=1.2"],
         ("matcher.fg_iou_thresh", "1.5")),
    Case("num-workers-negative", "`data.num_workers=-1`", [*TRAIN, "--set", "data.num_workers=-1"],
         ("data.num_workers", "-1")),
    Case("num-scales-huge", "`model.num_scales=1000`", [*TRAIN, "--set", "model.num_scales=1000"],
         ("model.num_scales", "1000")),
    Case("image-size-huge", "`data.min_size=data.max_size=100000`",
         [*TRAIN, "--set", "data.min_size=100000", "--set", "data.max_size=100000"], ("data.min_size", "100000")),
    Case("synth-size-huge", "`synth.image_size=100000`",
         ["data", "synth", "--no-progress", "--set", "synth.image_size=100000"], ("synth.image_size", "4096")),
    Case("synth-objects-huge", "`synth.max_objects=100000`",
         ["data", "synth", "--no-progress", "--set", "synth.max_objects=100000"], ("synth.max_objects", "100")),
    # --- issue 21: scale
    Case("show-million-cells", "`ablate show` of a grid of 10**6 cells", ["show", "million.toml"],
         ("million.toml", "1,000,000 cells")),
    Case("show-many-variants", "`ablate show` of 30,000 variants (a file of 100,000 passes 1 MiB: refused as such)",
         ["show", "variants.toml"], ("variants.toml", "30,000 cells")),
    Case("show-seeds-10000", "`ablate show smoke --seeds 10000`", ["show", "smoke", "--seeds", "10000"],
         ("--seeds", "10,000 seeds", "more than one grid may plan (1,000)")),
    # --- issue 21: names and ports
    Case("out-name-too-long", "an `--out` name of 300 bytes (train)", [*TRAIN, "--out", "o" * 300],
         ("--out", "300 bytes")),
    Case("infer-out-name-too-long", "an `--out` name of 300 bytes (infer)",
         ["infer", "model.pt", "in.png", "--out", "o" * 300], ("--out", "300 bytes")),
    Case("report-out-name-too-long", "an `--out` name of 300 bytes (report)", ["report", "smoke", "--out", "o" * 300],
         ("--out", "300 bytes")),
    Case("experiment-name-too-long", "an experiment name of 300 bytes", ["train", "e" * 300],
         ("unknown experiment 'eeee",)),
    Case("data-name-too-long", "a `--data` folder name of 300 bytes", [*TRAIN, "--data", "coco:" + "d" * 300],
         ("data.root", "300 bytes")),
    Case("port-too-big", "`ablate ui --port 70000`", ["ui", "--port", "70000"], ("--port", "70000")),
    Case("port-negative", "`ablate ui --port -1`", ["ui", "--port", "-1"], ("--port", "-1")),
    Case("port-zero", "`ablate ui --port 0`", ["ui", "--port", "0"], ("--port", "got 0")),
    # --- issue 21: search
    Case("search-seed-negative", "`ablate search --seed -1`", ["search", "smoke", "--seed", "-1"], ("--seed", "-1")),
    Case("search-low-above-high", "a search space with low > high", ["search", "lowhigh.toml"],
         ("lowhigh.toml", "search.space.loss.gamma", "above high")),
    Case("search-metric", 'search `metric = "XP"`', ["search", "metric.toml"], ("metric.toml", "search.metric", "'XP'")),
    Case("search-trials-negative", "`ablate search --trials -1`", ["search", "smoke", "--trials", "-1"],
         ("--trials", "-1")),
    Case("search-jobs-negative", "`ablate search --jobs -3`", ["search", "smoke", "--jobs", "-3"], ("--jobs", "-3")),
    # --- issue 21: silently accepted before
    Case("experiment-empty", "a 0-byte experiment file", ["train", "empty.toml"], ("empty.toml", "declares nothing")),
    Case("seeds-duplicate", "`seeds = [0, 0]`", ["train", "seeds-dup.toml"], ("seeds-dup.toml", "'seeds'", "twice")),
    Case("gpus-per-cell-negative", "`--gpus-per-cell -1`", ["run", "smoke", "--gpus-per-cell", "-1"],
         ("--gpus-per-cell", "-1")),
    Case("gammas-nan", "`--gammas nan`", ["analyze", "loss-cdf", "model.pt", "--gammas", "nan"], ("--gammas", "nan")),
    Case("score-min-nan", "`--score-min nan`", ["infer", "model.pt", "in.png", "--score-min", "nan"],
         ("--score-min", "nan")),
    # --- issue 21: messages
    Case("toml-bom", "a TOML file starting with a UTF-8 BOM", ["train", "bom.toml"], ("bom.toml", "BOM")),
    Case("value-big", "a 1 MB value in an experiment file (cut in the middle)", ["train", "big-value.toml"],
         ("big-value.toml", "loss.cls", "characters cut")),
    Case("cell-name-escape", "an escape sequence in a cell name", ["show", "escape.toml"],
         ("escape.toml", "\\x1b", "control character")),
    # --- issue 21: stores
    Case("mlflow-postgres-closed", "tracking store on PostgreSQL, port closed", ["show", "smoke"],
         ("tracking store", "127.0.0.1:9"), env={"MLFLOW_TRACKING_URI": f"postgresql://ablate:{SECRET}@127.0.0.1:9/mlflow"}),
    # --- a grid whose cell fails: the grid goes on, and the reason is printed, not only stored
    Case("grid-cell-fails", "a grid cell that fails (a corrupt image)", ["run", "../fail-cell.toml", "--no-progress"],
         ("fail-cell", "failed", "000000000001.png"), cwd="grid", exit_code=4, only_line=False, writes="grid"),
]


# ----------------------------------------------------------------------------- the scratch folder


def make_workspace(root: Path) -> Path:
    """Every file the cases name, under `root`."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    (root / "afile").write_text("a file where a folder or checkpoint is expected\n")
    files = {
        "seed-neg.toml": 'preset = "tiny"\nseeds = [-1]\n',
        "seeds-empty.toml": 'preset = "tiny"\nseeds = []\n',
        "malformed.toml": 'preset = "tiny"\nseeds = [0\n',
        "unknown-key.toml": 'preset = "tiny"\ngrids = 3\n',
        "paper-table.toml": 'preset = "tiny"\n[report]\npaper_table = "z"\n',
        "baseline.toml": 'preset = "tiny"\nbaseline = "nope"\n[grid]\n"loss.gamma" = [1.0, 2.0]\n',
        "listing/experiments/broken.toml": 'preset = "tiny"\n[config]\nloss.cls = 3\n',
        "listing/experiments/fine.toml": 'description = "a [bracketed] description"\npreset = "tiny"\n',
        "artifacts-file/mlartifacts": "not a folder\n",
        "queue-file/.ablate": "not a folder\n",
        "fail-cell.toml": ('preset = "tiny"\ndata = "coco:../corrupt"\n[config]\ntrain.iterations = 2\n'
                           'train.batch_size = 2\ndata.min_size = 64\ndata.max_size = 64\n'),
        "notimage.png": "not an image\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "latin1.toml").write_bytes('description = "caf\u00e9"\npreset = "tiny"\n'.encode("latin-1"))
    (root / os.fsdecode(b"caf\xe9.toml")).write_text('preset = "tiny"\n')  # a Latin-1 file name
    for name, data in KEPT.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    Image.new("RGB", (64, 48), (90, 140, 60)).save(root / "photos" / "photo.jpg")
    (root / "trap").mkdir()
    (root / "trap" / "in.png").symlink_to(Path("..") / "outside.png")
    (root / "bomb.png").write_bytes(png_header(20000, 20000))
    write_tiny_coco(root / "bombset")
    (root / "bombset" / "train2017" / "000000000001.png").write_bytes(png_header(20000, 20000))
    make_issue_21_inputs(root)
    _edit_annotations(root / "bombset", "train", lambda d: d["images"][0].update(width=20000, height=20000))
    (root / "grid").mkdir(exist_ok=True)
    (root / "grid-out").mkdir(exist_ok=True)
    for name in ("tiny", "noimages", "nocats", "othercats", "truncated", "badbox", "corrupt"):
        write_tiny_coco(root / name)
    _edit_annotations(root / "noimages", "train", lambda d: d.update(images=[], annotations=[]))
    _edit_annotations(root / "nocats", "train", lambda d: d.update(categories=[], annotations=[]))
    _edit_annotations(root / "othercats", "val", lambda d: d["categories"][1].update(name="cow"))
    _edit_annotations(root / "badbox", "train", lambda d: d["annotations"][0].update(bbox=[1, 2, 3]))
    ann = root / "truncated" / "annotations" / "instances_train2017.json"
    ann.write_text(ann.read_text()[:-20])
    (root / "corrupt" / "train2017" / "000000000001.png").write_bytes(b"not an image at all")
    Image.new("RGB", (64, 48), (40, 90, 160)).save(root / "in.png")
    for folder, name in (("a", "img.png"), ("b", "img.jpg")):
        (root / folder).mkdir(exist_ok=True)
        Image.new("RGB", (64, 48), (90, 40, 160)).save(root / folder / name)
    return root


def _png(size: tuple[int, int], color: tuple[int, int, int], **params) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG", **params)
    return buffer.getvalue()


# The user's files that cases must keep (Case.keeps): their photo beside a JPEG of the same stem, and
# a file outside --out that a link in --out points to.
KEPT = {"photos/photo.png": _png((32, 24), (200, 30, 30)), "outside.png": _png((16, 16), (10, 10, 10))}


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height RGB pixels and holds none (its data chunk is empty): a
    decoder that believed it would allocate 3 * width * height bytes; here it costs nothing."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def make_issue_21_inputs(root: Path) -> None:
    """The bad inputs of issue 21's list, each small: nothing here is allocated at the size it declares."""
    from PIL import Image

    from test_data_voc import write_tiny_voc

    edits = {
        "hugeid": ("train", lambda d: d["images"][0].update(id=2**64)),
        "hugecat": ("train", lambda d: d["annotations"][0].update(category_id=2**64)),
        "crowdyes": ("train", lambda d: d["annotations"][0].update(iscrowd="yes")),
        "nanwidth": ("train", lambda d: d["images"][0].update(width=float("nan"))),
        "infheight": ("train", lambda d: d["images"][0].update(height=float("inf"))),
        "dupcat": ("train", lambda d: d["categories"].append({"id": 3, "name": "cow"})),
        "thinset": ("train", lambda d: d["images"][0].update(width=20000, height=20)),
        "thinval": ("val", lambda d: d["images"][0].update(width=20000, height=20)),
    }
    for name, (split, edit) in edits.items():
        write_tiny_coco(root / name)
        _edit_annotations(root / name, split, edit)
    Image.new("RGB", (20000, 20), (50, 50, 50)).save(root / "thinset" / "train2017" / "000000000001.png")
    Image.new("RGB", (20000, 20), (50, 50, 50)).save(root / "thinval" / "val2017" / "000000000010.png")
    Image.new("RGB", (20, 20000), (50, 50, 50)).save(root / "tall.png")
    write_tiny_coco(root / "deepjson")
    depth = 100_000
    (root / "deepjson" / "annotations" / "instances_train2017.json").write_text(
        '{"images": ' + "[" * depth + "]" * depth + ', "annotations": [], "categories": []}')
    vocs = {}
    for name in ("vocinf", "vocnan", "vocdir", "voclatin", "voctrav", "vocsize"):
        voc = write_tiny_voc(root / f"{name}-devkit")
        (root / name).symlink_to(voc.relative_to(root))  # a short name for the table
        vocs[name] = voc
    for name, tag in (("vocinf", "<xmin>5</xmin>"), ("vocnan", "<ymax>16</ymax>")):
        xml = vocs[name] / "Annotations" / "000005.xml"
        value = tag.replace("5", "inf").replace("16", "nan") if name == "vocinf" else tag.replace("16", "nan")
        xml.write_text(xml.read_text().replace(tag, value, 1))
    (vocs["vocdir"] / "ImageSets" / "Main" / "val.txt").unlink()
    (vocs["vocdir"] / "ImageSets" / "Main" / "val.txt").mkdir()
    (vocs["voclatin"] / "ImageSets" / "Main" / "train.txt").write_bytes("000005\ncaf\u00e9\n".encode("latin-1"))
    (vocs["voctrav"] / "ImageSets" / "Main" / "train.txt").write_text("000005\n../Annotations/000005\n")
    Image.new("RGB", (30, 30)).save(vocs["vocsize"] / "JPEGImages" / "000005.jpg")
    (root / "loop").mkdir()
    (root / "loop" / "experiments").symlink_to("experiments")
    (root / "adir" / "experiments" / "adir.toml").mkdir(parents=True)
    texts = {
        "deep.toml": 'preset = "tiny"\n[config]\n"model.aspect_ratios" = ' + "[" * 1000 + "]" * 1000 + "\n",
        "million.toml": 'preset = "tiny"\n[grid]\n' + "".join(
            f'"{key}" = [{", ".join(str(v) for v in values)}]\n' for key, values in (
                ("loss.gamma", range(100)), ("loss.alpha", [i / 100 for i in range(100)]), ("train.lr", [
                    0.001 * (i + 1) for i in range(100)]))),
        "variants.toml": 'preset = "tiny"\n' + '[[variants]]\n"loss.gamma" = 1\n' * 30_000,
        "lowhigh.toml": 'preset = "tiny"\n[search]\nmetric = "AP"\n[search.space]\n'
                        '"loss.gamma" = { low = 5.0, high = 1.0 }\n',
        "metric.toml": 'preset = "tiny"\n[search]\nmetric = "XP"\n[search.space]\n'
                       '"loss.gamma" = { low = 0.0, high = 5.0 }\n',
        "empty.toml": "",
        "big-value.toml": 'preset = "tiny"\n[config]\nloss.cls = "' + "x" * 1_000_000 + '"\n',
        "seeds-dup.toml": 'preset = "tiny"\nseeds = [0, 0]\n',
        "escape.toml": 'preset = "tiny"\n[[variants]]\nname = "\\u001b[31mred"\n"loss.gamma" = 1.0\n',
    }
    for name, text in texts.items():
        (root / name).write_text(text)
    (root / "bom.toml").write_bytes(b"\xef\xbb\xbf" + b'preset = "tiny"\n')


def _edit_annotations(root: Path, split: str, edit) -> None:
    path = root / "annotations" / f"instances_{split}2017.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def train_model(root: Path) -> None:
    """model.pt (2 iterations on the tiny COCO set) and noclass.pt, the same without class names."""
    out = root / "model-run"
    result = run_cli(["train", "smoke", "--no-progress", "--data", "coco:tiny", "--out", "model-run",
                      "--set", "train.iterations=2", "--set", "train.batch_size=2",
                      "--set", "data.min_size=64", "--set", "data.max_size=64"], root)
    assert result.returncode == 0, result.stderr
    (run_dir,) = out.iterdir()
    (root / "model.pt").write_bytes((run_dir / "checkpoint.pt").read_bytes())
    import torch

    ckpt = torch.load(root / "model.pt", weights_only=True)
    del ckpt["class_names"]
    torch.save(ckpt, root / "noclass.pt")


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python cli.py *args` in its own process, forked from a zygote (tests/cli_zygote.py: the
    imports done once, not in each of the 135 commands)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "ABLATE_STORAGE")}
    environ.update(PYTHONPATH=str(REPO), COLUMNS="200", **(env or {}))
    return cli_zygote.run(args, cwd, environ, timeout=300)


@dataclass
class Outcome:
    """What one case's command did: the finished process and its wall seconds."""

    result: subprocess.CompletedProcess
    seconds: float


def run_case(case: Case, root: Path) -> Outcome:
    t0 = time.monotonic()
    result = run_cli(case.args, root / case.cwd, case.env)
    return Outcome(result, time.monotonic() - t0)


def run_cases(cases: list[Case], root: Path) -> dict[str, Outcome | Exception]:
    """Run `cases` in the scratch folder `root` (make_workspace's), as many at once as the machine
    has cores; case id -> its Outcome, or the exception that kept it from one (its test raises it,
    the other cases go on).

    The model is trained in the pool beside the cases that do not need it (none of those reads
    model-run/, model.pt or noclass.pt); the cases that need it start once it is written."""
    outcomes: dict[str, Outcome | Exception] = {}
    chains: dict[tuple[str, str], list[Case]] = {}  # cases writing one folder: one chain, run in order
    for case in cases:
        chains.setdefault(("writes", case.writes) if case.writes else ("case", case.id), []).append(case)

    def run_chain(chain: list[Case], trained) -> None:
        for case in chain:
            try:
                if case.needs_model:
                    trained.result()  # the training's own error, if it failed, is this case's
                outcomes[case.id] = run_case(case, root)
            except Exception as e:  # noqa: BLE001 (reported by the case's test)
                outcomes[case.id] = e

    # The threads only wait on their subprocesses: one per core keeps every core busy.
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        trained = pool.submit(train_model, root) if any(c.needs_model for c in cases) else None
        # Submitted in this order and started first come, first served: the chains that need the model
        # start after every other one, by when the training (submitted first) is long done.
        ordered = sorted(chains.values(), key=lambda chain: any(c.needs_model for c in chain))
        try:
            for future in [pool.submit(run_chain, chain, trained) for chain in ordered]:
                future.result()
        except BaseException:  # Ctrl-C: the cases not yet started never start
            pool.shutdown(cancel_futures=True)
            raise

    return outcomes


# ----------------------------------------------------------------------------- the checks


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]


def check(case: Case, result: subprocess.CompletedProcess, seconds: float) -> str:
    """Assert the case's contract; returns its error message (without 'error: '). `seconds` is only
    shown: a busy machine stretches it (how long a server is waited for is set in the code, and
    tested there: tests/test_tracking.py, tests/test_scheduling.py)."""
    output = result.stdout + result.stderr
    assert result.returncode == case.exit_code, f"{output}\n(after {seconds:.1f} s)"
    assert "Traceback" not in output, output
    errors = error_lines(result)
    assert len(errors) == 1, output
    if case.only_line:
        assert [line for line in output.splitlines() if line.strip()] == errors, output
    for needle in case.needles:
        assert needle in errors[0], errors[0]
    for text in case.absent:
        assert text not in errors[0], errors[0]
    assert SECRET not in output, output
    return errors[0][len("error: "):]


MESSAGES: dict[str, str] = {}  # case id -> message, filled by the tests, read by the table check


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("bad-input"))


def checked(case: Case, outcome: Outcome | Exception) -> str:
    """`check` of a case's outcome from run_cases (re-raising what kept it from running)."""
    if isinstance(outcome, Exception):
        raise outcome
    return check(case, outcome.result, outcome.seconds)


def _case_of(item: pytest.Item) -> Case | None:
    callspec = getattr(item, "callspec", None)
    case = callspec.params.get("case") if callspec else None
    return case if isinstance(case, Case) else None


@pytest.fixture(scope="module")
def outcomes(request, workspace: Path) -> dict[str, Outcome | Exception]:
    """The cases of this session's tests (all, or those -k picked), run at once before the first
    test checks its own; the model is trained only if one of them needs it."""
    cases = [case for case in map(_case_of, request.session.items) if case is not None]
    with pytest.MonkeyPatch.context() as mp:
        # conftest's one_worker_by_default is set per test, after module fixtures like this one: set here
        # too, so the grid cases run their cells in their own process as they did inside their tests.
        mp.setenv("ABLATE_JOBS", "1")
        return run_cases(cases, workspace)


# The first case's test sets up the module's `outcomes`: every case, two at a time, 9-16 minutes on a
# shared 2-core machine; the rest only check what it recorded.
@pytest.mark.timeout(2700)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line(case: Case, outcomes: dict[str, Outcome | Exception], workspace: Path):
    MESSAGES[case.id] = checked(case, outcomes[case.id])
    for name in case.keeps:  # nothing the user had is lost
        assert (workspace / name).read_bytes() == KEPT[name], f"{name} was changed"


def test_list_still_lists_the_good_experiments(workspace: Path):
    """Beside the bad file's error line: every other experiment, brackets in its text kept."""
    result = run_cli(["list"], workspace / "listing")
    assert result.returncode == 1
    for name in ("broken", "fine", "smoke", "a [bracketed] description"):
        assert name in result.stdout, result.stdout


def test_grid_failure_leaves_the_grid_recorded(workspace: Path):
    """The failed cell is also recorded in the store, with the same reason (the run above)."""
    if "grid-cell-fails" not in MESSAGES:
        pytest.fail("run the grid-cell-fails case first (it is in this file)")
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workspace / 'grid' / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "fail-cell"]
    (run,) = client.search_runs([experiment.experiment_id], filter_string="tags.`ablate.outcome` = 'failed'")
    assert run.data.tags["ablate.error"] in MESSAGES["grid-cell-fails"]


@pytest.mark.slow  # three and two processes importing MLflow / torch: a race needs real processes
def test_two_fresh_stores_at_once(tmp_path: Path):
    """Three processes opening one fresh sqlite store at once (two `ablate run` in a new folder):
    MLflow's schema migration raced and one failed; the lock file makes the others wait."""
    code = "import sys; from ablate.tracking import init_store; init_store(sys.argv[1]); print('ok')"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert all(out.strip() == "ok" for out, _ in outputs), outputs


# ----------------------------------------------------------------------------- issue 21: nothing lost


def test_detections_json_is_written_atomically(tmp_path: Path):
    """A write that fails half-way (a full disk; here a record that cannot be serialised) leaves the
    previous detections.json whole, and no temporary file, as eval.json's writer does."""
    from ablate.evaluation import save_results

    path = tmp_path / "detections.json"
    save_results([{"image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 0.5}], path)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        save_results([{"image_id": 1, "score": 0.5}, {"image_id": 2, "score": object()}], path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["detections.json"]


def test_an_ignored_sighup_stays_ignored():
    """`nohup`, and a grid's worker processes (their parent passes a hangup on as one SIGTERM): a
    SIGHUP set to be ignored is not taken over."""
    import signal

    from ablate import signals

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with signals.graceful_stop() as stop:
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            assert not stop()
    finally:
        signal.signal(signal.SIGHUP, before)


def test_sighup_is_a_polite_stop_like_sigterm():
    """A closed terminal or SSH session (SIGHUP) asks for the same polite stop; a second signal interrupts."""
    import signal

    from ablate import signals

    before = signal.getsignal(signal.SIGHUP)
    with signals.graceful_stop() as stop:
        os.kill(os.getpid(), signal.SIGHUP)
        assert stop()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(5)  # the handler raises at once; never reached
    assert signal.getsignal(signal.SIGHUP) == before


@pytest.mark.slow
def test_ablate_train_stopped_by_sighup_keeps_its_resume_checkpoint(tmp_path: Path):
    """`ablate train` whose terminal closes: exit 130, a resume checkpoint, no traceback (it used to die
    at once, with no checkpoint)."""
    import signal

    out = tmp_path / "runs"
    cmd = ["train", "smoke", "--out", str(out), "--no-progress", "--set", "train.iterations=400",
           "--checkpoint-every", "5"]
    proc = cli_zygote.start(cmd, Path.cwd(), {**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        while not list(out.glob("resume-*.json")):  # the first checkpoint: training is under way
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.05)
        proc.send_signal(signal.SIGHUP)
        output = proc.communicate(timeout=240)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    assert "interrupted at iteration" in output and "Traceback" not in output, output
    (sidecar,) = out.glob("resume-*.json")
    assert 5 <= json.loads(sidecar.read_text())["iteration"] < 400


def test_an_animated_gif_decodes_to_its_first_frame(tmp_path: Path):
    """torchvision decodes an animated GIF to [frames, 3, H, W], which the resize and the decoded-image
    store refused; PIL shows the first frame, and so does decode_image now."""
    from PIL import Image

    from ablate.data.coco import decode_image

    frames = [Image.new("RGB", (20, 10), color) for color in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    image = decode_image(tmp_path / "anim.gif")
    assert image.shape == (3, 10, 20)
    assert image[:, 5, 10].tolist() == [255, 0, 0]


def test_an_animated_gif_in_a_cached_training_split(tmp_path: Path):
    """A GIF of two frames among a split's images, read through the decoded-image store: its first
    frame (the store's decoder check refused the 4-d tensor with a ValueError)."""
    from PIL import Image

    from ablate.data.coco import CocoDetection

    root = write_tiny_coco(tmp_path / "gifset")
    frames = [Image.new("RGB", (64, 48), color) for color in ((0, 200, 0), (200, 0, 0))]
    frames[0].save(root / "train2017" / "000000000001.png", format="GIF", save_all=True,
                   append_images=frames[1:], duration=100)
    data = CocoDetection(root, "train", min_size=48, max_size=64, cache_images=True, cache_dir=tmp_path / "cache")
    image, target = data[0]
    assert image.shape == (3, 48, 64) and image[:, 10, 10].tolist() == [0, 200, 0]


def test_infer_draws_an_animated_gif(outcomes, workspace: Path):
    """`ablate infer` on an animated GIF (an expand RuntimeError before): its first frame, drawn."""
    from PIL import Image

    if not (workspace / "model.pt").exists():
        train_model(workspace)
    frames = [Image.new("RGB", (64, 48), color) for color in ((0, 200, 0), (200, 0, 0))]
    frames[0].save(workspace / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    result = run_cli(["infer", "model.pt", "anim.gif", "--out", "gif-drawn"], workspace)
    assert result.returncode == 0, result.stdout + result.stderr
    with Image.open(workspace / "gif-drawn" / "anim.png") as drawn:
        assert drawn.size[0] >= 64


def test_ui_on_a_port_in_use_is_one_line(tmp_path: Path):
    """`ablate ui` on a port something listens on printed the URL and exited 0; now one line, exit 1."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(["ui", "--port", str(port)], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output
    assert error_lines(result) == [line for line in output.splitlines() if line.strip()], output
    assert f"127.0.0.1:{port} is not free" in error_lines(result)[0]


def test_the_thin_image_rule_matches_torchvision_resize():
    """too_thin says 0 px exactly where torchvision's resize would make a side of 0 px."""
    from torchvision.transforms.v2.functional._geometry import _compute_resized_output_size

    from ablate.data.coco import too_thin

    for (h, w, min_size, max_size) in [(20, 20000, 128, 128), (20000, 20, 128, 128), (20, 2560, 128, 128),
                                       (20, 2561, 128, 128), (1, 1333, 800, 1333), (1, 1334, 800, 1333),
                                       (48, 64, 64, 64)]:
        size = min_size if max_size > min_size else None
        out = _compute_resized_output_size((h, w), size=size, max_size=max_size)
        assert bool(too_thin(h, w, max_size)) == (min(out) == 0), (h, w, out)


def test_a_database_tracking_store_is_tried_once_with_a_10_s_budget(monkeypatch):
    """MLFLOW_TRACKING_URI=postgresql://... to a closed port: MLflow retried with a growing back-off for
    over a minute. One connection with a 10 s connect timeout comes first, and MLflow never sees a
    store that refused it (the budget is the code's setting, not a stopwatch: see test_tracking)."""
    import sqlalchemy

    from ablate import tracking
    from ablate.errors import AblateError

    seen, created = [], []

    class Engine:
        def connect(self):
            raise sqlalchemy.exc.OperationalError("connect", {}, ConnectionRefusedError("refused"))

        def dispose(self):
            pass

    def create_engine(uri, **kwargs):
        seen.append(kwargs["connect_args"])
        return Engine()

    monkeypatch.setattr(sqlalchemy, "create_engine", create_engine)
    monkeypatch.setattr(tracking, "MlflowClient", lambda uri: created.append(uri))
    uri = f"postgresql+psycopg://ablate:{SECRET}@127.0.0.1:9/mlflow"
    with pytest.raises(AblateError, match=r"tracking store postgresql\+psycopg://ablate:\*\*\*@127\.0\.0\.1:9/mlflow"):
        tracking._check_store(uri)
    assert seen == [{"connect_timeout": 10}] and created == []


def test_credentials_are_masked_in_mlflow_logs():
    """MLflow's own log lines (retries quote the request URL) pass through the mask, and its
    'View run at URL' lines are switched off."""
    import logging

    import ablate.tracking  # noqa: F401  (installs the mask)

    record = logging.getLogger("mlflow.utils.rest_utils").makeRecord(
        "mlflow.utils.rest_utils", logging.WARNING, __file__, 1, "retrying %s", (f"{DEAD_SERVER}/api",), None)
    assert SECRET not in record.getMessage() and "ablate:***@127.0.0.1:9/api" in record.getMessage()
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"


# ----------------------------------------------------------------------------- the table of docs/bad-input.md


def readme_table(messages: dict[str, str]) -> str:
    """The Markdown table of the cases in `messages`, in CASES order."""
    rows = ["| # | bad input | command | exit | the one line it prints |", "|---:|:---|:---|---:|:---|"]
    for i, case in enumerate((c for c in CASES if c.id in messages), 1):
        env = "".join(f"{k}={v} " for k, v in case.env.items())
        where = f"(in {case.cwd}/) " if case.cwd != "." else ""
        command = printable(f"{where}{env}ablate {' '.join(_quote(a) for a in case.args)}")
        rows.append(f"| {i} | {case.kind} | `{command}` | {case.exit_code} | {_cell(messages[case.id])} |")
    return "\n".join(rows) + "\n"


def _quote(arg: str) -> str:
    if len(arg) > 80:  # a 300-byte name: its length is the point, not its letters
        return f"{arg[:12]}...({len(arg)} characters)"
    return f"'{arg}'" if re.search(r"[\s\[\]]", arg) or arg == "" else arg


def _cell(message: str) -> str:
    """A message as a table cell: object addresses vary from run to run; pipes would split the cell."""
    return re.sub(r"0x[0-9a-f]{6,}", "0x...", message).replace("|", "\\|")


def readme_rows() -> dict[str, str]:
    """The table's rows, by the command column (the table between the markers)."""
    text = TABLE_DOC.read_text()
    block = text[text.index(START) + len(START):text.index(END)]
    return {line.split(" | ")[2]: line for line in block.strip().splitlines()[2:]}


def test_the_readme_table_is_the_real_output():
    """Every case that ran in this session has its row in docs/bad-input.md, with the message it printed.
    With ABLATE_WRITE_TABLE=1 and every case run and passed, the table is written instead."""
    assert MESSAGES, "no case ran"
    if os.environ.get("ABLATE_WRITE_TABLE") == "1":
        assert set(MESSAGES) == {case.id for case in CASES}, "some cases failed or did not run"
        write_table(MESSAGES)
        return
    assert len(CASES) >= 40
    documented = readme_rows()
    for line in readme_table(MESSAGES).splitlines()[2:]:
        command = line.split(" | ")[2]
        assert command in documented, f"docs/bad-input.md has no row for {command}; run python tests/test_bad_input.py"
        expected = documented[command].split(" | ", 1)[1]
        assert line.split(" | ", 1)[1] == expected, "docs/bad-input.md's row differs; run python tests/test_bad_input.py"


def write_readme_table() -> None:
    """Run every case (as the tests do, at once) and put their table between the markers of docs/bad-input.md."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("ABLATE_CACHE", str(Path(tmp) / "cache"))
        root = make_workspace(Path(tmp) / "work")
        outcomes = run_cases(CASES, root)
        messages = {}
        for case in CASES:
            messages[case.id] = checked(case, outcomes[case.id])
            print(f"{case.id}: {messages[case.id]}")
    write_table(messages)


def write_table(messages: dict[str, str]) -> None:
    """`messages` (case id -> its line) as the table between the markers of docs/bad-input.md."""
    text = TABLE_DOC.read_text()
    head, tail = text[:text.index(START) + len(START)], text[text.index(END):]
    TABLE_DOC.write_text(f"{head}\n{readme_table(messages)}{tail}")


if __name__ == "__main__":
    write_readme_table()
