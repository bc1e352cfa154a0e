"""Data: COCO-format detection sets (`coco`), Pascal VOC folders converted to that format in memory
(`voc`) and the embedded procedural set written in it (`synth`), so that all go through the same
reader, transforms and collate."""

from ablate.data.coco import Batch, CocoDetection, DataStats, collate
from ablate.data.synth import SynthSpec, class_names, default_cache_dir, ensure_synth, synth_root, synth_stats

__all__ = [
    "Batch",
    "CocoDetection",
    "DataStats",
    "SynthSpec",
    "collate",
    "class_names",
    "default_cache_dir",
    "ensure_synth",
    "synth_root",
    "synth_stats",
]
