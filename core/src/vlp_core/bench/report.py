"""The bench's outputs, all rebuilt from the run folders' own ``eval.jsonl`` on every invocation.

- ``results.json``: every raw figure (per run, per seed, per evaluation step, every metric), the final
  values and their summary, and the curves that the plots draw;
- ``results.md``: one row per run, mean ± sample standard deviation (n - 1) over the finished seeds of every
  final evaluation metric (counts such as ``*/n`` and ``*/skipped`` are in the JSON only);
- ``plots/<metric>.png`` and ``plots/all.png``: each metric against the training step at the periodic
  evaluations, one line per run (the mean over seeds) with a band from the lowest to the highest seed; the
  drawn numbers are also stored in the PNG as a ``vlp-bench`` text chunk (JSON);
- ``tb/<run>/seed_<s>`` and ``tb/<run>/mean``: the same curves as TensorBoard scalars ``eval/<metric>``.

Only finished seeds enter the table, the plots and TensorBoard; unfinished ones are in the JSON as they are.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics
from pathlib import Path
from typing import Any

from vlp_core.bench.runner import DONE_FILE, Job, final_step, is_finished, read_evals
from vlp_core.bench.spec import BenchSpec

__all__ = ["collect", "write_all", "is_count", "fmt", "markdown", "plot_name"]


def is_count(metric: str) -> bool:
    """Sizes and skip counters of the evaluation sets (``*/n``, ``*/n_images``, ``*/skipped``, the linear
    probe's ``*/probe_n_train``), not scores."""
    leaf = metric.rsplit("/", 1)[-1].removeprefix("probe_")
    return leaf in ("n", "skipped") or leaf.startswith("n_")


def fmt(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def plot_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", metric) + ".png"


def _stats(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


def collect(bench: BenchSpec, jobs: list[Job]) -> dict[str, Any]:
    """Everything the outputs show, read from the run folders of ``jobs``."""
    runs: dict[str, Any] = {}
    metrics: list[str] = []
    for job in jobs:
        r = job.run
        entry = runs.setdefault(r.name, {
            "method": r.method, "preset": r.preset, "script": r.script, "set": list(r.overrides),
            "args": list(r.args), "after": list(r.after), "description": r.description,
            "command": job.display_own(),
            "seeds": {}})
        evals = read_evals(job.folder)
        last = final_step(job.folder)
        finished = is_finished(job.folder)
        final = next((e for e in evals if e["step"] == last), None)
        done = {}
        if (job.folder / DONE_FILE).is_file():
            done = json.loads((job.folder / DONE_FILE).read_text())
        entry["seeds"][str(job.seed)] = {"folder": str(job.folder), "finished": finished, "final_step": last,
                                         "wall_s": done.get("wall_s"), "evals": evals,
                                         "final": {k: v for k, v in final.items() if k != "step"} if final else None}
        for e in evals:
            metrics += [k for k in e if k != "step" and not is_count(k) and k not in metrics]
    for entry in runs.values():
        finished = {s: v for s, v in entry["seeds"].items() if v["finished"]}
        summary = {}
        for m in metrics:
            values = [v["final"][m] for v in finished.values() if v["final"] and m in v["final"]]
            if values:
                summary[m] = {**_stats(values), "values": values,
                              "seeds": [int(s) for s, v in finished.items() if v["final"] and m in v["final"]]}
        entry["summary"] = summary
        curves = {}
        for m in metrics:
            by_step: dict[int, list[float]] = {}
            for v in finished.values():
                for e in v["evals"]:
                    if m in e:
                        by_step.setdefault(int(e["step"]), []).append(e[m])
            if by_step:
                steps = sorted(by_step)
                st = [_stats(by_step[s]) for s in steps]
                curves[m] = {"steps": steps, **{k: [x[k] for x in st] for k in ("mean", "min", "max", "n")}}
        entry["curves"] = curves
        entry["final_steps"] = sorted({v["final_step"] for v in finished.values() if v["final_step"] is not None})
    return {"bench": str(bench.path), "description": bench.description, "seeds": sorted({j.seed for j in jobs}),
            "seed_keys": list(bench.seed_keys), "budget": list(bench.budget), "set": list(bench.common),
            "metrics": metrics, "runs": runs}


def markdown(results: dict[str, Any]) -> str:
    metrics = [m for m in results["metrics"] if any(m in r["summary"] for r in results["runs"].values())]
    seeds = results["seeds"]
    lines = [f"# vlp-bench: {Path(results['bench']).stem}", ""]
    if results["description"]:
        lines += [results["description"], ""]
    budget = ", ".join(f"`{b}`" for b in results["budget"]) or "the presets' own"
    lines += [f"Bench file `{results['bench']}`. Seeds {', '.join(map(str, seeds))} (each sets "
              f"{', '.join(f'`{k}`' for k in results['seed_keys'])}; the shapes world is the same for every seed). "
              f"Budget: {budget}." + (f" For every run: {', '.join(f'`{s}`' for s in results['set'])}."
                                      if results["set"] else ""), "",
              "Final evaluation: mean ± sample standard deviation over the finished seeds.", ""]
    lines += ["| run | seeds | step | " + " | ".join(metrics) + " |", "|---" * (3 + len(metrics)) + "|"]
    for name, r in results["runs"].items():
        n_done = sum(v["finished"] for v in r["seeds"].values())
        cells = [fmt(r["summary"][m]["mean"], r["summary"][m]["std"]) if m in r["summary"] else "—"
                 for m in metrics]
        step = ", ".join(map(str, r["final_steps"])) or "—"
        lines.append(f"| {name} | {n_done}/{len(r['seeds'])} | {step} | " + " | ".join(cells) + " |")
    lines += ["", "| run | command (plus the budget, the common settings, the seed and the folder) |", "|---|---|"]
    for name, r in results["runs"].items():
        lines.append(f"| {name} | `{r['command']}` |" if not r["description"]
                     else f"| {name} | `{r['command']}`: {r['description']} |")
    lines += ["", "Curves (mean over seeds, band from the lowest to the highest seed): `plots/<metric>.png`, all in "
              "`plots/all.png`; TensorBoard: `tensorboard --logdir tb` (evaluation curves) or `--logdir runs` "
              "(each run's own training logs). Every figure: `results.json`.", ""]
    return "\n".join(lines)


def _plot_data(results: dict[str, Any], metric: str) -> dict[str, Any]:
    return {name: {k: r["curves"][metric][k] for k in ("steps", "mean", "min", "max")}
            for name, r in results["runs"].items() if metric in r["curves"]}


def _draw(ax: Any, results: dict[str, Any], metric: str, colors: dict[str, Any]) -> None:
    for name, c in _plot_data(results, metric).items():
        n = max(results["runs"][name]["curves"][metric]["n"])
        ax.plot(c["steps"], c["mean"], marker="o", markersize=3, color=colors[name], label=f"{name} (n={n})")
        if n > 1:
            ax.fill_between(c["steps"], c["min"], c["max"], color=colors[name], alpha=0.2, linewidth=0)
    ax.set_title(metric, fontsize=9)
    ax.set_xlabel("step")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)


def write_plots(results: dict[str, Any], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in results["metrics"] if any(m in r["curves"] for r in results["runs"].values())]
    if not metrics:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {name: cycle[i % len(cycle)] for i, name in enumerate(results["runs"])}
    written = []
    # One figure redrawn per metric, fixed margins: figures and tight_layout cost more than the curves.
    fig, ax = plt.subplots(figsize=(6, 4))
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.13, top=0.92)
    for m in metrics:
        ax.cla()
        _draw(ax, results, m, colors)
        ax.set_ylabel(m)
        ax.legend(fontsize=8)
        path = folder / plot_name(m)
        fig.savefig(path, dpi=100, metadata={"vlp-bench": json.dumps({m: _plot_data(results, m)})})
        written.append(path)
    plt.close(fig)
    cols = min(4, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        _draw(ax, results, m, colors)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=9)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.1 + 0.2 / rows, top=0.95, wspace=0.3, hspace=0.45)
    path = folder / "all.png"
    fig.savefig(path, dpi=80, metadata={"vlp-bench": json.dumps({m: _plot_data(results, m) for m in metrics})})
    plt.close(fig)
    return [*written, path]


def write_tensorboard(results: dict[str, Any], folder: Path) -> None:
    """``<folder>/<run>/seed_<s>`` (each finished seed's records) and ``<folder>/<run>/mean``, rewritten whole."""
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(folder, ignore_errors=True)
    metrics = set(results["metrics"])
    for name, r in results["runs"].items():
        for seed, v in r["seeds"].items():
            if not v["finished"]:
                continue
            w = SummaryWriter(log_dir=str(folder / name / f"seed_{seed}"))
            for e in v["evals"]:
                for k, x in e.items():
                    if k in metrics:
                        w.add_scalar(f"eval/{k}", x, int(e["step"]))
            w.close()
        if r["curves"]:
            w = SummaryWriter(log_dir=str(folder / name / "mean"))
            for m, c in r["curves"].items():
                for step, x in zip(c["steps"], c["mean"]):
                    w.add_scalar(f"eval/{m}", x, step)
            w.close()


def write_all(results: dict[str, Any], out: Path, *, plots: bool = True) -> list[Path]:
    """results.json, results.md, the plots (``plots=False``: without matplotlib) and TensorBoard."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    written = [out / "results.json", out / "results.md"]
    if plots:
        written += write_plots(results, out / "plots")
    write_tensorboard(results, out / "tb")
    return written
