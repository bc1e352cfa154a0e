"""Experiment files: small TOML data files in experiments/ (never executed code).

    description = "..."
    preset = "tiny"            # the budget: a preset of ablate.config.PRESETS
    data = "synth"             # or "coco:PATH", "coco:train=A.json@imgs/,val=B.json", "voc:PATH"
    seeds = [0, 1, 2]          # the seeds `ablate run NAME` runs and its report shows
    baseline = "focal g=2 a=0.25"   # the cell deltas are measured against (default: the first)

    [report]                   # how `ablate report` lays the cells out (all optional)
    paper_table = "b"          # which sub-table of the paper's Table 1 to set beside ours
    x = "loss.gamma"           # the key on the plots' x axis (default: the first varied key)
    hue = "loss.alpha"         # the key that colours the lines (or "cell")

    [report.loss_cdf]          # the paper's Figure 4 in the report, from this cell's trained model
    cell = "focal g=2"
    gammas = [0.0, 0.5, 1.0, 2.0]

    [config]                   # dotted keys: the base, on top of the preset
    loss.cls = "focal"

    [grid]                     # the cells are the product of these axes ...
    "loss.gamma" = [0.0, 1.0, 2.0]

    [[variants]]               # ... crossed with these explicit variants (either may be absent)
    name = "alpha-ce"          # optional; otherwise the name is made from the values
    loss.cls = "alpha_ce"

    comparisons = [["focal g=2", "alpha-ce"]]   # `ablate run --until-settled`: the pairs it settles
                               # (cell, comparator); default: every cell against the baseline
    [sequential]               # the stopping rule of --until-settled (ablate.sequential.SequentialRule)
    alpha = 0.05               # two-sided rate of settling a comparison with no true difference
    min_seeds = 3              # the first look
    max_seeds = 8              # the last look (--max-seeds overrides it)
    test = "t"                 # "t": mean AP (paired t); "signed_rank": a typical seed (--test)
    family = "none"            # "holm": the comparisons as one family, family-wise alpha (--family)
    curtail = true             # stop comparisons no later look can settle (changes no verdict)

    [search]                   # `ablate search`: an Optuna space over config keys
    metric = "AP"
    [search.space]
    "loss.gamma" = { low = 0.0, high = 5.0 }
    "train.lr" = { low = 0.001, high = 0.05, log = true }
    "loss.cls" = { choices = ["focal", "alpha_ce"] }

The file is the whole experiment: `ablate run NAME` and `ablate report NAME` with no flags run and
report exactly what it declares. Every key is checked: an unknown key or a wrong type is one `ConfigError` naming file and key.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ablate.config import PRESETS, Config, apply_overrides, build_config, check_seed, flatten
from ablate.data.source import DataSource
from ablate.errors import ConfigError, one_line
from ablate.runs import PlannedRun

TOP_LEVEL_KEYS = {"description", "preset", "data", "seeds", "baseline", "report", "config", "grid", "variants",
                  "search", "comparisons", "sequential"}
REPORT_KEYS = {"paper_table", "x", "hue", "loss_cdf"}
SEARCH_KEYS = {"metric", "direction", "space", "trials", "eval_every"}
SEQUENTIAL_KEYS = {"alpha", "min_seeds", "max_seeds", "test", "family", "curtail"}

# Short labels for cell names and report headers: "focal g=2 a=0.25" rather than the dotted keys.
ALIASES = {"loss.cls": "", "loss.gamma": "g", "loss.alpha": "a", "loss.beta": "b", "model.prior": "pi",
           "model.num_scales": "scales", "model.aspect_ratios": "ratios", "loss.ohem_batch": "B",
           "loss.ohem_nms": "nms", "loss.ohem_fg_fraction": "fg", "model.trunk": "", "data.min_size": "px",
           "train.lr": "lr", "loss.box": "box", "loss.normalizer": "norm"}


# The most cells an experiment file may expand to, and runs (cells x seeds) one grid may plan: every
# cell's config is built and checked when the file loads (~1 ms each), every run's when a grid is
# planned (~25 ms each on this machine under load: `ablate show` of 2,000 runs took 53 s); a grid of
# 10**6 cells or 20,000 runs gave no answer in minutes. Far past what the ablations here need (at most
# 12 cells x 8 seeds).
MAX_CELLS = 1000
MAX_RUNS = 1000


@dataclass
class Cell:
    """One point of an experiment: its readable name and its overrides of the experiment's base."""

    name: str
    overrides: dict[str, Any]
    index: int = 0


@dataclass
class SearchSpec:
    metric: str = "AP"
    direction: str = "maximize"
    trials: int = 20
    eval_every: int = 0  # iterations between the intermediate evaluations fed to the pruner (0: 4 per run)
    space: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class LossCdfSpec:
    """Figure 4 in the report: the loss CDFs of the model trained for `cell` (its lowest finished seed)."""

    cell: str
    gammas: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0])


@dataclass
class ReportSettings:
    """The [report] table: how the report lays the cells out; it changes no run."""

    paper_table: str | None = None  # a..e: the sub-table of the paper's Table 1 set beside ours
    x: str | None = None
    hue: str | None = None
    loss_cdf: LossCdfSpec | None = None


@dataclass
class Experiment:
    name: str
    path: Path
    description: str = ""
    preset: str = "tiny"
    data: str = "synth"
    seeds: list[int] = field(default_factory=lambda: [0])
    baseline: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # [config], flat dotted keys
    grid: dict[str, list[Any]] = field(default_factory=dict)
    variants: list[dict[str, Any]] = field(default_factory=list)
    search: SearchSpec | None = None
    report: ReportSettings = field(default_factory=ReportSettings)
    comparisons: list[tuple[str, str]] = field(default_factory=list)  # (cell, comparator); empty: vs the baseline
    sequential: dict[str, Any] = field(default_factory=dict)  # [sequential]: SequentialRule fields the file sets

    def with_preset(self, preset: str) -> Experiment:
        """The same experiment at another budget (`--preset`), validated again; self is unchanged."""
        if preset not in PRESETS:
            raise ConfigError(f"--preset: unknown preset '{preset}' (known: {', '.join(PRESETS)})")
        other = dataclasses.replace(self, preset=preset)
        validate(other)
        return other

    def planned_runs(self, seeds: list[int], overrides: dict[str, Any] | None = None) -> list[PlannedRun]:
        """Every cell x seed, resolved: what the queue carries to the workers."""
        overrides = overrides or {}
        return [PlannedRun.from_config(self.name, cell.name, cell.index, self.cell_config(cell, overrides, seed),
                                       overrides, list(cell.overrides))
                for cell in self.cells() for seed in seeds]

    def base_config(self, extra: dict[str, Any] | None = None, source: str = "--set") -> Config:
        """The preset, then the data set, then [config], then `extra` (e.g. --set)."""
        cfg = apply_overrides(build_config(self.preset), DataSource.parse(self.data, str(self.path)).overrides(), str(self.path))
        cfg = apply_overrides(cfg, self.overrides, str(self.path))
        return apply_overrides(cfg, extra or {}, source)

    def cell_config(self, cell: Cell, extra: dict[str, Any] | None = None, seed: int | None = None) -> Config:
        """The config of one cell: base, the cell's overrides, then `extra`, then the seed."""
        cfg = apply_overrides(self.base_config(), cell.overrides, f"{self.path} (cell '{cell.name}')")
        cfg = apply_overrides(cfg, extra or {}, "--set")
        return cfg if seed is None else apply_overrides(cfg, {"train.seed": seed}, "--seeds")

    @property
    def varied(self) -> list[str]:
        """The keys the cells vary, in the file's order (grid axes, then variants' keys)."""
        keys = list(self.grid)
        for variant in self.variants:
            keys += [k for k in variant if k != "name" and k not in keys]
        return keys

    def num_cells(self) -> int:
        """len(self.cells()), without making them."""
        return math.prod(len(values) for values in self.grid.values()) * max(1, len(self.variants))

    def check_size(self, num_seeds: int, source: str) -> None:
        """One ConfigError, before any cell is made, when the grid holds more cells than MAX_CELLS or
        more runs (cells x seeds) than MAX_RUNS; `source` names what set the seeds."""
        cells = self.num_cells()
        if cells > MAX_CELLS:
            raise ConfigError(f"{self.path}: {cells:,} cells, more than one experiment may hold ({MAX_CELLS:,}); "
                              "split it into several files")
        if cells * num_seeds > MAX_RUNS:
            raise ConfigError(f"{source}: {cells:,} cells x {num_seeds:,} seeds = {cells * num_seeds:,} runs, more "
                              f"than one grid may plan ({MAX_RUNS:,}); use fewer seeds or split the experiment")

    def seed_list(self, seeds: int | None = None) -> list[int]:
        """Seeds 0..seeds-1 (`--seeds N`), else the file's."""
        if seeds is None:
            return self.seeds
        if not 1 <= seeds <= 10_000:  # a grid of more seeds is a typo, and range() of it would fill the memory
            raise ConfigError(f"--seeds: the number of seeds must be in [1, 10000], got {seeds}")
        self.check_size(seeds, "--seeds")
        return list(range(seeds))

    def cells(self) -> list[Cell]:
        """The grid product crossed with the variants (either may be empty; neither: one cell)."""
        axes = list(self.grid.items())
        points = [dict(zip([k for k, _ in axes], values)) for values in itertools.product(*[v for _, v in axes])]
        variants = self.variants or [{}]
        cells = []
        for variant, point in itertools.product(variants, points):
            overrides = {**{k: v for k, v in variant.items() if k != "name"}, **point}
            label = variant.get("name")
            label = f"{label} {cell_label(point)}".strip() if label else cell_label(overrides)
            if not label.isprintable():  # an escape sequence in a name would be run by the terminal
                raise ConfigError(f"{self.path}: cell name {label!r:.80} holds a control character; use plain text")
            cells.append(Cell(label or "base", overrides, len(cells)))
        names = [c.name for c in cells]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"{self.path}: two cells are both named '{duplicates[0]}'; give the variants names")
        return cells


def format_override_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ",".join(format_override_value(v) for v in value) + "]"
    return "none" if value is None else str(value)


def cell_label(overrides: dict[str, Any]) -> str:
    """A readable cell name from its overrides: {'loss.cls': 'focal', 'loss.gamma': 2.0} -> 'focal g=2'."""
    parts = []
    for key, value in overrides.items():
        alias = ALIASES.get(key, key.split(".")[-1])
        parts.append(format_override_value(value) if alias == "" else f"{alias}={format_override_value(value)}")
    return " ".join(parts)


def experiments_dirs() -> list[Path]:
    """Where names are looked up: ./experiments, then the checkout's experiments/."""
    here = Path("experiments")  # relative: messages name ./experiments files as the user sees them
    shipped = Path(__file__).resolve().parent.parent / "experiments"
    # realpath, not Path.resolve: a link loop at ./experiments raised there (and means "no folder").
    return [here] if os.path.realpath(here) == os.path.realpath(shipped) else [here, shipped]


def list_experiments() -> list[Path]:
    """The experiment files (*.toml that are files: not a folder, nor a link to none) of
    experiments_dirs(), one per name, the first folder's first."""
    seen: dict[str, Path] = {}
    for folder in experiments_dirs():
        for path in sorted(folder.glob("*.toml")) if _is_dir(folder) else []:
            if _is_file(path):
                seen.setdefault(path.stem, path)
    return [seen[k] for k in sorted(seen)]


def survey() -> tuple[list[tuple[str, ...] | str], list[str]]:
    """`ablate list`: a row (name, cells, seeds, preset, description) per experiment file, only the
    name for a file that does not load, and the error line of each of those (one bad file must not
    hide the others)."""
    rows, errors = [], []
    for path in list_experiments():
        try:
            exp = load_experiment(str(path))
        except ConfigError as e:
            errors.append(one_line(e))
            rows.append(path.stem)
            continue
        rows.append((exp.name, str(len(exp.cells())), str(exp.seeds), exp.preset, exp.description))
    return rows, errors


def _is_file(path: Path) -> bool:
    """Path.is_file, False for a link loop or a name too long, as for a missing file."""
    try:
        return path.is_file()
    except (OSError, RuntimeError):
        return False


def _is_dir(path: Path) -> bool:
    """Path.is_dir; a link there that leads to no folder (a loop, a target gone) is one ConfigError."""
    if path.is_symlink() and not os.path.isdir(path):
        raise ConfigError(f"{path}: a link that leads to no folder (a loop, or its target is gone); fix or remove it")
    return path.is_dir()


def find_experiment(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml" and _is_file(path):
        return path
    if path.suffix == ".toml" and path.exists():
        raise ConfigError(f"{path}: not a file")
    for folder in experiments_dirs():
        candidate = folder / f"{name_or_path}.toml"
        if _is_file(candidate):
            return candidate
    known = [p.stem for p in list_experiments()]
    raise ConfigError(f"unknown experiment '{name_or_path}' (known: {', '.join(known) or 'none'})")


def flatten_tables(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'loss': {'cls': 'focal'}} -> {'loss.cls': 'focal'} (TOML dotted keys nest tables)."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_tables(value, f"{full}."))
        else:
            flat[full] = value
    return flat


def _expect(path: Path, key: str, value: Any, kind: type | tuple, what: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{path}: '{key}' must be {what}, got {json.dumps(value, default=str)}")
    return value


def _parse_grid(path: Path, table: Any) -> dict[str, list[Any]]:
    _expect(path, "grid", table, dict, "a table of key = [values]")
    grid = {}
    for key, values in flatten_tables(table).items():
        _expect(path, f"grid.{key}", values, list, "a non-empty list of values")
        if not values:
            raise ConfigError(f"{path}: 'grid.{key}' must be a non-empty list of values")
        grid[key] = values
    return grid


def _parse_variants(path: Path, entries: Any) -> list[dict[str, Any]]:
    _expect(path, "variants", entries, list, "an array of tables ([[variants]])")
    variants = []
    for i, entry in enumerate(entries):
        _expect(path, f"variants[{i}]", entry, dict, "a table")
        variant = flatten_tables({k: v for k, v in entry.items() if k != "name"})
        if "name" in entry:
            variant["name"] = _expect(path, f"variants[{i}].name", entry["name"], str, "a string")
        variants.append(variant)
    return variants


def _expect_table(path: Path, name: str, table: Any, allowed: set[str], what: str = "a table") -> None:
    """`table` is a TOML table whose keys are all `allowed`; else one ConfigError naming the key."""
    _expect(path, name, table, dict, what)
    unknown = set(table) - allowed
    if unknown:
        raise ConfigError(f"{path}: unknown key '{name}.{sorted(unknown)[0]}' (allowed: {', '.join(sorted(allowed))})")


def _set_fields(path: Path, prefix: str, table: dict, target: Any, fields: tuple[tuple[str, type, str], ...]) -> None:
    """Copy each (key, type, description) of `fields` present in `table` onto `target`, type-checked."""
    for key, kind, what in fields:
        if key in table:
            setattr(target, key, _expect(path, f"{prefix}{key}", table[key], kind, what))


def _parse_search(path: Path, table: Any) -> SearchSpec:
    _expect_table(path, "search", table, SEARCH_KEYS)
    spec = SearchSpec()
    _set_fields(path, "search.", table, spec, (("metric", str, "a string"), ("direction", str, "a string"),
                                               ("trials", int, "an integer"), ("eval_every", int, "an integer")))
    if spec.direction not in ("maximize", "minimize"):
        raise ConfigError(f"{path}: 'search.direction' must be maximize or minimize")
    from ablate.evaluation import METRIC_NAMES  # numpy only

    if spec.metric not in METRIC_NAMES:
        raise ConfigError(f"{path}: 'search.metric' must be one of {', '.join(METRIC_NAMES)}; got {spec.metric!r}")
    if spec.trials < 1 or spec.eval_every < 0:
        key, what = ("trials", ">= 1") if spec.trials < 1 else ("eval_every", ">= 0")
        raise ConfigError(f"{path}: 'search.{key}' must be {what}, got {getattr(spec, key)}")
    space = _expect(path, "search.space", table.get("space", {}), dict, "a table of key = {low, high} or {choices}")
    for key, dist in space.items():
        _expect(path, f"search.space.{key}", dist, dict, "a table {low, high[, log]} or {choices}")
        if not ({"low", "high"} <= set(dist) <= {"low", "high", "log", "step"} or set(dist) == {"choices"}):
            raise ConfigError(f"{path}: 'search.space.{key}' must be {{low, high[, log, step]}} or {{choices}}")
        _check_distribution(path, f"search.space.{key}", dist)
        spec.space[key] = dist
    return spec


def _check_distribution(path: Path, name: str, dist: dict[str, Any]) -> None:
    """A search distribution Optuna can sample: low <= high (finite numbers), log only above 0, a
    positive step, a non-empty list of choices. A bad one used to fail inside its trial, which
    stayed RUNNING."""
    if "choices" in dist:
        if not isinstance(dist["choices"], list) or not dist["choices"]:
            raise ConfigError(f"{path}: '{name}.choices' must be a non-empty list")
        return
    for bound in ("low", "high", *(("step",) if "step" in dist else ())):
        value = dist[bound]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ConfigError(f"{path}: '{name}.{bound}' must be a finite number, got {json.dumps(value, default=str)}")
    if dist["low"] > dist["high"]:
        raise ConfigError(f"{path}: '{name}': low ({dist['low']}) is above high ({dist['high']})")
    if dist.get("log") and dist["low"] <= 0:
        raise ConfigError(f"{path}: '{name}': log = true needs low > 0, got {dist['low']}")
    if "step" in dist and dist["step"] <= 0:
        raise ConfigError(f"{path}: '{name}.step' must be > 0, got {dist['step']}")


def _parse_report(path: Path, table: Any) -> ReportSettings:
    _expect_table(path, "report", table, REPORT_KEYS)
    settings = ReportSettings()
    _set_fields(path, "report.", table, settings, tuple((key, str, "a string") for key in ("paper_table", "x", "hue")))
    if settings.paper_table is not None and settings.paper_table not in ("a", "b", "c", "d", "e"):
        raise ConfigError(f"{path}: 'report.paper_table' must be one of a, b, c, d, e; got '{settings.paper_table}'")
    if "loss_cdf" in table:
        settings.loss_cdf = _parse_loss_cdf(path, table["loss_cdf"])
    return settings


def _parse_loss_cdf(path: Path, table: Any) -> LossCdfSpec:
    _expect_table(path, "report.loss_cdf", table, {"cell", "gammas"}, "a table {cell, gammas}")
    if "cell" not in table:
        raise ConfigError(f"{path}: 'report.loss_cdf.cell' is missing: the cell whose trained model Figure 4 reads")
    spec = LossCdfSpec(_expect(path, "report.loss_cdf.cell", table["cell"], str, "a string"))
    if "gammas" in table:
        gammas = _expect(path, "report.loss_cdf.gammas", table["gammas"], list, "a non-empty list of numbers")
        if not gammas or not all(isinstance(g, (int, float)) and not isinstance(g, bool) and g >= 0 for g in gammas):
            raise ConfigError(f"{path}: 'report.loss_cdf.gammas' must be a non-empty list of numbers >= 0")
        spec.gammas = [float(g) for g in gammas]
    return spec


def _parse_comparisons(path: Path, entries: Any) -> list[tuple[str, str]]:
    what = 'a list of [cell, comparator] pairs of cell names'
    _expect(path, "comparisons", entries, list, what)
    pairs = []
    for i, pair in enumerate(entries):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(c, str) for c in pair)):
            raise ConfigError(f"{path}: 'comparisons[{i}]' must be a [cell, comparator] pair of cell names, "
                              f"got {json.dumps(pair, default=str)}")
        pairs.append((pair[0], pair[1]))
    return pairs


def _parse_sequential(path: Path, table: Any) -> dict[str, Any]:
    _expect_table(path, "sequential", table, SEQUENTIAL_KEYS)
    fields = {}
    for key, kind, what in (("alpha", (int, float), "a number"), ("min_seeds", int, "an integer"),
                            ("max_seeds", int, "an integer"), ("test", str, '"t" or "signed_rank"'),
                            ("family", str, '"none" or "holm"'), ("curtail", bool, "true or false")):
        if key in table:
            fields[key] = _expect(path, f"sequential.{key}", table[key], kind, what)
    return fields


# Bytes of an experiment file read at most: the shipped ones are ~1-3 kB; a bigger file is no experiment.
MAX_FILE_BYTES = 1 << 20


def read_toml(path: Path) -> dict[str, Any]:
    """The TOML document of an experiment file; anything wrong with it is one ConfigError naming it."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES:,} bytes; an experiment file is a few lines of TOML")
    if raw.startswith(b"\xef\xbb\xbf"):
        raise ConfigError(f"{path}: starts with a byte-order mark (BOM), which TOML does not allow; save it as "
                          "UTF-8 without BOM")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: malformed TOML: {e}") from None
    except UnicodeDecodeError as e:  # TOML files are UTF-8 by definition
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                          "save it as UTF-8") from None
    except RecursionError:
        raise ConfigError(f"{path}: malformed TOML: arrays or tables nested too deeply") from None


def load_experiment(name_or_path: str) -> Experiment:
    path = find_experiment(name_or_path)
    if not path.stem.isprintable() or path.stem != path.stem.encode("utf-8", "replace").decode("utf-8"):
        # The name goes into the tracking store, plot titles and cell names: it must be plain text.
        raise ConfigError(f"{path}: the file name is not printable UTF-8 text; rename the file")
    data = read_toml(path)
    if not data:
        raise ConfigError(f"{path}: declares nothing (an empty file); an experiment needs at least a preset, "
                          "e.g. preset = \"tiny\"")
    unknown = set(data) - TOP_LEVEL_KEYS
    moved = sorted(unknown & REPORT_KEYS)
    if moved:
        raise ConfigError(f"{path}: '{moved[0]}' belongs in the [report] table now")
    if unknown:
        raise ConfigError(f"{path}: unknown key '{sorted(unknown)[0]}' (allowed: {', '.join(sorted(TOP_LEVEL_KEYS))})")
    exp = Experiment(name=path.stem, path=path)
    _set_fields(path, "", data, exp, tuple((key, str, "a string") for key in ("description", "preset", "data", "baseline")))
    if "seeds" in data:
        seeds = _expect(path, "seeds", data["seeds"], list, "a non-empty list of integers")
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ConfigError(f"{path}: 'seeds' must be a non-empty list of integers")
        for seed in seeds:
            check_seed(seed, str(path), "seeds")
        if len(set(seeds)) < len(seeds):
            duplicate = next(seed for seed in seeds if seeds.count(seed) > 1)
            raise ConfigError(f"{path}: 'seeds' lists seed {duplicate} twice (a seed's run is the same run)")
        exp.seeds = seeds
    if "report" in data:
        exp.report = _parse_report(path, data["report"])
    if "config" in data:
        exp.overrides = flatten_tables(_expect(path, "config", data["config"], dict, "a table of dotted keys"))
    if "grid" in data:
        exp.grid = _parse_grid(path, data["grid"])
    if "variants" in data:
        exp.variants = _parse_variants(path, data["variants"])
    if "search" in data:
        exp.search = _parse_search(path, data["search"])
    if "comparisons" in data:
        exp.comparisons = _parse_comparisons(path, data["comparisons"])
    if "sequential" in data:
        exp.sequential = _parse_sequential(path, data["sequential"])
    if exp.preset not in PRESETS:
        raise ConfigError(f"{path}: unknown preset '{exp.preset}' (known: {', '.join(PRESETS)})")
    validate(exp)
    return exp


def validate(exp: Experiment) -> None:
    """Build every cell's config now, so that a bad key fails before any run starts."""
    exp.check_size(len(exp.seeds), f"{exp.path}: 'seeds'")
    exp.base_config(source=str(exp.path))
    cells = exp.cells()
    for cell in cells:
        exp.cell_config(cell)
    names = [c.name for c in cells]
    loss_cdf = exp.report.loss_cdf
    for key, cell in (("baseline", exp.baseline), ("report.loss_cdf.cell", loss_cdf and loss_cdf.cell)):
        if cell is not None and cell not in names:
            raise ConfigError(f"{exp.path}: '{key}' names no cell: '{cell}' (cells: {', '.join(names)})")
    for i, (cell, comparator) in enumerate(exp.comparisons):
        for name in (cell, comparator):
            if name not in names:
                raise ConfigError(f"{exp.path}: 'comparisons[{i}]' names no cell: '{name}' (cells: {', '.join(names)})")
        if cell == comparator:
            raise ConfigError(f"{exp.path}: 'comparisons[{i}]' compares '{cell}' with itself")
    if exp.sequential:
        from ablate.errors import AblateError
        from ablate.sequential import SequentialRule  # scipy: imported only by files that declare a rule

        try:
            SequentialRule(**exp.sequential)
        except AblateError as e:
            raise ConfigError(f"{exp.path}: [sequential]: {str(e).removeprefix('sequential rule: ')}") from None
    if exp.search:
        known = flatten(exp.base_config())
        for key in exp.search.space:
            if key not in known:
                raise ConfigError(f"{exp.path}: 'search.space.{key}' is no config key")
