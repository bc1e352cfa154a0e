"""Data: which data set a run reads (`source`: the `--data` value, typed), COCO-format detection sets
(`coco`), Pascal VOC folders converted to that format in memory (`voc`) and the embedded procedural
set written in it (`synth`), so that all go through the same reader, transforms and collate.

Import the modules themselves (`from ablate.data.coco import CocoDetection`): this package imports
nothing, so that `ablate.data.source` is read without torch."""
