"""ablate.cell_runs: which tracked runs a report reads, and with which --data / --set values."""

from __future__ import annotations

import shlex

import pandas as pd
import pytest

from ablate.errors import AblateError
from ablate.data.source import DataSource
from ablate.experiments import load_experiment
from ablate.cell_runs import command_flags, reproduce_command, resolve_overrides, select_runs
from ablate.options import overrides_from

COCO = DataSource.parse("coco:/data/coco 2017", "--data").overrides()  # every data key, as the CLI records it
SHORT = {"train.iterations": 50}


@pytest.fixture(scope="module")
def exp():
    return load_experiment("smoke")  # cells focal, alpha_ce; seeds [0]


def tracked(exp, *override_sets: dict, seeds=(0,)) -> pd.DataFrame:
    """Finished runs of every cell x seed, once per set of overrides, as Tracker.load_runs gives them."""
    rows = []
    for n, overrides in enumerate(override_sets):
        for planned in exp.planned_runs(list(seeds), overrides):
            rows.append({"run_id": f"r{n}{planned.cell_index}{planned.seed}", "cell": planned.cell,
                         "cell_index": planned.cell_index, "seed": planned.seed, "outcome": "finished",
                         "config_hash": planned.config_hash, "start_time": n, "AP": 0.1 * (n + 1)})
    return pd.DataFrame(rows)


def parse_flags(flags: str) -> dict:
    """The overrides the CLI reads from `flags` (' --data X --set k=v ...')."""
    words = shlex.split(flags)
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    data = next((words[i + 1] for i, w in enumerate(words) if w == "--data"), None)
    return overrides_from(sets, data)


def test_runs_made_with_data_are_found_without_flags(exp):
    runs = tracked(exp, COCO)
    assert select_runs(exp, {}, runs).empty  # what `ablate report` read before: nothing
    assert resolve_overrides(exp, None, runs, [COCO]) == COCO
    assert sorted(select_runs(exp, COCO, runs)["run_id"]) == ["r000", "r010"]


def test_the_files_own_runs_win_over_other_sets(exp):
    runs = tracked(exp, SHORT, {})
    assert resolve_overrides(exp, None, runs, [SHORT, {}]) == {}


def test_several_sets_list_the_exact_command_for_each(exp):
    runs = tracked(exp, COCO, SHORT)
    with pytest.raises(AblateError) as error:
        resolve_overrides(exp, None, runs, [COCO, SHORT])
    message = str(error.value)
    assert "2 sets of overrides" in message
    assert "`ablate report smoke --data 'coco:/data/coco 2017'`" in message
    assert "`ablate report smoke --set train.iterations=50`" in message
    # Named, each is reported; `show` says its own command.
    assert resolve_overrides(exp, SHORT, runs, [COCO, SHORT]) == SHORT
    with pytest.raises(AblateError, match="`ablate show smoke --set train.iterations=50`"):
        resolve_overrides(exp, None, runs, [COCO, SHORT], "show")


def test_flags_that_match_no_run_name_the_tracked_ones(exp):
    runs = tracked(exp, COCO)
    with pytest.raises(AblateError, match=r"made with --set train.iterations=50; tracked: `ablate report smoke --data"):
        resolve_overrides(exp, SHORT, runs, [COCO])


def test_sets_whose_runs_are_no_cells_of_the_file_now_are_ignored(exp):
    runs = tracked(exp, {})
    # A set remembered by runs of an older version of the file (hashes that match nothing now).
    assert resolve_overrides(exp, None, runs, [{"loss.gamma": 3.0}, {}]) == {}
    assert resolve_overrides(exp, None, runs.iloc[0:0], []) == {}


@pytest.mark.parametrize("overrides", [
    {}, COCO, {"data.source": "synth"}, SHORT, *(DataSource.parse(text, "--data").overrides() for text in
                                                ("synth", "voc:/v 2007", "coco:train=a b.json@imgs,val=v.json")),
    {"data.source": "coco", "data.root": "/old"},
    {"data.source": "coco", "data.root": "/x", "loss.cls": "alpha_ce", "loss.alpha": 0.75,
     "model.prior": None, "model.aspect_ratios": [1.0, 2.0], "train.device": "cpu", "data.categories": ["none"]},
    {"train.device": "none"}, {"loss.cls": "1.5"},
])
def test_command_flags_read_back_as_the_same_overrides(overrides):
    assert parse_flags(command_flags(overrides)) == overrides


def test_command_flags_text():
    assert command_flags({}) == ""
    assert command_flags({**COCO, **SHORT}) == " --data 'coco:/data/coco 2017' --set train.iterations=50"
    assert command_flags({"train.device": "none"}) == " --set 'train.device=\"none\"'"


def test_reproduce_command_carries_the_flags(exp):
    runs = tracked(exp, COCO, seeds=(0, 1))
    assert reproduce_command(exp, COCO, runs) == ("ablate run smoke --seeds 2 --data 'coco:/data/coco 2017'\n"
                                                  "ablate report smoke --data 'coco:/data/coco 2017'")


def test_reproduce_command_names_until_settled_and_budgets(exp):
    # Seeds added by --until-settled: the rule decided how many, so the command repeats the rule.
    runs = tracked(exp, {}, seeds=(0, 1, 2, 3, 4))
    assert reproduce_command(exp, {}, runs, max_seeds=8) == ("ablate run smoke --until-settled --max-seeds 8\n"
                                                              "ablate report smoke")
    assert reproduce_command(exp, SHORT, runs, budgets=[1.0, 2.0, 4.0]) == (
        "ablate run smoke --seeds 5 --budgets 1,2,4 --set train.iterations=50\n"
        "ablate report smoke --set train.iterations=50")
    assert reproduce_command(exp, {}, runs, budgets=[0.5, 1.0]).startswith("ablate run smoke --seeds 5 --budgets 0.5,1\n")
