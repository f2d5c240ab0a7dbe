"""Run inside a fresh venv holding only the built wheels: every vlp-* package must come from a wheel
(not an editable checkout, not an index), and every console script must answer --help; vlp-core's CLIs
then run for real on a tiny shapes world."""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

bin_dir = Path(sys.executable).parent
dists = [d for d in md.distributions() if (d.metadata["Name"] or "").lower().startswith("vlp-")]
assert dists, "no vlp-* distribution installed"
for d in dists:
    direct = d.read_text("direct_url.json")
    info = json.loads(direct) if direct else {}
    if info.get("dir_info", {}).get("editable"):
        raise SystemExit(f"{d.metadata['Name']} is an editable install, not the built wheel")
    if not info.get("url", "").endswith(".whl"):
        raise SystemExit(f"{d.metadata['Name']} was not installed from the local wheel: {info}")
    for ep in d.entry_points:
        if ep.group == "console_scripts":
            # In this process (one torch import for all of them, not one per script): the installed script
            # exists, its entry point imports from the wheel and answers --help with a usage text.
            if not (bin_dir / ep.name).is_file():
                raise SystemExit(f"{ep.name}: no console script in {bin_dir}")
            out, code = io.StringIO(), None
            sys.argv = [ep.name, "--help"]
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
                try:
                    code = ep.load()()
                except SystemExit as e:
                    code = e.code
            if code not in (0, None) or "usage" not in out.getvalue():
                raise SystemExit(f"{ep.name} --help failed (exit {code}):\n{out.getvalue()}")
            print(f"ok: {ep.name} --help ({d.metadata['Name']} {d.version})")

with tempfile.TemporaryDirectory() as tmp:
    world, run = Path(tmp) / "world", Path(tmp) / "run"

    def sh(*cmd: str) -> None:
        print("$", " ".join(cmd), flush=True)
        subprocess.run([str(bin_dir / cmd[0]), *cmd[1:]], check=True, cwd=tmp)

    sh("vlp-data", "synth", "--out", str(world), "--train-samples", "200", "--docs", "4", "--eval-size", "40")
    sh("clip-train", "--preset", "smoke", "--set", f"data.world_dir={world}", "--output-dir", str(run),
       "--set", "train.progress=false")
    sh("clip-eval", str(run))
    # vlp-bench from the wheel (without its plotting extra): a bench file's jobs and resolved configs
    bench = Path(tmp) / "bench.yaml"
    bench.write_text(f"set: {{data.world_dir: '{world}'}}\nruns: [{{name: smoke, method: clip, preset: smoke}}]\n")
    sh("vlp-bench", str(bench), "--out", str(Path(tmp) / "bench"), "--dry-run")
    # The converter and the assets shipped as package data (CLIP BPE vocabulary, ImageNet names/templates).
    sh("vlp-convert", str(run), str(Path(tmp) / "run.safetensors"))
    sh("clip-eval", str(Path(tmp) / "run.safetensors"), "--set", f"data.world_dir={world}")
    check = ("from vlp_core.data.tokenizer import Tokenizer; t = Tokenizer.from_pretrained('clip-bpe', "
             "context_length=77); assert t('a photo of a cat')[0, :6].tolist() == [49406, 320, 1125, 539, 320, 2368]"
             "; from vlp_core.eval.imagenet import imagenet_classnames as c, imagenet_templates as t"
             "; assert len(c()) == 1000 and len(t()) == 80")
    subprocess.run([sys.executable, "-c", check], check=True, cwd=tmp)
    print("ok: clip-bpe and the ImageNet metadata load from the wheel")
print("wheel install check passed")
