"""ablate.experiments: loading experiment files (every key checked, errors naming file and key),
the cells of a grid crossed with variants, seeds, presets, planned runs, and `--data` forms."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ablate.config import PRESETS
from ablate.errors import ConfigError
from ablate.experiments import (MAX_CELLS, Cell, cell_label, find_experiment, format_override_value,
                                list_experiments, load_experiment)


def write(tmp_path: Path, text: str, name: str = "exp") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- load_experiment

VALID = """
description = "focal vs ce"
preset = "tiny"
seeds = [0, 1]

[config]
loss.cls = "ce"
train.iterations = 10
model.prior = 0.02
"""


def test_load_valid_experiment(tmp_path):
    path = tmp_path / "my_exp.toml"
    path.write_text(VALID)
    exp = load_experiment(str(path))
    assert exp.name == "my_exp"
    assert exp.description == "focal vs ce"
    assert exp.preset == "tiny" and exp.seeds == [0, 1]
    assert exp.overrides == {"loss.cls": "ce", "train.iterations": 10, "model.prior": 0.02}
    cfg = exp.base_config({"loss.gamma": 0.5})
    assert (cfg.loss.cls, cfg.train.iterations, cfg.model.trunk, cfg.loss.gamma) == ("ce", 10, "tiny", 0.5)


@pytest.mark.parametrize("text, message", [
    ('preset = "tiny"\nseed = [0]\n', "unknown key 'seed'"),
    ('seeds = ["a"]\n', "'seeds' must be a non-empty list of integers"),
    ("seeds = 3\n", "'seeds' must be a non-empty list of integers"),
    ("seeds = []\n", "'seeds' must be a non-empty list of integers"),
    ("seeds = [true]\n", "'seeds' must be a non-empty list of integers"),
    ('preset = 3\n', "'preset' must be a string"),
    ('[config]\nloss.gama = 1.0\n', "unknown key 'loss.gama' \\(did you mean 'loss.gamma'\\?\\)"),
    ('[config]\ntrain.iterations = "10"\n', "'train.iterations' must be int"),
    ('[config]\nloss.alpha = 1.5\n', "'loss.alpha' must be in"),
    ('config = 3\n', "'config' must be a table"),
    ('seeds = [0\n', "malformed TOML"),
    ('[report.loss_cdf]\ncell = "nope"\n', "'report.loss_cdf.cell' names no cell: 'nope'"),
    ('[report.loss_cdf]\ngammas = [0.0]\n', "'report.loss_cdf.cell' is missing"),
    ('[report.loss_cdf]\ncell = "base"\ngammas = ["2"]\n', "'report.loss_cdf.gammas' must be a non-empty list"),
    ('[report.loss_cdf]\ncell = "base"\ngama = [2.0]\n', "unknown key 'report.loss_cdf.gama'"),
    ('[loss_cdf]\ncell = "base"\n', "'loss_cdf' belongs in the \\[report\\] table now"),
    ('x = "loss.gamma"\n', "'x' belongs in the \\[report\\] table now"),
    ('[report]\npaper_table = "f"\n', "'report.paper_table' must be one of a, b, c, d, e"),
    ('[report]\nxx = "loss.gamma"\n', "unknown key 'report.xx'"),
])
def test_bad_experiment_files_name_the_file(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_experiment(str(path))
    assert str(path) in str(info.value)
    assert str(info.value).startswith(f"{path}: ")
    assert re.search(message, str(info.value)), str(info.value)


def test_loss_cdf_names_a_cell_and_its_gammas(tmp_path):
    path = tmp_path / "fig4.toml"
    path.write_text('[grid]\n"loss.gamma" = [0.0, 2.0]\n[report]\nx = "loss.gamma"\n'
                    '[report.loss_cdf]\ncell = "g=2"\ngammas = [0, 1]\n')
    exp = load_experiment(str(path))
    assert (exp.report.loss_cdf.cell, exp.report.loss_cdf.gammas) == ("g=2", [0.0, 1.0])
    assert exp.report.x == "loss.gamma" and exp.report.hue is None


def test_unknown_preset_in_experiment_names_the_file(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text('preset = "tinyy"\n')
    with pytest.raises(ConfigError, match=str(path)):
        load_experiment(str(path))


# ----------------------------------------------------------------------------- cells


GRID_AND_VARIANTS = """
preset = "tiny"
[grid]
"loss.gamma" = [0.0, 2.0]
"loss.alpha" = [0.25, 0.75]
[[variants]]
name = "fl"
loss.cls = "focal"
[[variants]]
loss.cls = "alpha_ce"
"""


def test_cells_are_the_variants_crossed_with_the_grid_in_file_order(tmp_path):
    exp = load_experiment(str(write(tmp_path, GRID_AND_VARIANTS)))
    cells = exp.cells()
    # 2 variants x (2 gammas x 2 alphas), the variants outermost, the grid's last axis fastest.
    assert [c.name for c in cells] == ["fl g=0 a=0.25", "fl g=0 a=0.75", "fl g=2 a=0.25", "fl g=2 a=0.75",
                                       "alpha_ce g=0 a=0.25", "alpha_ce g=0 a=0.75", "alpha_ce g=2 a=0.25",
                                       "alpha_ce g=2 a=0.75"]
    assert [c.index for c in cells] == list(range(8)) and exp.num_cells() == 8
    assert cells[5] == Cell("alpha_ce g=0 a=0.75", {"loss.cls": "alpha_ce", "loss.gamma": 0.0, "loss.alpha": 0.75}, 5)
    assert exp.varied == ["loss.gamma", "loss.alpha", "loss.cls"]
    cfg = exp.cell_config(cells[5], {"loss.gamma": 1.0})  # --set comes after the cell's own values
    assert (cfg.loss.cls, cfg.loss.gamma, cfg.loss.alpha) == ("alpha_ce", 1.0, 0.75)


def test_no_grid_and_no_variants_is_one_cell_named_base(tmp_path):
    exp = load_experiment(str(write(tmp_path, 'preset = "tiny"\n')))
    assert exp.cells() == [Cell("base", {}, 0)] and exp.num_cells() == 1 and exp.varied == []


def test_two_cells_with_one_name_are_refused(tmp_path):
    text = 'preset = "tiny"\n[[variants]]\nname = "x"\nloss.gamma = 1.0\n[[variants]]\nname = "x"\nloss.gamma = 2.0\n'
    with pytest.raises(ConfigError, match="two cells are both named 'x'"):
        load_experiment(str(write(tmp_path, text)))


def test_a_grid_past_max_cells_is_refused_before_any_cell_is_made(tmp_path):
    side = 11  # 11**3 = 1331 cells
    assert side**3 > MAX_CELLS
    axes = "".join(f'"{key}" = [{", ".join(str(i / 100) for i in range(side))}]\n'
                   for key in ("loss.gamma", "loss.alpha", "model.prior"))
    with pytest.raises(ConfigError, match=f"1,331 cells, more than one experiment may hold \\({MAX_CELLS:,}\\)"):
        load_experiment(str(write(tmp_path, f'preset = "tiny"\n[grid]\n{axes}')))


@pytest.mark.parametrize("overrides, label", [
    ({"loss.cls": "focal", "loss.gamma": 2.0}, "focal g=2"),
    ({"loss.alpha": 0.25, "model.prior": None}, "a=0.25 pi=none"),
    ({"model.aspect_ratios": [0.5, 1.0, 2.0], "train.iterations": 10}, "ratios=[0.5,1,2] iterations=10"),
])
def test_cell_label_by_hand(overrides, label):
    assert cell_label(overrides) == label


def test_format_override_value():
    assert [format_override_value(v) for v in (2.0, 0.25, 1e-5, None, [1.0, 2.5], "ce", 3)] == [
        "2", "0.25", "1e-05", "none", "[1,2.5]", "ce", "3"]


# ----------------------------------------------------------------------------- seeds, presets, planned runs


def test_planned_runs_are_every_cell_times_every_seed_with_the_seed_set(tmp_path):
    exp = load_experiment(str(write(tmp_path, 'preset = "tiny"\nseeds = [3, 1]\n[grid]\n"loss.gamma" = [0.0, 2.0]\n')))
    runs = exp.planned_runs(exp.seeds, {"train.iterations": 5})
    assert [(r.cell, r.cell_index, r.seed) for r in runs] == [("g=0", 0, 3), ("g=0", 0, 1), ("g=2", 1, 3), ("g=2", 1, 1)]
    assert [r.config["train.seed"] for r in runs] == [3, 1, 3, 1]
    assert {r.config["train.iterations"] for r in runs} == {5} and runs[0].overrides == {"train.iterations": 5}
    assert runs[2].values == {"seed": 3, "loss.gamma": 2.0}
    assert runs[0].config_hash != runs[1].config_hash  # the seed is part of the run's identity


def test_a_seed_listed_twice_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="'seeds' lists seed 1 twice"):
        load_experiment(str(write(tmp_path, "seeds = [1, 2, 1]\n")))


def test_seeds_and_preset_default_to_seed_0_and_tiny(tmp_path):
    exp = load_experiment(str(write(tmp_path, 'description = "d"\n')))
    assert (exp.seeds, exp.preset, exp.data, exp.baseline) == ([0], "tiny", "synth", None)


def test_with_preset_changes_the_budget_and_leaves_the_experiment_alone(tmp_path):
    exp = load_experiment(str(write(tmp_path, '[config]\ntrain.iterations = 10\n')))
    assert set(PRESETS) >= {"tiny", "paper"}
    paper = exp.with_preset("paper")
    assert (exp.preset, paper.preset) == ("tiny", "paper")
    assert exp.base_config().model.trunk == "tiny" and paper.base_config().model.trunk == "resnet50"
    assert paper.base_config().train.iterations == 10  # the file's [config] still applies on top
    with pytest.raises(ConfigError, match="--preset: unknown preset 'huge'"):
        exp.with_preset("huge")


def test_an_experiment_is_found_by_name_or_path(tmp_path):
    names = [p.stem for p in list_experiments()]
    assert "smoke" in names and names == sorted(names)
    assert find_experiment("smoke").name == "smoke.toml"
    path = write(tmp_path, 'preset = "tiny"\n', name="mine")
    assert find_experiment(str(path)) == path
    with pytest.raises(ConfigError, match="unknown experiment 'nope' \\(known: .*smoke"):
        find_experiment("nope")


def test_seed_list_is_the_file_s_or_zero_to_n(tmp_path):
    exp = load_experiment(str(write(tmp_path, 'seeds = [3, 5]\n[grid]\n"loss.gamma" = [0, 2]\n')))
    assert exp.seed_list() == [3, 5] and exp.seed_list(4) == [0, 1, 2, 3]
    for bad in (0, 10_001):
        with pytest.raises(ConfigError, match=f"--seeds: the number of seeds must be in \\[1, 10000\\], got {bad}"):
            exp.seed_list(bad)


def test_survey_lists_every_file_and_names_the_bad_ones(tmp_path, monkeypatch):
    from ablate import experiments

    good = write(tmp_path, 'description = "two gammas"\n[grid]\n"loss.gamma" = [0, 2]\n', "good")
    bad = write(tmp_path, '[grid]\n"loss.gama" = [0]\n', "bad")
    monkeypatch.setattr(experiments, "list_experiments", lambda: [bad, good])
    rows, errors = experiments.survey()
    assert rows == ["bad", ("good", "2", "[0]", "tiny", "two gammas")]
    assert len(errors) == 1 and "bad.toml" in errors[0] and "loss.gama" in errors[0]
