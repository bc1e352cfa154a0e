"""Which data set a run reads, as one typed value: `--data` (and an experiment file's `data`) parsed
once into a `DataSource`, formatted back (`str`), and given to the config as its data keys.

Its grammar lives here and only here: the CLI's help is built from `FORMS`, the experiment file and
the CLI parse with `DataSource.parse`, the config receives `DataSource.overrides()`, and the
reproduce commands of a report find the `--data` value again with `DataSource.from_overrides`.
No torch: the CLI checks its input before any heavy import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ablate.errors import ConfigError

KINDS = ("synth", "coco", "voc")  # data.source's choices
SPLITS = ("train", "val")
# The config keys a data source sets: all of them, so that it replaces whatever data an experiment chose.
SPLIT_KEYS = tuple(f"data.{split}_{part}" for split in SPLITS for part in ("annotations", "images"))
KEYS = ("data.source", "data.root", *SPLIT_KEYS)

# The grammar. Hints (builders: a source without its folder or files) name single forms.
COCO_FOLDER, COCO_FILES, VOC_FOLDER = "coco:PATH", "coco:train=FILE.json,val=FILE.json", "voc:PATH"
SPLIT_FORM = "train=FILE.json[@IMAGES],val=FILE.json[@IMAGES]"
FORMS_TEXT = f"'synth', '{COCO_FOLDER}', 'coco:{SPLIT_FORM}' or '{VOC_FOLDER}'"  # as an error names them
# Each form with what it means: the CLI's --data help.
FORMS = (
    ("synth", "embedded, default"),
    (COCO_FOLDER, "a folder in the COCO 2017 layout"),
    ("coco:train=FILE,val=FILE", "a COCO-format file per split, as Roboflow, CVAT or Label Studio export it; "
                                 "FILE@IMAGES names its image folder, by default the file's own"),
    (VOC_FOLDER, "Pascal VOC, the VOCdevkit/VOC2007 folder; splits from ImageSets/Main, picked by "
                 "data.train_split and data.val_split"),
)
HELP = " | ".join(f"'{form}' ({meaning})" for form, meaning in FORMS)


@dataclass(frozen=True)
class DataSource:
    """A data set: `kind` synth, coco or voc; `root` its folder (coco, voc), or else, for coco, a
    COCO-format annotation file per split with its image folder ('' for the file's own folder).

        synth                                         the embedded procedural set
        coco:PATH                                     a folder in the COCO 2017 layout
        coco:train=FILE[@IMAGES],val=FILE[@IMAGES]    a file per split, as exported; e.g. CVAT: FILE@images/
        voc:PATH                                      a Pascal VOC folder (VOCdevkit/VOC2007)
    """

    kind: str = "synth"
    root: str = ""
    train_annotations: str = ""
    train_images: str = ""
    val_annotations: str = ""
    val_images: str = ""

    @classmethod
    def parse(cls, text: str, where: str) -> DataSource:
        """`text` in one of the forms above; else one ConfigError naming `where` (a flag, a file)."""
        kind, _, rest = text.partition(":")
        if text == "synth":
            return cls("synth")
        if kind == "voc" and rest:
            return cls("voc", root=rest)
        if kind == "coco" and rest.startswith(tuple(f"{split}=" for split in SPLITS)):
            return cls("coco", **_split_files(rest, text, where))
        if kind == "coco" and rest:
            return cls("coco", root=rest)
        raise ConfigError(f"{where}: data must be {FORMS_TEXT}, got '{text}'")

    def __str__(self) -> str:
        """The text `parse` reads back: 'synth', 'coco:/x', 'coco:train=a.json@imgs,val=b.json'."""
        if self.kind == "synth" or self.root:
            return self.kind if self.kind == "synth" else f"{self.kind}:{self.root}"
        splits = [f"{split}={getattr(self, f'{split}_annotations')}"
                  + (f"@{images}" if (images := getattr(self, f"{split}_images")) else "") for split in SPLITS]
        return f"{self.kind}:" + ",".join(splits)

    def overrides(self) -> dict[str, Any]:
        """The config's data keys (KEYS), every one of them set."""
        return {key: getattr(self, "kind" if key == "data.source" else key.partition(".")[2]) for key in KEYS}

    @classmethod
    def from_overrides(cls, overrides: dict[str, Any]) -> DataSource | None:
        """The data source whose `--data` text gives back exactly these data keys (all of them
        in `overrides`, with the same values); None when there is none (then they stay --set pairs)."""
        get = lambda key: str(overrides.get(key) or "")  # noqa: E731
        kind = overrides.get("data.source")
        if kind not in KINDS or (kind == "voc" and not get("data.root")):
            return None
        source = cls(kind, **{key.partition(".")[2]: get(key) for key in KEYS[1:]})
        try:
            source = cls.parse(str(source), "--data")  # what the text reads back as
        except ConfigError:
            return None
        wanted = source.overrides()
        return source if all(key in overrides and overrides[key] == value for key, value in wanted.items()) else None


def _split_files(spec: str, text: str, where: str) -> dict[str, str]:
    """'train=A.json@imgs,val=B.json' -> train_annotations, train_images, val_annotations, val_images."""
    out: dict[str, str] = {}
    for part in spec.split(","):
        split, eq, files = part.partition("=")
        split = split.strip()
        if split not in SPLITS or not eq or not files.strip():
            raise ConfigError(f"{where}: expected {SPLIT_FORM} after 'coco:', got '{part}' in '{text}'")
        if f"{split}_annotations" in out:
            raise ConfigError(f"{where}: split '{split}' given twice in '{text}'")
        # The last '@': annotation file names seldom hold one, and image folders come after it.
        ann, at, images = files.strip().rpartition("@") if "@" in files else (files.strip(), "", "")
        out[f"{split}_annotations"], out[f"{split}_images"] = ann, images
    missing = [s for s in SPLITS if f"{s}_annotations" not in out]
    if missing:
        raise ConfigError(f"{where}: '{text}' names no {missing[0]} file (both train= and val= are needed)")
    return out
