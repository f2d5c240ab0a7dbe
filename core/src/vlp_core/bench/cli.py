"""``vlp-bench``: run a declared comparison (runs x seeds at one budget) and report it side by side."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from vlp_core.bench.spec import parse_seeds

__all__ = ["main", "check_config"]

DESCRIPTION = """\
Run every (run, seed) of a bench file, one training process each, and write side by side:
  results.md    one row per run: mean ± sample std over seeds of every final evaluation metric
  results.json  every raw figure: per run, per seed, per evaluation step, every metric
  plots/*.png   each metric against the training step (periodic evaluations, train.eval_every), one line per
                run (mean over seeds) with a band from the lowest to the highest seed; plots/all.png: all of them
  tb/           the same curves for TensorBoard: tb/<run>/seed_<s> and tb/<run>/mean
  runs/<run>/seed_<s>/  each run's own folder (config.yaml, checkpoints, eval.jsonl, tensorboard/, bench.log)

The bench file (YAML) declares the comparison, e.g.:

  description: CLIP vs SigLIP on the core demo
  seeds: [0, 1, 2]                 # each seed sets train.seed and data.seed (seed_keys); the world stays fixed
  budget: {train.steps: 300, train.batch_size: 128, train.eval_every: 50}   # --set for every run
  set: {data.workers: 1}           # further --set for every run
  runs:
    - {name: clip, method: clip, preset: demo}
    - {name: siglip, method: clip, preset: siglip_demo}

Run keys: name, method (a vlp.methods name: clip, llip, alip, dreamlip, lcl, llm2clip, ...), preset, set
(mapping or list of key=value), args (extra CLI arguments), script (a console script with the train CLI to run
instead, e.g. llm2clip-finetune-llm), after (runs whose same seed must finish first). Values may use {seed},
{out} and {runs} (= <out>/runs).

Resumable: a run whose final evaluation is recorded (or that exited 0) is skipped; an unfinished one with a
checkpoint continues with --resume latest (exactly: same batches, same RNG), one without a checkpoint starts
again from an emptied folder. Stop a bench at any time (Ctrl-C) and run the same command again to go on.
Seed-major order: all runs of the first seed, then the next seed. On the CPU (or one GPU) one run at a time
(--jobs N: N at once); with several GPUs one run per GPU in parallel (CUDA_VISIBLE_DEVICES). A full comparison
takes hours on a CPU: run it alone on the machine.
"""

EPILOG = """\
examples:
  vlp-bench core/bench/clip_vs_siglip.yaml                          # -> runs/bench/clip_vs_siglip/
  vlp-bench packages/llip/bench/llip_vs_register.yaml --seeds 0,1 --out /data/bench/llip
  vlp-bench core/bench/clip_vs_siglip.yaml --dry-run                # the commands, and what is done already
  vlp-bench core/bench/clip_vs_siglip.yaml --only siglip            # one run's seeds (the report shows all)
  vlp-bench core/bench/clip_vs_siglip.yaml --report-only            # rebuild the report from the folders
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlp-bench", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="the bench file (YAML), e.g. core/bench/clip_vs_siglip.yaml")
    p.add_argument("--out", help="output folder (default: runs/bench/<file name without .yaml>)")
    p.add_argument("--seeds", help="seeds to run instead of the file's, e.g. 0,1,2")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="run only these runs (repeatable or comma-separated); the report still shows every run")
    p.add_argument("--dry-run", action="store_true",
                   help="check every run's config and print each job's state and command; train nothing")
    p.add_argument("--report-only", action="store_true", help="train nothing; rebuild the report from the folders")
    p.add_argument("--gpus", default="auto",
                   help="auto (one run per GPU when there are two or more, else one at a time), cpu (hide the GPUs),"
                   " or GPU ids such as 0,1,2,3 (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=1,
                   help="without GPUs (or with one): this many runs at once (default: %(default)s; timings of "
                   "runs sharing the CPU are not comparable)")
    return p


def check_config(job) -> str | None:  # noqa: ANN001 - a runner.Job
    """Resolve the job's config as its trainer would (preset, every --set, validation); the error, or None."""
    from vlp_core.bench.launch import load_method
    from vlp_core.cli import build_config, train_parser

    try:
        method = load_method(job.run.method)
        build_config(method, train_parser(method).parse_args(job.argv))
    except (ValueError, FileNotFoundError) as e:
        return str(e)
    except SystemExit:  # argparse has printed its message
        return "invalid arguments"
    return None


def _raise_exit(signum, frame):  # noqa: ANN001, ARG001
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _main(args)
    except ValueError as e:
        print(f"vlp-bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _main(args: argparse.Namespace) -> int:
    from vlp_core.bench.report import collect, write_all
    from vlp_core.bench.runner import check_folders, describe, execute, job_state, plan, resolve_devices
    from vlp_core.bench.spec import load_bench

    bench = load_bench(args.file)
    seeds = parse_seeds(args.seeds, "--seeds") if args.seeds else bench.seeds
    names = [r.name for r in bench.runs]
    only = {n.strip() for o in args.only for n in o.split(",") if n.strip()} if args.only else None
    if only and only - set(names):
        raise ValueError(f"--only {sorted(only - set(names))}: not a run of {bench.path} ({', '.join(names)})")
    out = Path(args.out or Path("runs") / "bench" / Path(args.file).stem).resolve()
    every = plan(bench, out, seeds)
    jobs = [j for j in every if only is None or j.run.name in only]
    check_folders(jobs)
    states = {j.key: job_state(j) for j in every}
    if args.dry_run:
        bad = 0
        for j in jobs:
            error = check_config(j)
            # A run with 'after' may read what those runs write (e.g. a stage-1 model): not an error yet.
            bad += error is not None and not j.run.after
            note = f"  (config error{' until its after runs finish' if j.run.after else ''}: {error})"
            info = describe(j, states[j.key])
            print(f"# {info['run']} seed {info['seed']}: {info['state']}" + (note if error else ""))
            print(info["command"])
        print(f"# {sum(states[j.key] == 'done' for j in jobs)} of {len(jobs)} finished; output folder {out}")
        return 2 if bad else 0
    plots = True
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if not args.report_only:
            raise ValueError("the plots need matplotlib: pip install 'vlp-core[bench]'") from None
        plots = False
        print("vlp-bench: matplotlib is not installed: no plots (pip install 'vlp-core[bench]')", file=sys.stderr)
    failed: dict = {}
    if not args.report_only:
        todo = [j for j in jobs if states[j.key] != "done"]
        done = {k for k, s in states.items() if s == "done"}
        # Every config now, not an hour into the bench (a run with 'after' may need what those runs write).
        errors: dict[str, list[str]] = {}  # message -> the jobs it concerns
        for j in todo:
            if not j.run.after and (e := check_config(j)) is not None:
                errors.setdefault(e, []).append(j.label)
        if errors:
            raise ValueError("; ".join(f"{', '.join(who)}: {e}" for e, who in errors.items()))
        print(f"vlp-bench: {len(jobs) - len(todo)} of {len(jobs)} runs finished already, {len(todo)} to run "
              f"-> {out}", flush=True)
        if todo:
            devices = resolve_devices(args.gpus)
            if args.jobs > 1:
                if len(devices) > 1:
                    raise ValueError(f"--jobs {args.jobs} is for the CPU: with {len(devices)} GPUs one run per GPU")
                devices = devices * args.jobs
            # SIGTERM stops the trainers too (they resume next time), as Ctrl-C does.
            previous = signal.signal(signal.SIGTERM, _raise_exit)
            try:
                failed = execute(todo, devices, done=done, say=lambda msg: print(msg, flush=True))
            except (KeyboardInterrupt, SystemExit):
                print("vlp-bench: stopped; the same command goes on from here (unfinished runs resume from their "
                      "latest checkpoint)", file=sys.stderr, flush=True)
                raise
            finally:
                signal.signal(signal.SIGTERM, previous)
    results = collect(bench, every)
    written = write_all(results, out, plots=plots)
    print((out / "results.md").read_text())
    print(f"vlp-bench: wrote {', '.join(str(p.relative_to(out)) for p in written[:3])}"
          + (f" and {len(written) - 3} more" if len(written) > 3 else "") + f" in {out}")
    if failed:
        print("vlp-bench: failed: " + json.dumps({f"{n} seed {s}": why for (n, s), why in failed.items()}),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
