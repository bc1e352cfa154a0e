"""Builders: the only place that reads a `Config` to make parts: data sets and loaders, the model
and its anchor generator, matcher, box coder, criterion, post-processing, optimiser and schedule.

Components take plain arguments with the paper's defaults; this module turns config sections into
those arguments, and edges (the runner, checkpoint loading, the CLI) call it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ablate.config import Config, DataConfig, TrainConfig, trunk_norm
from ablate.criterion import DetectionLoss
from ablate.data import coco, source, voc
from ablate.data.coco import Batch, CocoDetection, collate
from ablate.data.synth import SynthSpec, ensure_synth
from ablate.distributed import SINGLE, Ranks, rank_seed
from ablate.errors import ConfigError, DataError
from ablate.matching import BoxCoder, Matcher
from ablate.model import pretrained
from ablate.model.anchors import AnchorGenerator
from ablate.model.retinanet import RetinaNet
from ablate.postprocess import Postprocess


def synth_spec(cfg: Config) -> SynthSpec:
    return SynthSpec(**dataclasses.asdict(cfg.synth))


def cache_dir(cfg: DataConfig) -> Path | None:
    """`data.cache_dir`, None when empty (then $ABLATE_CACHE or ~/.cache/ablate)."""
    return Path(cfg.cache_dir) if cfg.cache_dir else None


def data_root(cfg: Config, progress: bool = True) -> Path | None:
    """The folder to read: the synth set (generated on first use), or `data.root` (COCO 2017 layout,
    or a VOC folder); None when COCO-format files name the splits (data.{train,val}_annotations)."""
    d = cfg.data
    if d.source == "synth":
        return ensure_synth(synth_spec(cfg), cache_dir(d), progress=progress)
    if d.root:
        return Path(d.root).expanduser()
    if d.source == "coco" and (d.train_annotations or d.val_annotations):
        return None
    if d.source == "voc":
        raise ConfigError("data.root: set it to the VOC folder (VOCdevkit/VOC2007) for data.source=voc "
                          f"(or use --data {source.VOC_FOLDER})")
    raise ConfigError(f"data.root: set it to the COCO folder for data.source=coco (or use --data "
                      f"{source.COCO_FOLDER}, or {source.COCO_FILES})")


def split_files(cfg: DataConfig, split: str) -> tuple[str, str]:
    """(annotation file, image folder) naming `split` by its own COCO-format files; ("", "") if none."""
    roles = {cfg.train_split: (cfg.train_annotations, cfg.train_images),
             cfg.val_split: (cfg.val_annotations, cfg.val_images)}
    return roles.get(split, ("", ""))


def _need_root(cfg: DataConfig, root: Path | None, split: str) -> Path:
    if root is None:
        role = "train" if split == cfg.train_split else "val"
        raise ConfigError(f"data.{role}_annotations: not set, and no data.root to find split '{split}' in "
                          f"(name both splits: --data {source.COCO_FILES})")
    return root


def check_split(cfg: DataConfig, root: Path | None, split: str) -> None:
    """Whether the files of `split` are there (no reading): one line now, before any work starts."""
    ann_file, img_dir = split_files(cfg, split)
    if cfg.source == "voc":
        voc.locate(_need_root(cfg, root, split), split)
    elif cfg.source == "coco" and ann_file:
        coco.check_files(ann_file, img_dir)
    else:
        coco.locate(_need_root(cfg, root, split), split)


def dataset_source(cfg: DataConfig, root: Path | None, split: str) -> Path | coco.Annotations:
    """What `CocoDetection` reads for `split`: a COCO 2017-layout folder, or annotations already read
    (a split's own COCO-format file, or a VOC split converted)."""
    ann_file, img_dir = split_files(cfg, split)
    if cfg.source == "voc":
        return voc.read_voc(_need_root(cfg, root, split), split)
    if cfg.source == "coco" and ann_file:
        return coco.read_files(ann_file, img_dir)
    return _need_root(cfg, root, split)


def build_dataset(cfg: DataConfig, root: Path | None, split: str, train: bool,
                  progress: bool = False) -> CocoDetection:
    """`split` as `CocoDetection`; `progress`: a bar while its decoded images are first built (data.cache_images)."""
    return CocoDetection(dataset_source(cfg, root, split), split, min_size=cfg.min_size, max_size=cfg.max_size,
                         hflip_prob=cfg.hflip_prob if train else 0.0,
                         max_images=cfg.max_train_images if train else cfg.max_val_images,
                         categories=cfg.categories, cache_images=cfg.cache_images, cache_dir=cache_dir(cfg),
                         progress=progress)


def check_same_classes(class_names: list[str], val_set: CocoDetection, trained_on: str) -> None:
    """The model's labels index `class_names`; a val split listing other categories (or another
    order) would score every detection against the wrong class."""
    if list(class_names) != list(val_set.category_names):
        raise DataError(f"{val_set.ann_file}: its categories {list(val_set.category_names)[:6]} differ from "
                        f"those of {trained_on} {list(class_names)[:6]} (same names, same order needed)")


def fetch_weights(cfg: Config) -> None:
    """The trunk's torchvision weights (`model.weights=IMAGENET1K_V1`) into torch.hub's cache now if
    they are not there: before a run folder or a grid's workers exist, so that offline is one line."""
    m = cfg.model
    if m.weights and pretrained.is_weights_name(m.weights):
        pretrained.fetch(m.trunk, m.weights)


class ShuffledBatches(torch.utils.data.Sampler[list[int]]):
    """Batches of a seeded shuffle of `num_samples` indices, one epoch per pass over the sampler,
    epoch after epoch; `start` (a batch count) begins the sequence anywhere, which is what lets a
    stopped run resume with the very batches it would have seen.

    The order is the one `DataLoader(shuffle=True, drop_last=True, generator=Generator().manual_seed(
    seed))` gave before this sampler, so every recorded run keeps its data: each epoch is one
    `randperm(num_samples)` from a single generator, cut into full batches. The sampler also makes
    the draws of that generator which that loader made and threw away: its workers' base seed before
    a permutation (on every pass without workers, only on the first with persistent ones:
    `seed_draw_every_epoch`), and a second randperm after each (RandomSampler's remainder, sliced
    to nothing). It replays the epochs before `start` to get there.

    On `world_size` processes (DDP) every rank draws the same order from the same seed and yields
    its contiguous slice (rank `rank`) of each global batch: what DistributedSampler does, but in
    the one-process order, so a run on N processes trains on exactly the batches of one process.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, *, start: int = 0,
                 seed_draw_every_epoch: bool = True, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ConfigError(f"train.batch_size: {batch_size} images do not split evenly over {world_size} "
                              "processes (the global batch is shared out); make it a multiple")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed_draw_every_epoch = seed_draw_every_epoch
        self.batches_per_epoch = num_samples // batch_size  # drop_last: full batches only
        self.epoch, self.skip = divmod(start, self.batches_per_epoch) if self.batches_per_epoch else (0, 0)
        self.generator = torch.Generator().manual_seed(seed)
        for epoch in range(self.epoch):
            self._permutation(epoch)

    def _permutation(self, epoch: int) -> list[int]:
        if epoch == 0 or self.seed_draw_every_epoch:
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        order = torch.randperm(self.num_samples, generator=self.generator).tolist()
        torch.randperm(self.num_samples, generator=self.generator)
        return order

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: nothing moves before the first batch is asked for (a DataLoader with workers
        # calls iter() twice and reads only the second).
        order = self._permutation(self.epoch)
        skip, self.skip = self.skip, 0
        self.epoch += 1
        share = self.batch_size // self.world_size
        for b in range(skip, self.batches_per_epoch):
            first = b * self.batch_size + self.rank * share
            yield order[first:first + share]


def build_loader(dataset: CocoDetection, batch_size: int, num_workers: int, *, shuffle: bool,
                 seed: int = 0, pin_memory: bool = False, start: int = 0, ranks: Ranks = SINGLE) -> DataLoader:
    """A DataLoader yielding padded `Batch`es; seeded so that a run's image order is reproducible.

    With `shuffle`, the batches come from `ShuffledBatches` beginning at batch `start` (the
    iterations a resumed run has done). Without workers, the flips (drawn from torch's global RNG
    in this process) resume exactly once the caller restores that RNG; with workers, each keeps an
    RNG of its own, seeded when the loader starts, so a resumed run sees the same images in the
    same order but not the same flips.

    `ranks`: this process's share of each global batch of `batch_size` (DDP); its workers' seeds
    are its own (distributed.rank_seed), the order's seed is every rank's.
    """
    workers = max(0, min(num_workers, (os.cpu_count() or 1)))
    # Its own generator: the workers' base seed (the first draw, as before), never the order's.
    generator = torch.Generator().manual_seed(rank_seed(seed, ranks.rank))
    if not shuffle:
        return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                          pin_memory=pin_memory, generator=generator, persistent_workers=workers > 0)
    batches = ShuffledBatches(len(dataset), batch_size, seed, start=start, seed_draw_every_epoch=workers == 0,
                              rank=ranks.rank, world_size=ranks.world_size)
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                      pin_memory=pin_memory, generator=generator, persistent_workers=workers > 0)


def build_val_loader(cfg: Config, root: Path | None, progress: bool = False) -> tuple[CocoDetection, DataLoader]:
    """The val split (`data.val_split`) and its loader in file order: what training's evaluation,
    `ablate eval` and Figure 4 all read."""
    val_set = build_dataset(cfg.data, root, cfg.data.val_split, train=False, progress=progress)
    return val_set, build_loader(val_set, cfg.train.batch_size, cfg.data.num_workers, shuffle=False)


def forever(loader: DataLoader) -> Iterator[Batch]:
    """Cycle through `loader` epoch after epoch (training counts iterations, not epochs)."""
    if len(loader) == 0:
        raise ConfigError("train.batch_size: larger than the training set; lower it or add images")
    while True:
        yield from loader


def build_anchor_generator(cfg: Config) -> AnchorGenerator:
    m = cfg.model
    return AnchorGenerator(m.anchor_size, m.num_scales, m.aspect_ratios, m.anchor_offset)


def build_model(cfg: Config, num_classes: int) -> RetinaNet:
    m = cfg.model
    return RetinaNet(num_classes, trunk=m.trunk, trunk_norm=trunk_norm(m), tiny_widths=m.tiny_widths,
                     weights=m.weights, fpn_channels=m.fpn_channels, head_convs=m.head_convs,
                     head_channels=m.head_channels, head_norm=m.head_norm, prior=m.prior,
                     anchor_generator=build_anchor_generator(cfg))


def build_matcher(cfg: Config) -> Matcher:
    m = cfg.matcher
    return Matcher(m.fg_iou_thresh, m.bg_iou_thresh, m.allow_low_quality)


def build_box_coder(cfg: Config) -> BoxCoder:
    return BoxCoder(cfg.model.box_weights)


def build_criterion(cfg: Config, ranks: Ranks = SINGLE) -> DetectionLoss:
    c = cfg.loss
    return DetectionLoss(cls_loss=c.cls, alpha=c.alpha, gamma=c.gamma, beta=c.beta, ohem_batch=c.ohem_batch,
                         ohem_nms=c.ohem_nms, ohem_fg_fraction=c.ohem_fg_fraction, normalizer=c.normalizer,
                         normalizer_momentum=c.normalizer_momentum, box_loss=c.box,
                         smooth_l1_beta=c.smooth_l1_beta, box_loss_weight=c.box_loss_weight,
                         matcher=build_matcher(cfg), box_coder=build_box_coder(cfg),
                         world_size=ranks.world_size, all_sum=ranks.all_sum)


def build_postprocess(cfg: Config) -> Postprocess:
    i = cfg.infer
    return Postprocess(i.score_thresh, i.topk_candidates, i.nms_thresh, i.detections_per_img, build_box_coder(cfg))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay on every parameter (paper 4.1)."""
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(iteration: int, cfg: TrainConfig) -> float:
    """Multiplier of the base lr at `iteration` (0-based): linear warm-up from warmup_factor, then
    a step decay by lr_decay at each fraction in lr_steps of the run."""
    factor = 1.0
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        factor = cfg.warmup_factor * (1 - alpha) + alpha
    for step in cfg.lr_steps:
        if iteration >= int(step * cfg.iterations):
            factor *= cfg.lr_decay
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: '{name}' asked for, but no CUDA device is available")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"train.device: '{name}' asked for, but this machine has {torch.cuda.device_count()} "
                          "CUDA device(s), numbered from 0")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device: 'mps' asked for, but no Apple MPS device is available here")
    return torch.device(name)
