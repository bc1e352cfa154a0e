"""ablate.config (defaults, overrides, hashing, presets) and builders.lr_factor (experiment files:
test_experiments.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ablate.builders import lr_factor
from ablate.config import (HASH_ALIASES, HASH_IF_SET, PRESETS, Config, TrainConfig, apply_overrides, build_config,
                           config_hash, flatten, from_dict, parse_set, to_dict, trunk_norm)
from ablate.errors import ConfigError

# ----------------------------------------------------------------------------- defaults


def test_defaults_are_the_papers():
    c = Config()
    assert (c.loss.cls, c.loss.gamma, c.loss.alpha) == ("focal", 2.0, 0.25)
    assert c.model.prior == 0.01
    assert (c.matcher.fg_iou_thresh, c.matcher.bg_iou_thresh, c.matcher.allow_low_quality) == (0.5, 0.4, True)
    assert (c.train.lr, c.train.momentum, c.train.weight_decay) == (0.01, 0.9, 1e-4)
    assert (c.train.iterations, c.train.batch_size) == (90_000, 16)
    assert c.train.lr_steps == pytest.approx([60_000 / 90_000, 80_000 / 90_000])
    assert c.model.num_scales == 3
    assert c.model.aspect_ratios == [0.5, 1.0, 2.0]
    assert c.model.anchor_size == 32.0
    assert (c.infer.score_thresh, c.infer.topk_candidates, c.infer.nms_thresh, c.infer.detections_per_img) == (
        0.05, 1000, 0.5, 100)
    assert c.model.trunk == "resnet50" and c.data.min_size == 600


def test_defaults_do_not_share_lists():
    a, b = Config(), Config()
    a.model.aspect_ratios.append(3.0)
    assert b.model.aspect_ratios == [0.5, 1.0, 2.0]


# ----------------------------------------------------------------------------- apply_overrides

def test_apply_overrides_sets_values_and_leaves_the_input_alone():
    base = Config()
    cfg = apply_overrides(base, {"loss.gamma": 0.5, "loss.cls": "ce", "train.iterations": 10}, "test")
    assert (cfg.loss.gamma, cfg.loss.cls, cfg.train.iterations) == (0.5, "ce", 10)
    assert (base.loss.gamma, base.loss.cls, base.train.iterations) == (2.0, "focal", 90_000)


def test_unknown_key_with_suggestion():
    with pytest.raises(ConfigError, match=r"src: unknown key 'loss.gama' \(did you mean 'loss.gamma'\?\)"):
        apply_overrides(Config(), {"loss.gama": 1.0}, "src")
    with pytest.raises(ConfigError, match="unknown key 'nothing_like_it'"):
        apply_overrides(Config(), {"nothing_like_it": 1}, "src")


@pytest.mark.parametrize("key, value, message", [
    ("train.iterations", "10", r"'train.iterations' must be int, got str '10'"),
    ("train.iterations", True, r"'train.iterations' must be an int, got True"),
    ("train.iterations", 1.5, r"'train.iterations' must be int, got float 1.5"),
    ("train.iterations", 10.0, r"'train.iterations' must be int"),
    ("loss.gamma", "2", r"'loss.gamma' must be float"),
    ("loss.gamma", False, r"'loss.gamma' must be float"),
    ("train.amp", 1, r"'train.amp' must be true or false"),
    ("train.lr", None, r"'train.lr' must be float"),
    ("model.aspect_ratios", 1.0, r"'model.aspect_ratios' must be a list of float"),
    ("model.aspect_ratios", [1.0, "2"], r"'model.aspect_ratios' must be float"),
    ("loss.cls", "focall", r"'loss.cls' must be one of ce, alpha_ce, focal, focal_star, ohem; got 'focall'"),
    ("model.trunk", "resnet152", r"'model.trunk' must be one of"),
])
def test_wrong_types_and_bad_choices(key, value, message):
    with pytest.raises(ConfigError, match="^where: " + message):
        apply_overrides(Config(), {key: value}, "where")


@pytest.mark.parametrize("overrides, message", [
    ({"loss.alpha": 1.5}, "'loss.alpha' must be in \\[0, 1\\]"),
    ({"loss.alpha": -0.1}, "'loss.alpha' must be in \\[0, 1\\]"),
    ({"loss.gamma": -1.0}, "'loss.gamma' must be in \\[0, 100\\]"),
    ({"loss.gamma": 1e308}, "'loss.gamma' must be in \\[0, 100\\]"),
    ({"model.prior": 1.0}, "'model.prior' must be in \\(0, 1\\) or none"),
    ({"matcher.bg_iou_thresh": 0.6}, "'matcher.bg_iou_thresh' must be in \\[0, matcher.fg_iou_thresh\\]"),
    ({"matcher.fg_iou_thresh": 1.5, "matcher.bg_iou_thresh": 1.2}, "'matcher.fg_iou_thresh' must be in \\(0, 1\\]"),
    ({"model.num_scales": 0}, "'model.num_scales' must be in 1..16"),
    ({"model.num_scales": 1000}, "'model.num_scales' must be in 1..16"),
    ({"train.iterations": 10**23}, "'train.iterations' must be <= 100,000,000"),
    ({"data.num_workers": -1}, "'data.num_workers' must be >= 0"),
    ({"data.min_size": 100000, "data.max_size": 100000}, "'data.min_size' must be <= 8192"),
    ({"data.val_split": "train"}, "'data.val_split' must be another split than data.train_split"),
    ({"model.aspect_ratios": []}, "'model.aspect_ratios' must be a non-empty list"),
    ({"model.aspect_ratios": [1.0, 0.0]}, "'model.aspect_ratios' must be a non-empty list"),
    ({"model.box_weights": [1.0, 1.0]}, "'model.box_weights' must be a list of 4 numbers"),
    ({"train.batch_size": 0}, "'train.batch_size' must be >= 1"),
    ({"loss.ohem_fg_fraction": 1.0}, "'loss.ohem_fg_fraction' must be in \\(0, 1\\) or none"),
])
def test_out_of_range_values(overrides, message):
    with pytest.raises(ConfigError, match="^src: " + message):
        apply_overrides(Config(), overrides, "src")


def test_accepts_int_for_float_and_none_for_optional():
    cfg = apply_overrides(Config(), {"loss.gamma": 1, "train.lr": 1, "model.aspect_ratios": [1, 2],
                                     "model.prior": None, "loss.ohem_fg_fraction": None}, "src")
    assert cfg.loss.gamma == 1.0 and type(cfg.loss.gamma) is float
    assert type(cfg.train.lr) is float
    assert cfg.model.aspect_ratios == [1.0, 2.0] and all(type(r) is float for r in cfg.model.aspect_ratios)
    assert cfg.model.prior is None and cfg.loss.ohem_fg_fraction is None
    cfg = apply_overrides(cfg, {"loss.ohem_fg_fraction": 0.25, "model.prior": 0.02}, "src")
    assert (cfg.loss.ohem_fg_fraction, cfg.model.prior) == (0.25, 0.02)


# ----------------------------------------------------------------------------- parse_set

@pytest.mark.parametrize("text, expected", [
    ("loss.gamma=2", ("loss.gamma", 2)),
    ("train.lr=0.02", ("train.lr", 0.02)),
    ("train.lr=1e-3", ("train.lr", 1e-3)),
    ("model.aspect_ratios=[0.5, 1, 2]", ("model.aspect_ratios", [0.5, 1, 2])),
    ("train.amp=false", ("train.amp", False)),
    ("train.amp=true", ("train.amp", True)),
    ("model.prior=none", ("model.prior", None)),
    ("model.prior=None", ("model.prior", None)),
    ("model.prior=null", ("model.prior", None)),
    ("loss.cls=focal", ("loss.cls", "focal")),
    ("data.root=/a/b=c", ("data.root", "/a/b=c")),
    (" loss.gamma = 0.5 ", ("loss.gamma", 0.5)),
])
def test_parse_set(text, expected):
    key, value = parse_set(text)
    assert (key, value) == expected
    assert type(value) is type(expected[1])


def test_parse_set_needs_an_equals_sign():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_set("loss.gamma")


def test_parse_set_feeds_apply_overrides():
    cfg = apply_overrides(Config(), dict(parse_set(s) for s in ("loss.gamma=1", "model.prior=none",
                                                              "loss.cls=ce")), "--set")
    assert (cfg.loss.gamma, cfg.model.prior, cfg.loss.cls) == (1.0, None, "ce")


# ----------------------------------------------------------------------------- flatten / hash / dict

def test_flatten():
    flat = flatten(Config())
    assert flat["loss.gamma"] == 2.0 and flat["train.out_dir"] == "runs"
    assert flat["model.aspect_ratios"] == [0.5, 1.0, 2.0]
    n_fields = sum(len(dataclasses.fields(getattr(Config(), s.name))) for s in dataclasses.fields(Config))
    assert len(flat) == n_fields


def test_config_hash_stable_and_sensitive_to_science_keys_only():
    h = config_hash(Config())
    assert h == config_hash(Config())
    assert len(h) == 12 and all(ch in "0123456789abcdef" for ch in h)
    assert config_hash(apply_overrides(Config(), {"loss.gamma": 1.0}, "t")) != h
    assert config_hash(apply_overrides(Config(), {"model.aspect_ratios": [1.0]}, "t")) != h
    assert config_hash(apply_overrides(Config(), {"train.out_dir": "elsewhere"}, "t")) == h
    assert config_hash(apply_overrides(Config(), {"train.log_every": 1, "data.num_workers": 0}, "t")) == h
    # an int given for a float hashes as the float
    assert config_hash(apply_overrides(Config(), {"loss.gamma": 2}, "t")) == h


def test_from_dict_to_dict_round_trip():
    cfg = apply_overrides(build_config("tiny"), {"loss.cls": "ohem", "model.prior": None,
                                                 "loss.ohem_fg_fraction": 0.25}, "t")
    back = from_dict(to_dict(cfg))
    assert back == cfg
    assert config_hash(back) == config_hash(cfg)
    with pytest.raises(ConfigError, match="^ckpt: unknown key 'loss.bogus'"):
        from_dict({"loss": {"bogus": 1}}, "ckpt")


# ----------------------------------------------------------------------------- renamed keys

def test_hashes_of_the_defaults_are_pinned():
    # Computed before loss.box_weights moved to model.box_weights: a hash must never change, or
    # every recorded run would look undone.
    assert config_hash(Config()) == "1cf1b56c5546"
    assert config_hash(build_config("tiny")) == "41fb9d769e25"
    assert HASH_ALIASES == {"model.box_weights": "loss.box_weights"}
    moved = apply_overrides(Config(), {"model.box_weights": [10.0, 10.0, 5.0, 5.0]}, "t")
    assert config_hash(moved) != config_hash(Config())  # still hashed, under its old name


def test_keys_added_since_hash_only_when_set():
    # The split files and the "auto" trunk norm came after runs were recorded: configs that leave them
    # alone keep the hashes pinned above; setting them is a different run.
    assert set(HASH_IF_SET) == {"data.train_annotations", "data.train_images", "data.val_annotations",
                                "data.val_images"}
    files = apply_overrides(Config(), {"data.source": "coco", "data.train_annotations": "a.json"}, "t")
    assert config_hash(files) != config_hash(apply_overrides(Config(), {"data.source": "coco"}, "t"))
    explicit_bn = apply_overrides(Config(), {"model.trunk_norm": "bn"}, "t")
    assert Config().model.trunk_norm == "auto" and config_hash(explicit_bn) == config_hash(Config())
    assert config_hash(build_config("tiny", {"model.trunk_norm": "bn"})) == "41fb9d769e25"


def test_trunk_norm_auto_freezes_batchnorm_of_pretrained_trunks():
    weighted = apply_overrides(Config(), {"model.weights": "IMAGENET1K_V1"}, "t")
    assert trunk_norm(Config().model) == "bn" and trunk_norm(weighted.model) == "frozen_bn"
    assert trunk_norm(apply_overrides(weighted, {"model.trunk_norm": "bn"}, "t").model) == "bn"
    assert config_hash(weighted) == config_hash(apply_overrides(weighted, {"model.trunk_norm": "frozen_bn"}, "t"))


def test_split_files_need_the_coco_source():
    with pytest.raises(ConfigError, match="^src: 'data.val_images' is for data.source=coco, but data.source is voc"):
        apply_overrides(Config(), {"data.source": "voc", "data.val_images": "imgs"}, "src")


def test_an_old_checkpoint_config_with_loss_box_weights_loads():
    old = to_dict(build_config("tiny"))
    del old["model"]["box_weights"]  # as a checkpoint written before the move holds it
    old["loss"]["box_weights"] = [10.0, 10.0, 5.0, 5.0]
    cfg = from_dict(old, "old checkpoint")
    assert cfg.model.box_weights == [10.0, 10.0, 5.0, 5.0]
    assert not hasattr(cfg.loss, "box_weights")
    new = apply_overrides(build_config("tiny"), {"model.box_weights": [10.0, 10.0, 5.0, 5.0]}, "t")
    assert cfg == new and config_hash(cfg) == config_hash(new)


def test_the_old_key_in_overrides_names_the_new_one():
    with pytest.raises(ConfigError, match=r"unknown key 'loss.box_weights' \(renamed: use 'model.box_weights'\)"):
        apply_overrides(Config(), {"loss.box_weights": [1.0, 1.0, 1.0, 1.0]}, "src")


def _config_from_row(row: dict[str, str]) -> Config:
    """A runs.csv row's config columns (the flattened config, as pandas wrote it) back to a Config,
    through `from_dict` as a checkpoint's config is read."""
    import typing

    nested: dict[str, dict] = {}
    for section in dataclasses.fields(Config):
        for name, tp in typing.get_type_hints(type(getattr(Config(), section.name))).items():
            key = f"{section.name}.{name}"
            if key not in row and key not in HASH_ALIASES:
                continue  # a key added since the run was recorded: its default (the hash check says if it matters)
            column = key if key in row else HASH_ALIASES[key]  # tracked before the rename: its old name
            column_section, _, column_name = column.partition(".")
            nested.setdefault(column_section, {})[column_name] = _parse_cell(row[column], tp)
    return from_dict(nested, "runs.csv")


def _parse_cell(raw: str, tp) -> object:
    import json
    import types
    import typing

    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # float | None: empty or NaN is None
        if raw in ("", "nan", "NaN"):
            return None
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is list:
        return json.loads(raw)
    if tp is bool:
        return {"True": True, "False": False}[raw]
    return raw if tp is str else tp(raw)  # an empty str column stays ""


RUN_TABLES = sorted(Path(__file__).resolve().parents[1].glob("reports/*/runs.csv"))


@pytest.mark.parametrize("table", RUN_TABLES, ids=[p.parent.name for p in RUN_TABLES])
def test_recorded_runs_keep_their_config_hash(table: Path):
    import csv

    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and "config_hash" in rows[0]
    for row in rows:
        assert config_hash(_config_from_row(row)) == row["config_hash"], (table, row["run_name"])


def test_the_gamma_sweep_table_is_among_them():
    assert "gamma-sweep" in {p.parent.name for p in RUN_TABLES}


# ----------------------------------------------------------------------------- presets

def test_presets_build():
    assert set(PRESETS) >= {"paper", "tiny"}
    # The paper starts from ImageNet weights: the preset's only difference from the defaults.
    paper = build_config("paper")
    assert paper.model.weights == "IMAGENET1K_V1" and trunk_norm(paper.model) == "frozen_bn"
    assert apply_overrides(paper, {"model.weights": ""}, "t") == Config()
    tiny = build_config("tiny")
    assert (tiny.model.trunk, tiny.data.min_size, tiny.train.iterations) == ("tiny", 128, 800)
    assert tiny.loss == Config().loss  # presets never change the loss
    over = build_config("tiny", {"loss.gamma": 0.0})
    assert over.loss.gamma == 0.0 and over.model.trunk == "tiny"
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        build_config("huge")


# ----------------------------------------------------------------------------- lr_factor

def test_lr_factor_warmup_and_steps_by_hand():
    cfg = TrainConfig(iterations=900, warmup_iters=100, warmup_factor=1.0 / 3, lr_decay=0.1)
    # warm-up: 1/3 at 0, linearly to 1 at 100; steps at int(2/3 * 900) = 600 and int(8/9 * 900) = 800
    expected = {0: 1 / 3, 50: 2 / 3, 75: 1 / 3 * 0.25 + 0.75, 99: 1 / 3 * 0.01 + 0.99, 100: 1.0,
                599: 1.0, 600: 0.1, 799: 0.1, 800: 0.01, 899: 0.01}
    for it, value in expected.items():
        assert lr_factor(it, cfg) == pytest.approx(value), it


def test_lr_factor_paper_schedule():
    cfg = TrainConfig()  # 90k iterations, steps at 60k and 80k, warm-up 500 from 1/3
    assert lr_factor(0, cfg) == pytest.approx(1 / 3)
    assert lr_factor(250, cfg) == pytest.approx(2 / 3)
    assert lr_factor(500, cfg) == 1.0
    assert lr_factor(59_999, cfg) == 1.0
    assert lr_factor(60_000, cfg) == pytest.approx(0.1)
    assert lr_factor(79_999, cfg) == pytest.approx(0.1)
    assert lr_factor(80_000, cfg) == pytest.approx(0.01)


def test_lr_factor_is_non_decreasing_in_warmup_then_non_increasing():
    cfg = TrainConfig(iterations=300, warmup_iters=30)
    values = [lr_factor(i, cfg) for i in range(300)]
    assert all(a < b for a, b in zip(values[:30], values[1:31]))
    assert all(a >= b for a, b in zip(values[30:], values[31:]))
    no_warmup = TrainConfig(iterations=300, warmup_iters=0)
    assert lr_factor(0, no_warmup) == 1.0
