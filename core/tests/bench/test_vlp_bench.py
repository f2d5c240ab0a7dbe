"""vlp-bench end to end: a 2-run x 2-seed file on the smoke preset, its table, JSON, PNG and TensorBoard curves
checked against the runs' own eval.jsonl records (read here directly), then a second invocation that trains
nothing, resume/restart decisions on copies of the folders, and the shipped bench files."""

import json
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from vlp_core.bench.cli import main
from vlp_core.bench.runner import job_state, plan
from vlp_core.bench.spec import load_bench

REPO = Path(__file__).resolve().parents[3]
RUNS, SEEDS = ("clip", "siglip"), (0, 1)
COUNT_LEAVES = {"n", "skipped", "n_images", "n_texts"}  # set sizes, not scores: JSON only


def write_bench(path: Path, world: Path, steps: int = 4) -> Path:
    path.write_text(yaml.safe_dump({
        "description": "two smoke runs",
        "seeds": list(SEEDS),
        "budget": {"train.steps": steps, "train.eval_every": 2, "train.batch_size": 16},
        "set": {"data.world_dir": str(world), "model.text.tokenizer": f"{world}/tokenizer.json",
                "train.save_every": 2, "data.workers": 0,
                # two of the tiny world's sets keep each evaluation (and the plots) short: 9 metrics
                "eval.zeroshot": "zeroshot_color", "eval.compositional": ""},
        "runs": [{"name": "clip", "method": "clip", "preset": "smoke"},
                 {"name": "siglip", "method": "clip", "preset": "smoke", "set": {"loss.kind": "siglip"}}],
    }))
    return path


@pytest.fixture(scope="module")
def bench(tiny_world, tmp_path_factory):
    pytest.importorskip("matplotlib")  # the bench extra (nox's tests session installs it)
    root = tmp_path_factory.mktemp("bench")
    file, out = write_bench(root / "smoke.yaml", tiny_world), root / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        assert main([str(file), "--out", str(out), "--jobs", "2"]) == 0
    return file, out


def raw_records(out: Path, run: str, seed: int) -> tuple[list[dict], int]:
    """The run folder's own eval.jsonl lines and its configured final step, read without vlp-bench."""
    folder = out / "runs" / run / f"seed_{seed}"
    records = [json.loads(line) for line in (folder / "eval.jsonl").read_text().splitlines()]
    return records, yaml.safe_load((folder / "config.yaml").read_text())["train"]["steps"]


def score_keys(record: dict) -> list[str]:
    return [k for k in record if k != "step" and k.rsplit("/", 1)[-1] not in COUNT_LEAVES]


def test_table_json_plots_and_tensorboard_hold_the_runs_numbers(bench):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out = bench
    results = json.loads((out / "results.json").read_text())
    table = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    rows = {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")] for line in table[1:3])}
    records = {(r, s): raw_records(out, r, s) for r in RUNS for s in SEEDS}
    metrics = score_keys(records["clip", 0][0][0])
    assert len(metrics) == 9 and header == ["run", "seeds", "step", *metrics]
    # the seeds are different runs: each sets train.seed and data.seed, and the final records differ
    for run in RUNS:
        for s in SEEDS:
            cfg = yaml.safe_load((out / "runs" / run / f"seed_{s}" / "config.yaml").read_text())
            assert cfg["train"]["seed"] == s and cfg["data"]["seed"] == s
    assert any(records["clip", 0][0][-1][m] != records["clip", 1][0][-1][m] for m in metrics)

    for run in RUNS:
        finals = []
        for s in SEEDS:
            recs, steps = records[run, s]
            assert [r["step"] for r in recs] == [2, 4] and steps == 4
            assert results["runs"][run]["seeds"][str(s)]["evals"] == recs  # every raw figure, counts included
            finals.append(next(r for r in recs if r["step"] == steps))
        assert rows[run][1:3] == ["2/2", "4"]
        for i, m in enumerate(metrics):
            values = [f[m] for f in finals]
            mean, std = statistics.fmean(values), statistics.stdev(values)
            summary = results["runs"][run]["summary"][m]
            assert summary["values"] == values
            assert summary["mean"] == pytest.approx(mean, abs=1e-12)
            assert summary["std"] == pytest.approx(std, abs=1e-12)
            assert rows[run][3 + i] == f"{mean:.2f} ± {std:.2f}", (run, m)

        # TensorBoard: every seed's curve, and the mean curve, under tb/<run>/
        for s in SEEDS:
            acc = EventAccumulator(str(out / "tb" / run / f"seed_{s}"))
            acc.Reload()
            assert set(acc.Tags()["scalars"]) == {f"eval/{m}" for m in metrics}
            for m in metrics:
                got = [(e.step, e.value) for e in acc.Scalars(f"eval/{m}")]
                assert got == [(r["step"], pytest.approx(r[m], rel=1e-6, abs=1e-6)) for r in records[run, s][0]]
        mean_acc = EventAccumulator(str(out / "tb" / run / "mean"))
        mean_acc.Reload()
        for m in metrics:
            want = [statistics.fmean(records[run, s][0][k][m] for s in SEEDS) for k in range(2)]
            assert [e.value for e in mean_acc.Scalars(f"eval/{m}")] == pytest.approx(want, rel=1e-6, abs=1e-6)

    # PNG: one per metric and all.png, real images; the curves drawn (kept in the PNG's vlp-bench text chunk)
    # are each run's mean, min and max over the seeds at every evaluation step
    for m in metrics:
        path = out / "plots" / (m.replace("/", "_") + ".png")
        with Image.open(path) as img:
            img.load()
            assert img.format == "PNG" and img.width >= 400 and img.height >= 300
            assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 20  # not a blank canvas
            drawn = json.loads(img.text["vlp-bench"])[m]
        for run in RUNS:
            per_step = list(zip(*(
                [r[m] for r in records[run, s][0]] for s in SEEDS)))
            assert drawn[run]["steps"] == [2, 4]
            assert drawn[run]["mean"] == pytest.approx([statistics.fmean(v) for v in per_step], abs=1e-12)
            assert drawn[run]["min"] == [min(v) for v in per_step]
            assert drawn[run]["max"] == [max(v) for v in per_step]
    with Image.open(out / "plots" / "all.png") as img:
        assert img.width >= 800 and set(json.loads(img.text["vlp-bench"])) == set(metrics)


def test_second_invocation_trains_nothing(bench, capsys):
    file, out = bench
    folders = [out / "runs" / r / f"seed_{s}" for r in RUNS for s in SEEDS]
    before = {f: ((f / "eval.jsonl").read_bytes(), (f / "bench.log").read_bytes(), sorted(
        p.name for p in (f / "checkpoints").iterdir())) for f in folders}
    summary = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    assert main([str(file), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "4 of 4 runs finished already, 0 to run" in said and "training on" not in said
    for f in folders:  # no process started: logs, records and checkpoints untouched
        assert ((f / "eval.jsonl").read_bytes(), (f / "bench.log").read_bytes(), sorted(
            p.name for p in (f / "checkpoints").iterdir())) == before[f]
    assert json.loads((out / "results.json").read_text()) == summary


def test_unfinished_runs_resume_or_restart_and_other_arguments_are_refused(bench, tmp_path, capsys, tiny_world):
    file, out = bench
    copy = tmp_path / "out"
    shutil.copytree(out / "runs", copy / "runs")
    jobs = {j.key: j for j in plan(load_bench(file), copy, SEEDS)}
    assert {job_state(j) for j in jobs.values()} == {"done"}
    # killed after its step-4 checkpoint, before the final evaluation: resumes from the checkpoint
    resumed = jobs["clip", 1].folder
    (resumed / "bench_done.json").unlink()
    lines = (resumed / "eval.jsonl").read_text().splitlines()
    (resumed / "eval.jsonl").write_text(lines[0] + "\n")
    assert job_state(jobs["clip", 1]) == "resume"
    # killed before any checkpoint: started again from an emptied folder
    restarted = jobs["siglip", 0].folder
    (restarted / "bench_done.json").unlink()
    (restarted / "eval.jsonl").unlink()
    shutil.rmtree(restarted / "checkpoints")
    assert job_state(jobs["siglip", 0]) == "restart"
    capsys.readouterr()
    assert main([str(file), "--out", str(copy), "--dry-run"]) == 0
    said = capsys.readouterr().out
    assert "# clip seed 1: resume" in said and "# siglip seed 0: restart" in said and "--resume latest" in said
    assert said.count(": done") == 2
    # the same folders with another budget are refused before anything runs, naming the folder
    other = write_bench(tmp_path / "other.yaml", tiny_world, steps=6)
    assert main([str(other), "--out", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "was started with other arguments" in err and "seed_0" in err and "train.steps=6" in err


def test_bench_files_name_existing_presets_and_keys():
    """Every shipped bench file (core/bench, packages/*/bench) reads, and each run's preset and --set keys exist
    (the config is built as the trainer builds it; paths made by earlier runs are not checked here)."""
    from importlib.metadata import entry_points

    from vlp_core.bench.launch import load_method
    from vlp_core.bench.runner import run_argv
    from vlp_core.config import apply_overrides

    files = sorted(REPO.glob("core/bench/*.yaml")) + sorted(REPO.glob("packages/*/bench/*.yaml"))
    assert any(f.parent.parent.name == "core" for f in files)
    installed = {ep.name for ep in entry_points(group="vlp.methods")}
    checked = 0
    for f in files:
        bench = load_bench(f)
        for run in bench.runs:
            if run.method not in installed:
                continue
            method = load_method(run.method)
            assert run.preset in method.presets, (f, run.name, run.preset)
            argv = run_argv(bench, run, 0, Path("/tmp/out"), Path("/tmp/out/runs/x"))
            sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
            apply_overrides(method.preset(run.preset), sets)  # unknown keys and bad values raise
            checked += 1
    assert checked >= 5


@pytest.mark.parametrize("text, message", [
    ("runs: []", "non-empty 'runs'"),
    ("runs: [{name: a, method: clip}, {name: a, method: clip}]", "used twice"),
    ("runs: [{name: a, method: clip, after: [b]}, {name: b, method: clip}]", "not runs listed before"),
    ("runs: [{name: 'a b', method: clip}]", "folder name"),
    ("runs: [{name: a, method: clip, sett: {}}]", "unknown key"),
    ("seeds: [0, 0]\nruns: [{name: a, method: clip}]", "without repeats"),
])
def test_bench_file_errors_are_one_line(tmp_path, text, message):
    path = tmp_path / "b.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as e:
        load_bench(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_pool_spreads_jobs_over_devices_and_waits_for_after(monkeypatch, tmp_path):
    """The scheduler alone (each job's process replaced by a short sleep): one job per device slot at a time,
    a run listed in 'after' finishes first for the same seed, and a failed one skips its dependants."""
    import threading
    import time

    from vlp_core.bench import runner
    from vlp_core.bench.spec import RunSpec

    stage1, stage2, other = RunSpec("stage1", "clip"), RunSpec("stage2", "clip", after=("stage1",)), \
        RunSpec("other", "clip")
    jobs = [runner.Job(r, s, tmp_path / r.name / str(s), [], tmp_path) for s in (0, 1) for r in (stage1, stage2, other)]
    events, lock, busy = [], threading.Lock(), {}

    def fake_run(self, job, device, index):
        with lock:
            assert device not in busy.values(), "two jobs on one device"
            busy[job.key] = device
            events.append(("start", job.key, device))
        time.sleep(0.05)
        with lock:
            del busy[job.key]
            events.append(("end", job.key, device))
        return (job.key != ("stage1", 1)), "exit status 2"

    monkeypatch.setattr(runner._Pool, "_run", fake_run)
    failed = runner.execute(jobs, ["0", "1"], done=set(), say=lambda msg: None)
    assert set(failed) == {("stage1", 1), ("stage2", 1)} and "stage1 seed 1" in failed["stage2", 1]
    order = [(kind, key) for kind, key, _ in events]
    assert order.index(("start", ("stage2", 0))) > order.index(("end", ("stage1", 0)))
    assert ("start", ("stage2", 1)) not in order
    assert {d for _, _, d in events} == {"0", "1"}  # both GPUs used
    assert len([e for e in events if e[0] == "start"]) == 5


def test_counts_are_not_scores():
    """Set sizes and the linear probe's split sizes stay out of the table and plots; every score stays in."""
    from vlp_core.bench.report import is_count

    counts = ["retrieval/n_images", "zeroshot_color/n", "retrieval/skipped", "zeroshot_color/probe_n_train",
              "zeroshot_color/probe_n_test"]
    scores = ["zeroshot_color/top1", "zeroshot_color/probe_top1", "zeroshot_color/probe_train_top1",
              "retrieval/mean_recall", "retrieval/i2t_R@1"]
    assert [is_count(m) for m in counts + scores] == [True] * len(counts) + [False] * len(scores)
