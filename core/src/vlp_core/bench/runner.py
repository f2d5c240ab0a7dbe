"""Plan and run a bench: one job per (run, seed), each a ``<m>-train`` process writing its own run folder.

Folders: ``<out>/runs/<run>/seed_<s>/`` is the run's ``train.output_dir`` (config.yaml, checkpoints, metrics.jsonl,
eval.jsonl, tensorboard/), plus the bench's own files there: ``bench_run.json`` (the arguments it was started
with), ``bench.log`` (its stdout and stderr) and ``bench_done.json`` (written when the process exits 0).

A job is *finished* when ``bench_done.json`` exists or ``eval.jsonl`` holds the record of the final step
(``train.steps``); finished jobs are skipped. An unfinished job with a checkpoint resumes with
``--resume latest`` (the trainer resumes exactly: same batches, same RNG); one without a checkpoint is
started again from an emptied folder, so no half-written log or eval record of the dead attempt survives.
A folder started with other arguments (the bench file or the seeds' keys changed) is never reused: that is
an error naming the folder. The output folder itself may move (the arguments are compared with it written
``{out}``), so a bench can go on from a copy on another machine.

Order: seed-major (every run of the first seed, then the next seed), so a bench stopped half-way holds
complete comparisons of its first seeds. Devices: one job at a time (CPU, or a single GPU), or with
several GPUs one job per GPU in parallel, each seeing only its own (``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import yaml

from vlp_core.bench.spec import BenchSpec, RunSpec

__all__ = ["Job", "plan", "job_state", "check_folders", "resolve_devices", "execute", "read_evals", "final_step",
           "is_finished", "RUN_FILE", "DONE_FILE", "LOG_FILE"]

RUN_FILE, DONE_FILE, LOG_FILE = "bench_run.json", "bench_done.json", "bench.log"


@dataclass
class Job:
    run: RunSpec
    seed: int
    folder: Path
    argv: list[str]  # the train CLI's arguments (without --resume)
    out: Path  # the bench's output folder

    def portable_argv(self) -> list[str]:
        """``argv`` with the output folder written ``{out}``: a bench folder moved elsewhere is still the same."""
        return [a.replace(str(self.out), "{out}") for a in self.argv]

    @property
    def key(self) -> tuple[str, int]:
        return self.run.name, self.seed

    @property
    def label(self) -> str:
        return f"{self.run.name} seed {self.seed}"

    def command(self, resume: bool = False) -> list[str]:
        kind, name = ("script", self.run.script) if self.run.script else ("method", self.run.method)
        return [sys.executable, "-m", "vlp_core.bench.launch", kind, name, *self.argv,
                *(["--resume", "latest"] if resume else [])]

    def script(self) -> str:
        """How a user would start the run: its console script (``<m>-train``), else the launcher module."""
        script = self.run.script or f"{self.run.method}-train"
        if not any(ep.name == script for ep in entry_points(group="console_scripts")):
            script = f"python -m vlp_core.bench.launch method {self.run.method}"
        return script

    def display(self, resume: bool = False) -> str:
        """The whole command line of this job, as a user would type it."""
        return " ".join([self.script(), *map(shlex.quote, self.argv), *(["--resume", "latest"] if resume else [])])

    def display_own(self) -> str:
        """The run's own part of the command: preset, its ``--set`` and arguments (no budget, seed or folder)."""
        own = (["--preset", self.run.preset] if self.run.preset else []) + [
            x for o in self.run.overrides for x in ("--set", o)] + list(self.run.args)
        return " ".join([self.script(), *map(shlex.quote, own)])


def _fill(value: str, *, seed: int, out: Path) -> str:
    return value.replace("{seed}", str(seed)).replace("{runs}", str(out / "runs")).replace("{out}", str(out))


def run_argv(bench: BenchSpec, run: RunSpec, seed: int, out: Path, folder: Path) -> list[str]:
    """``--preset``, then ``--set`` in this order (later wins): quiet progress, the budget, the bench's common
    overrides, the run's own, the seed keys; then the run's extra arguments and the run folder."""
    argv = ["--preset", run.preset] if run.preset else []
    sets = ["train.progress=false", *bench.budget, *bench.common, *run.overrides,
            *(f"{k}={seed}" for k in bench.seed_keys)]
    for s in sets:
        argv += ["--set", _fill(s, seed=seed, out=out)]
    argv += [_fill(a, seed=seed, out=out) for a in run.args]
    return [*argv, "--output-dir", str(folder)]


def plan(bench: BenchSpec, out: Path, seeds: tuple[int, ...], only: set[str] | None = None) -> list[Job]:
    """Every (run, seed) job, seed-major; ``only`` restricts to those runs (the others are not planned)."""
    known = {ep.name for ep in entry_points(group="vlp.methods")}
    for r in bench.runs:
        if r.method not in known:
            raise ValueError(f"{bench.path}: run {r.name!r} names method {r.method!r}, which is not installed "
                             f"(installed: {', '.join(sorted(known))})")
    jobs = []
    for seed in seeds:
        for r in bench.runs:
            if only is not None and r.name not in only:
                continue
            folder = out / "runs" / r.name / f"seed_{seed}"
            jobs.append(Job(r, seed, folder, run_argv(bench, r, seed, out, folder), out))
    return jobs


def read_evals(folder: Path) -> list[dict[str, float]]:
    """The run's ``eval.jsonl`` records, one per step, sorted by step. A step evaluated again (after a resume, or
    by a later ``<m>-eval`` of the folder, maybe on other sets) is merged into one record, later values winning.
    Unreadable lines (a line cut by a kill) are skipped."""
    path = folder / "eval.jsonl"
    by_step: dict[int, dict[str, float]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                by_step.setdefault(int(rec["step"]), {}).update(rec)
            except (ValueError, KeyError, TypeError):
                continue
    return [by_step[s] for s in sorted(by_step)]


def final_step(folder: Path) -> int | None:
    """``train.steps`` of the run folder's ``config.yaml`` (None before the run wrote it)."""
    try:
        return int(yaml.safe_load((folder / "config.yaml").read_text())["train"]["steps"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def is_finished(folder: Path) -> bool:
    if (folder / DONE_FILE).is_file():
        return True
    last = final_step(folder)
    return last is not None and any(r["step"] == last for r in read_evals(folder))


def _has_checkpoint(folder: Path) -> bool:
    from vlp_core.train.checkpoint import CheckpointManager

    ckpts = folder / "checkpoints"
    return ckpts.is_dir() and bool(CheckpointManager(ckpts).list())


def job_state(job: Job) -> str:
    """``done``, ``resume`` (a checkpoint exists), ``restart`` (an attempt left no checkpoint) or ``new``."""
    if is_finished(job.folder):
        return "done"
    if _has_checkpoint(job.folder):
        return "resume"
    return "restart" if job.folder.exists() else "new"


def check_folders(jobs: list[Job]) -> None:
    """Refuse a run folder started with other arguments, or not made by vlp-bench (one line per folder)."""
    problems = []
    for job in jobs:
        if not job.folder.exists() or not any(job.folder.iterdir()):
            continue
        try:
            saved = json.loads((job.folder / RUN_FILE).read_text())["argv"]
        except (OSError, ValueError, KeyError):
            problems.append(f"{job.folder} holds files not written by vlp-bench")
            continue
        if saved != job.portable_argv():
            old = set(saved) ^ set(job.portable_argv())
            problems.append(f"{job.folder} was started with other arguments (differing: {sorted(old)[:4]})")
    if problems:
        raise ValueError("; ".join(problems) + ": delete those folders or choose another --out")


def resolve_devices(gpus: str) -> list[str | None]:
    """The device slots: ``[None]`` (one job at a time, environment as it is), ``[""]`` for ``cpu`` (GPUs
    hidden), or one ``CUDA_VISIBLE_DEVICES`` value per GPU (``auto`` with two or more GPUs, or a list)."""
    if gpus == "cpu":
        return [""]
    if gpus != "auto":
        ids = [g.strip() for g in gpus.split(",") if g.strip()]
        if not ids:
            raise ValueError(f"--gpus {gpus!r}: expected auto, cpu or a comma-separated list of GPU ids")
        return list(ids)
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        return [None]
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[:n] if len(visible) >= n else [str(i) for i in range(n)]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _Pool:
    """Jobs handed to one worker thread per device slot; a job waits for the same seed of its ``after`` runs."""

    def __init__(self, jobs: list[Job], done: set[tuple[str, int]], say: Callable[[str], None]) -> None:
        self.pending = list(jobs)
        self.done = set(done)
        self.failed: dict[tuple[str, int], str] = {}
        self.planned = {j.key for j in jobs}
        self.cond = threading.Condition()
        self.procs: list[subprocess.Popen] = []
        self.stopping = False
        self.say = say
        self.total, self.started = len(jobs), 0

    def _next(self) -> Job | None:
        """Under the lock: the first job whose dependencies are done; None when nothing is left."""
        while True:
            if self.stopping or not self.pending:
                return None
            for job in self.pending:
                deps = [(a, job.seed) for a in job.run.after]
                bad = [d for d in deps if d in self.failed or (d not in self.planned and d not in self.done)]
                if bad:
                    self.pending.remove(job)
                    why = "failed" if bad[0] in self.failed else "not finished and not selected"
                    self.failed[job.key] = f"needs {bad[0][0]} seed {job.seed}, which {why}"
                    self.say(f"{job.label}: skipped: {self.failed[job.key]}")
                    break
                if all(d in self.done for d in deps):
                    self.pending.remove(job)
                    self.started += 1
                    return job
            else:
                self.cond.wait()

    def worker(self, device: str | None) -> None:
        while True:
            with self.cond:
                job = self._next()
                index = self.started
            if job is None:
                return
            try:
                ok, why = self._run(job, device, index)
            except Exception as e:  # noqa: BLE001 - one job's OSError must not stop the bench
                ok, why = False, f"{type(e).__name__}: {e}"
                self.say(f"{job.label}: FAILED: {why}")
            with self.cond:
                if ok:
                    self.done.add(job.key)
                else:
                    self.failed[job.key] = why
                self.cond.notify_all()

    def _run(self, job: Job, device: str | None, index: int) -> tuple[bool, str]:
        state = job_state(job)
        old_log = b""
        if state == "restart":  # the dead attempt's log stays: it may say why it died
            old_log = (job.folder / LOG_FILE).read_bytes() if (job.folder / LOG_FILE).is_file() else b""
            shutil.rmtree(job.folder)
        job.folder.mkdir(parents=True, exist_ok=True)
        if old_log:
            (job.folder / LOG_FILE).write_bytes(old_log)
        (job.folder / RUN_FILE).write_text(json.dumps({"argv": job.portable_argv(), "command": job.display()},
                                                      indent=1))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        where = "this machine's default device"
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
            where = f"GPU {device}" if device else "cpu"
        resume = state == "resume"
        self.say(f"[{index}/{self.total}] {job.label}: {'resuming' if resume else 'training'} on {where} "
                 f"-> {job.folder}")
        t0 = time.time()
        with open(job.folder / LOG_FILE, "a") as log:
            log.write(f"\n$ {job.display(resume)}\n")
            log.flush()
            with self.cond:
                if self.stopping:
                    return False, "stopped"
                proc = subprocess.Popen(job.command(resume), stdout=log, stderr=subprocess.STDOUT, env=env)
                self.procs.append(proc)
            rc = proc.wait()
        wall = time.time() - t0
        if rc != 0:
            why = f"exit status {rc}"
            if not self.stopping:
                log_path = job.folder / LOG_FILE
                self.say(f"{job.label}: FAILED ({why}); the end of {log_path}:\n{_tail(log_path)}")
            return False, why
        (job.folder / DONE_FILE).write_text(json.dumps({"wall_s": round(wall, 1), "resumed": resume,
                                                        "device": where, "finished": time.strftime("%FT%T")}))
        evals = read_evals(job.folder)
        from vlp_core.train.setup import format_results

        summary = format_results({k: v for k, v in evals[-1].items() if k != "step"}) if evals else "no evaluation"
        self.say(f"{job.label}: done in {wall:.0f} s: {summary}")
        return True, ""

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            procs = list(self.procs)
            self.cond.notify_all()
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


def execute(jobs: list[Job], devices: list[str | None], *, done: set[tuple[str, int]],
            say: Callable[[str], None] = print) -> dict[tuple[str, int], str]:
    """Run ``jobs`` (none of them finished) over the device slots; ``done``: jobs finished before (for ``after``).

    Returns the failed jobs with the reason. On KeyboardInterrupt (or SystemExit from a signal handler) the
    running trainers are terminated (their latest checkpoints remain, so the next invocation resumes them).
    """
    pool = _Pool(jobs, done, say)
    threads = [threading.Thread(target=pool.worker, args=(d,), daemon=True) for d in devices]
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(timeout=0.5)
    except BaseException:
        pool.stop()
        raise
    return pool.failed


def describe(job: Job, state: str) -> dict[str, Any]:
    return {"run": job.run.name, "seed": job.seed, "state": state, "folder": str(job.folder),
            "command": job.display(state == "resume")}
