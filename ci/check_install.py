"""Run inside a fresh venv holding only the built wheels: every vlp-* package must come from a wheel
(not an editable checkout, not an index), and every console script must answer --help; vlp-core's CLIs
then run for real on a tiny shapes world."""

from __future__ import annotations

import importlib.metadata as md
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
            out = subprocess.run([str(bin_dir / ep.name), "--help"], capture_output=True, text=True)
            if out.returncode != 0 or "usage" not in out.stdout:
                raise SystemExit(f"{ep.name} --help failed:\n{out.stdout}\n{out.stderr}")
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
print("wheel install check passed")
