"""Typed run configuration: defaults, presets, `key=value` overrides, flattening and hashing.

The defaults are the paper's (Lin et al. 2017, sections 4-5 and Table 1) unless a comment says
otherwise. A *preset* is a named set of overrides for a budget (`tiny` for a laptop CPU, `paper`
for COCO on GPUs); an experiment file starts from a preset and overrides a handful of keys.
Keys are dotted (`loss.gamma`); an unknown key or a value of the wrong type is a `ConfigError`
naming the key and where it came from.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ablate.data import source as data_source
from ablate.errors import ConfigError


@dataclass
class SynthConfig:
    """The embedded procedural data set (ablate.data.synth); ignored for COCO."""

    seed: int = 0
    num_train: int = 4000
    num_val: int = 500
    image_size: int = 128
    # 5 shapes x 4 colours = 20 classes: enough classes that the sigmoid outputs are mostly
    # negatives, as with COCO's 80, while the set stays learnable in minutes.
    num_shapes: int = 5
    num_colors: int = 4
    min_objects: int = 1
    max_objects: int = 4
    # Small objects (6-24 px on 128 px images) are what makes the anchor set lopsided: a handful
    # of foreground anchors against ~3k background ones per image, times 20 classes.
    min_object_size: int = 6
    max_object_size: int = 24
    # Shapes of colours that are no class, and noise strokes: hard negatives.
    num_distractors: int = 3
    clutter: float = 0.5


@dataclass
class DataConfig:
    # "synth": the embedded procedural set, generated into `cache_dir` on first use.
    # "coco": a folder in the COCO 2017 layout (annotations/instances_{split}2017.json, {split}2017/),
    #   or, per split, any COCO-format annotation file and its image folder (the keys below).
    # "voc": a Pascal VOC folder (VOCdevkit/VOC2007: Annotations/, JPEGImages/, ImageSets/Main/{split}.txt).
    source: str = "synth"
    root: str = ""
    # A COCO-format file per split, as exported (Roboflow, CVAT, Label Studio): these replace the
    # 2017 layout under `root` for their split. The image folder defaults to the file's own folder
    # (Roboflow keeps them together). New keys: hashed only when set (HASH_IF_SET).
    train_annotations: str = ""
    train_images: str = ""
    val_annotations: str = ""
    val_images: str = ""
    cache_dir: str = ""  # empty: $ABLATE_CACHE or ~/.cache/ablate
    train_split: str = "train"
    val_split: str = "val"
    max_train_images: int = 0  # 0 = all; the first N images by id, for quick subsets
    max_val_images: int = 0
    categories: list[str] = field(default_factory=list)  # empty = all categories
    # Table 1 trains and tests at 600 px (shorter side); 1000 caps the longer side as in Detectron.
    min_size: int = 600
    max_size: int = 1000
    hflip_prob: float = 0.5  # the paper's only augmentation
    num_workers: int = 2
    # Read the images decoded, from one file under `cache_dir` (decoded/) that the first process decodes
    # them into and every process maps: for sets read every epoch (the embedded one is ~200 MB
    # decoded), so that decoding does not compete with the training step for the CPU.
    cache_images: bool = False


@dataclass
class ModelConfig:
    trunk: str = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101 | tiny
    # The trunk's starting weights: "" (random init), a path to a local state dict, or a torchvision
    # weights name for the ResNet trunk (IMAGENET1K_V1, DEFAULT or ResNet50_Weights.IMAGENET1K_V1),
    # downloaded once into torch.hub's cache ($TORCH_HOME/hub/checkpoints/).
    weights: str = ""
    # auto: frozen BatchNorm when the trunk starts from weights (their ImageNet statistics are worth
    # keeping, and detection batches are too small to re-estimate them), BatchNorm trained otherwise
    # (from scratch there is no statistic to freeze). Was "bn" before "auto" existed: see config_hash.
    trunk_norm: str = "auto"  # auto | bn | frozen_bn
    tiny_widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])
    fpn_channels: int = 256
    head_convs: int = 4
    head_channels: int = 256
    head_norm: str = "none"  # none (the paper) | gn (GroupNorm, used by small presets)
    # pi of the classification bias b = -log((1 - pi) / pi); None keeps b = 0 (prior ablation).
    prior: float | None = 0.01
    # Anchor side on P3 (doubling per level up to P7): 32 -> 512 as in the paper.
    anchor_size: float = 32.0
    num_scales: int = 3  # scales 2^(k / num_scales), k = 0..num_scales-1
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # h / w
    # Anchor centres at cell centres, as Detectron's (stride - 1) / 2.
    anchor_offset: float = 0.5
    # (wx, wy, ww, wh) of the box coder, shared by the regression targets and decoding: unit
    # weights as RetinaNet in Detectron and torchvision. Was loss.box_weights (see HASH_ALIASES).
    box_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])


@dataclass
class MatcherConfig:
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.4
    # Each ground-truth box also keeps the anchor(s) it overlaps best, so that no object goes
    # unassigned (Detectron and torchvision do this for RetinaNet).
    allow_low_quality: bool = True


@dataclass
class LossConfig:
    cls: str = "focal"  # ce | alpha_ce | focal | focal_star | ohem
    alpha: float = 0.25  # alpha_ce, focal (weight of positives; negatives get 1 - alpha)
    gamma: float = 2.0  # focal, focal_star
    beta: float = 1.0  # focal_star
    ohem_batch: int = 128  # examples kept per image
    ohem_nms: float = 0.7  # NMS IoU over the examples' boxes before the top-B selection
    ohem_fg_fraction: float | None = None  # 0.25 is the paper's "1:3"; None: no ratio forced
    normalizer: str = "batch"  # batch: total foreground anchors in the batch | ema: its EMA
    normalizer_momentum: float = 0.9
    box: str = "smooth_l1"  # smooth_l1 | l1 | giou
    smooth_l1_beta: float = 0.11  # the paper gives none; Detectron's RetinaNet used 0.11
    box_loss_weight: float = 1.0


@dataclass
class InferConfig:
    score_thresh: float = 0.05
    topk_candidates: int = 1000  # per level
    nms_thresh: float = 0.5
    detections_per_img: int = 100


@dataclass
class TrainConfig:
    batch_size: int = 16
    iterations: int = 90_000
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_factor: float = 1.0 / 3  # lr starts at lr * warmup_factor (Detectron)
    # Step decays at these fractions of the run: 60k and 80k of 90k in the paper.
    lr_steps: list[float] = field(default_factory=lambda: [2.0 / 3, 8.0 / 9])
    lr_decay: float = 0.1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    nproc: int = 1  # processes (DDP ranks) training one run on one machine; see ablate.distributed
    backend: str = "auto"  # torch.distributed backend: auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    amp: bool = True  # bf16 autocast, CUDA only
    channels_last: bool = True  # NHWC activations: faster convs on CUDA and on CPU (measured: R50 -7%, tiny -17%)
    checkpoint_every: int = 0  # 0: only at the end
    log_every: int = 10
    out_dir: str = "runs"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# Keys renamed since runs were recorded: new name -> the name the key had then. `config_hash` hashes
# a key under its old name, so every recorded run keeps its hash (and is still found done), and
# `from_dict` reads a checkpoint written under the old name. Add a rename here, never edit one.
HASH_ALIASES: dict[str, str] = {"model.box_weights": "loss.box_weights"}
_RENAMED = {old: new for new, old in HASH_ALIASES.items()}

# Keys added since runs were recorded, with the default they were added with: a config leaving one at
# that default hashes as it did before the key existed, so every recorded run keeps its hash.
SPLIT_FILE_KEYS = data_source.SPLIT_KEYS  # data.{train,val}_{annotations,images}
HASH_IF_SET: dict[str, Any] = {key: "" for key in SPLIT_FILE_KEYS}

# Keys that change where or how fast a run goes, never what it computes: left out of the hash.
UNHASHED_KEYS = frozenset({"train.out_dir", "train.log_every", "data.num_workers", "data.cache_dir",
                           "data.cache_images", "train.nproc", "train.backend"})

CHOICES: dict[str, tuple[str, ...]] = {
    "data.source": data_source.KINDS,
    "model.trunk": ("resnet18", "resnet34", "resnet50", "resnet101", "tiny"),
    "model.trunk_norm": ("auto", "bn", "frozen_bn"),
    "model.head_norm": ("none", "gn"),
    "loss.normalizer": ("batch", "ema"),
    "train.backend": ("auto", "gloo", "nccl"),
}

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's Table 1 setting on COCO: ResNet-50-FPN from ImageNet weights (frozen BN), 600 px,
    # 90k iterations of 16 images.
    "paper": {"model.weights": "IMAGENET1K_V1"},
    # A laptop-CPU budget on the embedded data set: a narrow residual trunk, 64-channel FPN and
    # 2-conv GroupNorm heads at 128 px. GroupNorm keeps the from-scratch heads trainable at
    # lr 0.01 for every loss; the schedule is set once for all losses, never per loss.
    "tiny": {
        "data.source": "synth",
        "data.min_size": 128,
        "data.max_size": 128,
        "data.num_workers": 0,  # with cached images the main process keeps up, and has both cores
        "data.cache_images": True,
        "model.trunk": "tiny",
        "model.fpn_channels": 64,
        "model.head_convs": 2,
        "model.head_channels": 64,
        "model.head_norm": "gn",
        "model.anchor_size": 12.0,
        "train.batch_size": 16,
        "train.iterations": 800,
        "train.warmup_iters": 100,
        "train.log_every": 10,
    },
}


def flatten(cfg: Config) -> dict[str, Any]:
    """{'section.key': value} for every field, lists as lists."""
    out: dict[str, Any] = {}
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            out[f"{section.name}.{f.name}"] = getattr(getattr(cfg, section.name), f.name)
    return out


def trunk_norm(model: ModelConfig) -> str:
    """The trunk's normalisation `model.trunk_norm` stands for: "auto" resolved by `model.weights`."""
    if model.trunk_norm != "auto":
        return model.trunk_norm
    return "frozen_bn" if model.weights else "bn"


def config_hash(cfg: Config) -> str:
    """A short stable hash of everything that can change a run's result (renamed keys under their
    old names, see HASH_ALIASES; keys added since, only when set, see HASH_IF_SET)."""
    flat = flatten(cfg)
    # What the trunk computes with: "auto" hashes as the norm it resolves to, so the configs recorded
    # when the default was "bn" (and no weights) keep their hash.
    flat["model.trunk_norm"] = trunk_norm(cfg.model)
    items = {HASH_ALIASES.get(k, k): v for k, v in flat.items()
             if k not in UNHASHED_KEYS and not (k in HASH_IF_SET and v == HASH_IF_SET[k])}
    return hashlib.sha1(json.dumps(items, sort_keys=True).encode()).hexdigest()[:12]


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def from_dict(nested: dict[str, dict[str, Any]], source: str = "config") -> Config:
    """Inverse of `to_dict`, validated (used to reload a checkpoint's config); keys under a name
    they had before a rename (HASH_ALIASES) are read under the new one."""
    flat = {f"{s}.{k}": v for s, section in nested.items() for k, v in section.items()}
    flat = {_RENAMED.get(k, k): v for k, v in flat.items()}
    return apply_overrides(Config(), flat, source)


def _field_type(key: str) -> Any:
    section, _, name = key.partition(".")
    hints = typing.get_type_hints(type(getattr(Config(), section)))
    return hints[name]


def _known_keys() -> set[str]:
    return set(flatten(Config()))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """`value` checked against the field type `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        # TOML has no null: "none" stands for None in experiment files.
        if type(None) in args and (value is None or value in ("none", "None", "null")):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key, source)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list of {inner.__name__}, got {value!r}")
        return [_coerce(v, inner, key, source) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{source}: '{key}' must be an int, got {value!r}")
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: '{key}' must be a finite number, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{source}: '{key}' must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def choices_of(key: str) -> tuple[str, ...] | None:
    """The values `key` may take, where it is a choice: the loss names come from the registries of
    ablate.losses (the one list of them; imported only when a loss is chosen, as it imports torch)."""
    if key in ("loss.cls", "loss.box"):
        from ablate import losses

        return tuple(losses.CLS_LOSSES if key == "loss.cls" else losses.BOX_LOSSES)
    return CHOICES.get(key)


def apply_overrides(cfg: Config, overrides: dict[str, Any], source: str) -> Config:
    """A copy of `cfg` with dotted-key `overrides` applied and validated.

    `source` names where the overrides came from (a file, `--set`), for the error message.
    """
    cfg = copy.deepcopy(cfg)
    known = _known_keys()
    for key, value in overrides.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key '{key}'{_suggest(key, known)}")
        value = _coerce(value, _field_type(key), key, source)
        choices = choices_of(key)
        if choices and value not in choices:
            raise ConfigError(f"{source}: '{key}' must be one of {', '.join(choices)}; got {value!r}")
        section, _, name = key.partition(".")
        setattr(getattr(cfg, section), name, value)
    _check_ranges(cfg, source)
    return cfg


def _suggest(key: str, known: set[str]) -> str:
    import difflib

    if key in _RENAMED:
        return f" (renamed: use '{_RENAMED[key]}')"
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


# NumPy's legacy seeding (np.random.seed) takes 0 <= seed < 2**32; torch and Python take more.
SEED_LIMIT = 2**32
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


# Upper bounds of what a key can make a run allocate or take, each far past any real setting, so that a
# typo is one line naming the key, not an allocator traceback or a run of years:
MAX_ITERATIONS = 10**8  # 1,100x the paper's 90k; 10**23 was accepted and trained
MAX_GAMMA = 100.0  # the paper's range is 0-5; 1e308 overflowed in the loss
MAX_ANCHOR_SHAPES = 16  # scales or ratios per location (the paper: 3 and 3); 1000 ended in an allocator error
# Image sides in pixels (the paper: 600-800 px, 1333 at most). 8192 px: ~1.1M anchors per image
# on P3-P7 with 9 shapes. 100000 px ended in an allocator error.
MAX_IMAGE_SIDE = 8192


def check_seed(seed: int, source: str, key: str = "train.seed") -> None:
    """A seed every RNG of a run accepts; else one ConfigError naming `key` and the value."""
    if not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"{source}: '{key}' must be in [0, 2**32), got {seed}")


def _group_norm_fits(channels: int) -> bool:
    """The heads' GroupNorm uses min(32, channels // 4) groups, which must divide `channels`."""
    groups = min(32, channels // 4)
    return groups >= 1 and channels % groups == 0


def _check_ranges(cfg: Config, source: str) -> None:
    check_seed(cfg.train.seed, source)
    checks = [
        ("train.device", DEVICE_PATTERN.fullmatch(cfg.train.device) is not None,
         f"auto, cpu, mps, cuda or cuda:N; got {cfg.train.device!r}"),
        ("data.min_size", cfg.data.min_size >= 1, f">= 1, got {cfg.data.min_size}"),
        ("data.max_size", cfg.data.max_size >= 1, f">= 1, got {cfg.data.max_size}"),
        ("data.max_train_images", cfg.data.max_train_images >= 0, f">= 0 (0: all), got {cfg.data.max_train_images}"),
        ("data.max_val_images", cfg.data.max_val_images >= 0, f">= 0 (0: all), got {cfg.data.max_val_images}"),
        ("data.num_workers", cfg.data.num_workers >= 0, f">= 0 (0: load in the training process), got "
                                                        f"{cfg.data.num_workers}"),
        ("data.val_split", cfg.data.val_split != cfg.data.train_split,
         f"another split than data.train_split ('{cfg.data.train_split}'): evaluating on the training images "
         "measures nothing"),
        ("train.iterations", cfg.train.iterations <= MAX_ITERATIONS,
         f"<= {MAX_ITERATIONS:,} (the paper trains 90,000), got {cfg.train.iterations:.3g}"),
        ("train.warmup_iters", cfg.train.warmup_iters >= 0, f">= 0, got {cfg.train.warmup_iters}"),
        ("train.checkpoint_every", cfg.train.checkpoint_every >= 0, f">= 0, got {cfg.train.checkpoint_every}"),
        ("model.fpn_channels", cfg.model.fpn_channels >= 1, f">= 1, got {cfg.model.fpn_channels}"),
        ("model.head_convs", cfg.model.head_convs >= 0, f">= 0, got {cfg.model.head_convs}"),
        ("model.head_channels", cfg.model.head_channels >= 1, f">= 1, got {cfg.model.head_channels}"),
        ("model.head_channels", cfg.model.head_norm != "gn" or cfg.model.head_convs == 0
         or _group_norm_fits(cfg.model.head_channels),
         f"at least 4 and divisible by its GroupNorm groups, min(32, channels // 4), with model.head_norm=gn; "
         f"got {cfg.model.head_channels}"),
        ("loss.alpha", 0.0 <= cfg.loss.alpha <= 1.0, "in [0, 1]"),
        ("loss.gamma", 0.0 <= cfg.loss.gamma <= MAX_GAMMA,
         f"in [0, {MAX_GAMMA:g}] (the paper tries 0-5; (1 - p)^gamma underflows past it), got {cfg.loss.gamma:g}"),
        ("loss.beta", abs(cfg.loss.beta) <= MAX_GAMMA, f"in [-{MAX_GAMMA:g}, {MAX_GAMMA:g}], got {cfg.loss.beta:g}"),
        ("model.prior", cfg.model.prior is None or 0.0 < cfg.model.prior < 1.0, "in (0, 1) or none"),
        # An IoU is in [0, 1]: a threshold above 1 matches no anchor, one below 0 every anchor.
        ("matcher.fg_iou_thresh", 0.0 < cfg.matcher.fg_iou_thresh <= 1.0,
         f"in (0, 1] (an IoU above 1 matches no anchor), got {cfg.matcher.fg_iou_thresh:g}"),
        ("matcher.bg_iou_thresh", 0.0 <= cfg.matcher.bg_iou_thresh <= cfg.matcher.fg_iou_thresh,
         f"in [0, matcher.fg_iou_thresh], got {cfg.matcher.bg_iou_thresh:g}"),
        ("model.num_scales", 1 <= cfg.model.num_scales <= MAX_ANCHOR_SHAPES,
         f"in 1..{MAX_ANCHOR_SHAPES}, got {cfg.model.num_scales}"),
        ("model.aspect_ratios", len(cfg.model.aspect_ratios) <= MAX_ANCHOR_SHAPES,
         f"at most {MAX_ANCHOR_SHAPES} ratios, got {len(cfg.model.aspect_ratios)}"),
        ("data.min_size", cfg.data.min_size <= MAX_IMAGE_SIDE, f"<= {MAX_IMAGE_SIDE}, got {cfg.data.min_size}"),
        ("data.max_size", cfg.data.max_size <= MAX_IMAGE_SIDE, f"<= {MAX_IMAGE_SIDE}, got {cfg.data.max_size}"),
        ("model.aspect_ratios", len(cfg.model.aspect_ratios) >= 1
         and all(r > 0 for r in cfg.model.aspect_ratios), "a non-empty list of positive ratios"),
        ("model.box_weights", len(cfg.model.box_weights) == 4, "a list of 4 numbers"),
        ("train.batch_size", cfg.train.batch_size >= 1, ">= 1"),
        ("train.iterations", cfg.train.iterations >= 1, ">= 1"),
        ("train.log_every", cfg.train.log_every >= 1, ">= 1"),
        ("train.lr", cfg.train.lr > 0, "> 0"),
        ("train.nproc", cfg.train.nproc >= 1, ">= 1"),
        ("loss.ohem_fg_fraction", cfg.loss.ohem_fg_fraction is None
         or 0.0 < cfg.loss.ohem_fg_fraction < 1.0, "in (0, 1) or none"),
    ]
    for key, ok, what in checks:
        if not ok:
            raise ConfigError(f"{source}: '{key}' must be {what}")
    for key in SPLIT_FILE_KEYS:  # a split's own files mean nothing to the other sources: say so, not ignore them
        if getattr(cfg.data, key.partition(".")[2]) and cfg.data.source != "coco":
            raise ConfigError(f"{source}: '{key}' is for data.source=coco, but data.source is {cfg.data.source}")


def parse_set(assignment: str) -> tuple[str, Any]:
    """'key=value' from the command line; the value is read as JSON when it parses
    (numbers, true/false, null, [lists]), `none` as None, else kept as a string."""
    if "=" not in assignment:
        raise ConfigError(f"--set: expected key=value, got '{assignment}'")
    key, _, raw = assignment.partition("=")
    raw = raw.strip()
    if raw.lower() in ("none", "null"):
        return key.strip(), None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def build_config(preset: str = "paper", overrides: dict[str, Any] | None = None,
                 source: str = "--set") -> Config:
    """The preset's config with `overrides` on top."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}' (known: {', '.join(PRESETS)})")
    cfg = apply_overrides(Config(), PRESETS[preset], f"preset {preset}")
    return apply_overrides(cfg, overrides or {}, source)
