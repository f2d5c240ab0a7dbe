"""``vlp-bench``: declared comparisons (bench files: runs x seeds at one budget) run side by side.

:mod:`~vlp_core.bench.spec` reads a bench file, :mod:`~vlp_core.bench.runner` plans the (run, seed) jobs and runs
each as a ``<m>-train`` process (resumable; one per GPU when there are several), and
:mod:`~vlp_core.bench.report` writes results.md, results.json, the PNG plots (the ``bench`` extra: matplotlib)
and the TensorBoard curves from the runs' own ``eval.jsonl`` records. Nothing here imports a method package:
methods are found through the ``vlp.methods`` entry points, as everywhere in the core.
"""

from vlp_core.bench.spec import BenchSpec, RunSpec, load_bench

__all__ = ["BenchSpec", "RunSpec", "load_bench"]
