"""A bench file: the declared comparison (runs x seeds at one budget), read from YAML and checked once.

Format (every key but ``runs`` optional)::

    description: CLIP vs SigLIP on the core demo at equal budget
    seeds: [0, 1, 2]
    seed_keys: [train.seed, data.seed]      # the config keys each seed sets (default)
    budget:                                 # --set for every run: the equal budget
      train.steps: 300
      train.eval_every: 50
    set:                                    # further --set for every run (not part of the budget)
      data.workers: 1
    runs:
      - name: clip                          # a folder name: letters, digits, '.', '_', '-'
        method: clip                        # a 'vlp.methods' entry point (clip, llip, alip, ...)
        preset: demo                        # default: the method's default preset
        set: {loss.kind: siglip}            # or a list of "key=value"; applied after budget and set
        args: []                            # extra CLI arguments, e.g. [--init-from, weights.safetensors]
        script: llm2clip-finetune-llm       # optional: run this console script (same CLI) instead
        after: [stage1]                     # optional: start after the same seed of these runs finished

``--set`` values may hold ``{seed}``, ``{out}`` (the bench's output folder) and ``{runs}`` (its run folders'
parent): e.g. ``loss.text_model: "{runs}/stage1/seed_{seed}/text_model"``. Nothing else in a value is
touched, so shard patterns such as ``{00000..00009}`` pass through as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["BenchSpec", "RunSpec", "load_bench", "DEFAULT_SEED_KEYS"]

DEFAULT_SEED_KEYS = ("train.seed", "data.seed")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_TOP_KEYS = {"description", "seeds", "seed_keys", "budget", "set", "runs"}
_RUN_KEYS = {"name", "method", "preset", "set", "args", "script", "after", "description"}


@dataclass(frozen=True)
class RunSpec:
    name: str
    method: str
    preset: str = ""  # empty: the method's default preset
    overrides: tuple[str, ...] = ()  # the run's own "key=value" (after the bench's budget and set)
    args: tuple[str, ...] = ()
    script: str = ""
    after: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class BenchSpec:
    path: Path
    runs: tuple[RunSpec, ...]
    seeds: tuple[int, ...] = (0,)
    seed_keys: tuple[str, ...] = DEFAULT_SEED_KEYS
    budget: tuple[str, ...] = ()
    common: tuple[str, ...] = ()
    description: str = ""

    def run(self, name: str) -> RunSpec:
        for r in self.runs:
            if r.name == name:
                return r
        raise KeyError(name)


def _value(v: Any) -> str:
    """A YAML value as the CLI's ``--set`` reads it (booleans lower-case, lists as Python literals)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    return str(v) if not isinstance(v, (list, tuple, dict)) else repr(v)


def _overrides(raw: Any, where: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, dict):
        return tuple(f"{k}={_value(v)}" for k, v in raw.items())
    if isinstance(raw, list) and all(isinstance(x, str) and "=" in x for x in raw):
        return tuple(raw)
    raise ValueError(f"{where} must be a mapping of config keys to values or a list of 'key=value', got {raw!r}")


def _strings(raw: Any, where: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):
        return (raw,)
    if isinstance(raw, list) and all(isinstance(x, (str, int, float)) for x in raw):
        return tuple(str(x) for x in raw)
    raise ValueError(f"{where} must be a string or a list of strings, got {raw!r}")


def parse_seeds(raw: Any, where: str) -> tuple[int, ...]:
    """``[0, 1, 2]`` or ``"0,1,2"`` (a single integer is one seed)."""
    if isinstance(raw, bool):
        raise ValueError(f"{where}: seeds must be integers, got {raw!r}")
    items = raw.split(",") if isinstance(raw, str) else [raw] if isinstance(raw, int) else raw
    try:
        seeds = tuple(int(str(s).strip()) for s in items)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: seeds must be a list of integers, got {raw!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"{where}: seeds must be a non-empty list without repeats, got {raw!r}")
    return seeds


def load_bench(path: str | Path) -> BenchSpec:
    """Read and check a bench file; every problem is a one-line ValueError naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"bench file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list) or not data["runs"]:
        raise ValueError(f"{path}: expected a mapping with a non-empty 'runs' list")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)} (known: {sorted(_TOP_KEYS)})")
    runs: list[RunSpec] = []
    for i, r in enumerate(data["runs"]):
        where = f"{path}: runs[{i}]"
        if not isinstance(r, dict):
            raise ValueError(f"{where} must be a mapping with at least 'name' and 'method'")
        unknown = set(r) - _RUN_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} (known: {sorted(_RUN_KEYS)})")
        name, method = str(r.get("name", "")), str(r.get("method", ""))
        if not _NAME.match(name):
            raise ValueError(f"{where}: name {name!r} must be letters, digits, '.', '_' or '-' (a folder name)")
        if not method:
            raise ValueError(f"{where} ({name}): 'method' is missing (a vlp.methods name: clip, llip, ...)")
        if name in {x.name for x in runs}:
            raise ValueError(f"{where}: the name {name!r} is used twice")
        after = _strings(r.get("after"), f"{where}.after")
        missing = [a for a in after if a not in {x.name for x in runs}]
        if missing:
            raise ValueError(f"{where} ({name}): 'after' names {missing}, which are not runs listed before it")
        runs.append(RunSpec(name=name, method=method, preset=str(r.get("preset") or ""),
                            overrides=_overrides(r.get("set"), f"{where}.set"),
                            args=_strings(r.get("args"), f"{where}.args"), script=str(r.get("script") or ""),
                            after=after, description=str(r.get("description") or "")))
    seeds = parse_seeds(data.get("seeds", [0]), f"{path}: seeds")
    seed_keys = _strings(data.get("seed_keys"), f"{path}: seed_keys") or DEFAULT_SEED_KEYS
    return BenchSpec(path=path, runs=tuple(runs), seeds=seeds, seed_keys=seed_keys,
                     budget=_overrides(data.get("budget"), f"{path}: budget"),
                     common=_overrides(data.get("set"), f"{path}: set"),
                     description=str(data.get("description") or "").strip())
