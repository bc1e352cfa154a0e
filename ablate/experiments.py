"""Experiment files: small TOML data files in experiments/ (never executed code).

    description = "..."
    preset = "tiny"          # a preset of ablate.config.PRESETS
    seeds = [0]
    [config]                 # dotted keys override the preset
    loss.cls = "focal"
    train.iterations = 800

Every key is checked: an unknown key or a wrong type is one `ConfigError` naming file and key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ablate.config import PRESETS, Config, apply_overrides, build_config
from ablate.errors import ConfigError

TOP_LEVEL_KEYS = {"description", "preset", "seeds", "config"}


@dataclass
class Experiment:
    name: str
    path: Path
    description: str = ""
    preset: str = "tiny"
    seeds: list[int] = field(default_factory=lambda: [0])
    overrides: dict[str, Any] = field(default_factory=dict)  # flat dotted keys

    def base_config(self, extra: dict[str, Any] | None = None, source: str = "--set") -> Config:
        """The preset, then the file's [config], then `extra` (e.g. --set)."""
        cfg = apply_overrides(build_config(self.preset), self.overrides, str(self.path))
        return apply_overrides(cfg, extra or {}, source)


def experiments_dirs() -> list[Path]:
    """Where names are looked up: ./experiments, then the checkout's experiments/."""
    here = Path.cwd() / "experiments"
    shipped = Path(__file__).resolve().parent.parent / "experiments"
    return [here] if here.resolve() == shipped.resolve() else [here, shipped]


def find_experiment(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.is_file():
        return path
    for folder in experiments_dirs():
        candidate = folder / f"{name_or_path}.toml"
        if candidate.is_file():
            return candidate
    known = sorted({p.stem for d in experiments_dirs() if d.is_dir() for p in d.glob("*.toml")})
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


def load_experiment(name_or_path: str) -> Experiment:
    path = find_experiment(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: malformed TOML: {e}") from None
    unknown = set(data) - TOP_LEVEL_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key '{sorted(unknown)[0]}' (allowed: {', '.join(sorted(TOP_LEVEL_KEYS))})")
    exp = Experiment(name=path.stem, path=path)
    for key, tp in (("description", str), ("preset", str)):
        if key in data:
            if not isinstance(data[key], tp):
                raise ConfigError(f"{path}: '{key}' must be a string")
            setattr(exp, key, data[key])
    if "seeds" in data:
        seeds = data["seeds"]
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                                for s in seeds):
            raise ConfigError(f"{path}: 'seeds' must be a non-empty list of integers")
        exp.seeds = seeds
    if "config" in data:
        if not isinstance(data["config"], dict):
            raise ConfigError(f"{path}: 'config' must be a table of dotted keys")
        exp.overrides = flatten_tables(data["config"])
    if exp.preset not in PRESETS:
        raise ConfigError(f"{path}: unknown preset '{exp.preset}' (known: {', '.join(PRESETS)})")
    exp.base_config(source=str(path))  # validate now: a bad key fails before any work starts
    return exp
