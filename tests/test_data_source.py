"""ablate.data.source: the `--data` value, typed: parse, format back, config keys, and the inverse."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ablate.config import CHOICES, SPLIT_FILE_KEYS, Config, flatten
from ablate.data.source import HELP, KEYS, KINDS, DataSource
from ablate.errors import ConfigError

TEXTS = ("synth", "coco:/data/coco 2017", "voc:/d/VOCdevkit/VOC2007", "coco:train=a.json@imgs,val=b.json",
         "coco:train=x/t.json,val=y/v.json@y/images/")


@pytest.mark.parametrize("text", TEXTS)
def test_text_reads_back_as_the_same_source(text):
    source = DataSource.parse(text, "--data")
    assert str(source) == text and DataSource.parse(str(source), "--data") == source


def test_parse_by_hand():
    assert DataSource.parse("coco:train=a.json@im@gs,val=b.json", "--data") == DataSource(
        "coco", train_annotations="a.json@im", train_images="gs", val_annotations="b.json")
    assert DataSource.parse("voc:/v", "x") == DataSource("voc", root="/v")
    assert DataSource.parse("synth", "x") == DataSource()


def test_bad_text_names_where_it_came_from():
    with pytest.raises(ConfigError, match=r"^experiments/x.toml: data must be 'synth', .* got 'imagenet'$"):
        DataSource.parse("imagenet", "experiments/x.toml")


@pytest.mark.parametrize("text", TEXTS)
def test_overrides_set_every_data_key_and_find_the_source_again(text):
    source = DataSource.parse(text, "--data")
    overrides = source.overrides()
    assert tuple(overrides) == KEYS
    assert DataSource.from_overrides({**overrides, "loss.gamma": 1.0}) == source
    # one data key changed (or gone) afterwards: no --data gives these keys back
    assert DataSource.from_overrides({**overrides, "data.root": "/else", "data.source": "coco"}) != source
    assert DataSource.from_overrides({k: v for k, v in overrides.items() if k != "data.val_images"}) is None


def test_no_source_in_overrides_without_one():
    assert DataSource.from_overrides({}) is None
    assert DataSource.from_overrides({"data.source": "voc"}) is None  # voc without its folder
    assert DataSource.from_overrides({"data.source": "coco", "data.root": ""}) is None


def test_the_config_knows_the_same_keys_and_kinds():
    assert set(KEYS) <= set(flatten(Config())) and CHOICES["data.source"] == KINDS
    assert set(SPLIT_FILE_KEYS) == set(KEYS) - {"data.source", "data.root"}


def test_help_names_every_form():
    for form in ("'synth'", "'coco:PATH'", "'coco:train=FILE,val=FILE'", "'voc:PATH'", "FILE@IMAGES"):
        assert form in HELP


def test_reading_it_imports_no_torch():
    code = "import sys, ablate.data.source, ablate.experiments; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_data_forms_set_every_data_key():
    files = DataSource.parse("coco:train=ds/train/_annotations.coco.json,val=v/ann.json@v/images/", "--data").overrides()
    assert files == {"data.source": "coco", "data.root": "", "data.train_annotations": "ds/train/_annotations.coco.json",
                     "data.train_images": "", "data.val_annotations": "v/ann.json", "data.val_images": "v/images/"}
    assert DataSource.parse("voc:/d/VOCdevkit/VOC2007", "x").overrides()["data.root"] == "/d/VOCdevkit/VOC2007"
    # --data replaces an experiment's data: the split files of one do not leak into the other
    assert DataSource.parse("coco:/coco", "x").overrides()["data.train_annotations"] == ""
    assert DataSource.parse("synth", "x").overrides()["data.val_images"] == ""


@pytest.mark.parametrize("data, message", [
    ("coco:train=a.json", "names no val file"),
    ("coco:train=a.json,test=b.json", "got 'test=b.json'"),
    ("coco:train=a.json,val=b.json,train=c.json", "split 'train' given twice"),
    ("voc:", "data must be 'synth', 'coco:PATH'"),
])
def test_bad_data_forms_are_one_line(data, message):
    with pytest.raises(ConfigError, match=message):
        DataSource.parse(data, "--data").overrides()
