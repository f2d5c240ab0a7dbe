#!/usr/bin/env bash
# GPU check of vlp, ready to run on a CUDA machine that reaches no package registry.
#
#   tools/gpu_check.sh --build-wheels .whl      # HERE (with a registry): the wheels the GPU machine needs
#   tools/gpu_check.sh --wheels .whl            # THERE: install them (no index, no deps), then check
#   tools/gpu_check.sh                          # THERE, with vlp already importable (or from this checkout's src)
#
# Checks, in order (each prints PASS/FAIL; the script goes on after a failure and exits 1 if any failed):
#   1. pytest -m gpu over every package's tests (the CUDA tests: fused AdamW's on-device NaN guard, ...)
#   2. bf16 autocast: a CLIP step under bf16 autocast on CUDA is finite and its loss is within 2e-2 of fp32's
#   3. fused AdamW: the core's optimizer is fused on CUDA, one step equals the foreach AdamW's (1e-6), and a
#      step with found_inf set (the NaN guard's path) leaves every parameter unchanged
#   4. NCCL at world size 1: torchrun --nproc_per_node 1, a NCCL process group (the core makes none for one
#      rank, so the check makes it), all_reduce, the core's all_gather_with_grad, a DDP step, then a smoke
#      training run through the trainer on that group
#   5. tools/bench_step.py, ViT-B/16 at batch 256 in bf16, vlp beside OpenCLIP: samples/s, the ratio and MFU,
#      without and with torch.compile (each implementation its own way)
#
# Without a CUDA GPU it says so and exits 0: nothing is checked. It uses the machine's own torch; the wheel
# folder holds vlp's wheels (built here from this checkout) and the small pure-Python dependencies a bare
# GPU image lacks (open_clip_torch, ftfy, wcwidth, webdataset, braceexpand), never torch.
#
# Options: --wheels DIR | --build-wheels DIR | --python PY | --batch N (256) | --steps N (20)
#          --no-compile (skip the compiled bench) | --no-bench | -h
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WHEELS="" BUILD="" BATCH=256 STEPS=20 COMPILE=1 BENCH=1
DEPS="open_clip_torch ftfy wcwidth webdataset braceexpand"

usage() { sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --build-wheels) BUILD="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --batch) BATCH="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --no-compile) COMPILE=0; shift ;;
    --no-bench) BENCH=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
cd "$ROOT" || exit 2

if [ -n "$BUILD" ]; then  # on a machine with a registry: the project's wheels and the small dependencies
  mkdir -p "$BUILD" || exit 2
  BUILD="$(cd "$BUILD" && pwd)"
  SRC_COPY="$(mktemp -d)"
  for pkg in "$ROOT"/core "$ROOT"/packages/*/; do  # built from a copy: no build/ folders left in the checkout
    name="$(basename "$pkg")"
    cp -r "$pkg" "$SRC_COPY/$name" && rm -rf "$SRC_COPY/$name/build" "$SRC_COPY/$name"/src/*.egg-info
    "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$BUILD" "$SRC_COPY/$name" \
      || { echo "gpu_check: wheel of $pkg failed" >&2; rm -rf "$SRC_COPY"; exit 1; }
  done
  rm -rf "$SRC_COPY"
  pins=""
  for dep in $DEPS; do  # the versions tested here when installed, else the newest
    v="$("$PY" -m pip show "$dep" 2>/dev/null | sed -n 's/^Version: //p')"
    pins="$pins $dep${v:+==$v}"
  done
  # shellcheck disable=SC2086
  # For the GPU machine's interpreter (x86-64 Linux, CPython ${GPU_PYTHON:-3.12}), whatever this machine is.
  "$PY" -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "${GPU_PYTHON:-3.12}" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$BUILD" $pins || { echo "gpu_check: download of$pins failed" >&2; exit 1; }
  echo "gpu_check: wheels in $BUILD:"; ls -1 "$BUILD"
  exit 0
fi

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
  why="torch.cuda.is_available() is False"
  "$PY" -c 'import torch' >/dev/null 2>&1 || why="$PY cannot import torch"
  echo "gpu_check: NO CUDA GPU here ($why): nothing was checked, and no GPU figure was measured."
  echo "gpu_check: run it on a CUDA machine: tools/gpu_check.sh --wheels <folder from --build-wheels>"
  exit 0
fi

if [ -n "$WHEELS" ]; then
  SITE="${TMPDIR:-/tmp}/vlp-gpu-check-site"
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "gpu_check: no .whl in $WHEELS" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    || { echo "gpu_check: installing the wheels of $WHEELS failed" >&2; exit 2; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
elif ! "$PY" -c 'import vlp_core' >/dev/null 2>&1; then  # a checkout without an install: its src folders
  SRC="$ROOT/core/src"; for d in "$ROOT"/packages/*/src; do SRC="$SRC:$d"; done
  export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}"
fi
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
FAILED=()
step() {  # step NAME COMMAND...
  local name="$1"; shift
  echo; echo "=== $name"
  local t0=$SECONDS
  if "$@"; then echo "PASS $name ($((SECONDS - t0)) s)"; else echo "FAIL $name ($((SECONDS - t0)) s)"; FAILED+=("$name"); fi
}

nvidia-smi -L 2>/dev/null || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())' || exit 1
"$PY" -c 'import vlp_core, open_clip, webdataset, ftfy; print("vlp_core from", vlp_core.__file__)' \
  || echo "gpu_check: a dependency is missing (pass --wheels <folder from --build-wheels>)"

# shellcheck disable=SC2046
step "pytest -m gpu" "$PY" -m pytest -m gpu -q -p no:cacheprovider core/tests $(ls -d packages/*/tests)

cat > "$WORK/autocast_adamw.py" <<'EOF'
"""bf16 autocast of a CLIP step; fused AdamW == foreach AdamW; found_inf (the NaN guard) skips the step."""
import copy
import sys

import torch

from vlp_core.clip import METHOD
from vlp_core.train.loop import TrainStep
from vlp_core.train.optim import build_optimizer

dev = torch.device("cuda")
cfg = METHOD.preset("smoke")
torch.manual_seed(0)


class Tok:
    vocab_size, pad_id = 1000, 0


step = TrainStep(METHOD.build_model(cfg, Tok()), METHOD.build_loss(cfg)).to(dev)
batch = {"images": torch.randn(16, 3, 32, 32, device=dev), "tokens": torch.randint(4, 1000, (16, 16), device=dev)}
batch["tokens"][:, -1] = 3
fp32 = step(batch).loss
with torch.autocast("cuda", dtype=torch.bfloat16):
    bf16 = step(batch).loss
bf16.backward()
grads_finite = all(torch.isfinite(p.grad).all() for p in step.parameters() if p.grad is not None)
print(f"autocast: fp32 loss {fp32.item():.5f}, bf16 loss {bf16.item():.5f}, gradients finite: {grads_finite}")
ok = grads_finite and abs(fp32.item() - bf16.item()) < 2e-2

other = copy.deepcopy(step)
fused = build_optimizer(step, cfg.optim, device=dev)
plain = torch.optim.AdamW(other.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                          eps=cfg.optim.eps, weight_decay=0.0, foreach=True)
groups = [dict(g) for g in fused.param_groups]  # same lr/wd per group, by parameter order
plain.param_groups.clear()
names = {id(p): i for i, p in enumerate(step.parameters())}
mirror = list(other.parameters())
for g in groups:
    plain.add_param_group({**{k: v for k, v in g.items() if k != "params"},
                           "params": [mirror[names[id(p)]] for p in g["params"]], "foreach": True, "fused": None})
for p, q in zip(step.parameters(), other.parameters()):
    q.grad = None if p.grad is None else p.grad.clone()
is_fused = bool(fused.defaults.get("fused"))
fused.step()
plain.step()
diff = max((p - q).abs().max().item() for p, q in zip(step.parameters(), other.parameters()))
print(f"fused AdamW: fused={is_fused}, max |fused - foreach| after one step {diff:.2e}")
ok = ok and is_fused and diff < 1e-6

before = [p.detach().clone() for p in step.parameters()]
fused.found_inf = torch.ones((), device=dev)  # what the NaN guard sets for a non-finite step
fused.step()
unchanged = all(torch.equal(a, p) for a, p in zip(before, step.parameters()))
print(f"NaN guard: a step with found_inf=1 leaves the parameters unchanged: {unchanged}")
sys.exit(0 if ok and unchanged else 1)
EOF
step "bf16 autocast, fused AdamW, NaN guard" "$PY" "$WORK/autocast_adamw.py"

cat > "$WORK/nccl_world1.py" <<'EOF'
"""NCCL at world size 1 (under torchrun): collectives, a DDP step, then a smoke run of the trainer."""
import os
import sys

import torch
import torch.distributed as dist

torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
from vlp_core.distributed import all_gather_with_grad, init_distributed

info = init_distributed()
assert info.backend == "nccl" and info.world_size == 1, info
x = torch.arange(4.0, device="cuda", requires_grad=True)
y = x.detach().clone()
dist.all_reduce(y)
g = all_gather_with_grad(x)
g.sum().backward()
assert torch.equal(y, x.detach()) and g.shape == (4,) and torch.equal(x.grad, torch.ones(4, device="cuda"))
ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 2).cuda(), device_ids=[info.device.index])
ddp(torch.randn(4, 8, device="cuda")).sum().backward()
print("nccl: all_reduce, all_gather_with_grad and a DDP step at world size 1 ok")
from vlp_core.clip import METHOD
from vlp_core.config import apply_overrides
from vlp_core.train.loop import run

cfg = apply_overrides(METHOD.preset("smoke"), [f"data.world_dir={sys.argv[1]}/world", f"train.output_dir={sys.argv[1]}/run",
                                               "train.progress=false", "eval.at_end=false", "data.workers=0"])
run(cfg, METHOD)
print("nccl: smoke training run on the NCCL group ok")
dist.destroy_process_group()
EOF
step "NCCL, world size 1 (torchrun)" "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 "$WORK/nccl_world1.py" "$WORK"

if [ "$BENCH" = 1 ]; then
  step "bench ViT-B/16 batch $BATCH bf16" "$PY" tools/bench_step.py --preset vit_b16 --batch "$BATCH" --precision bf16 \
    --steps "$STEPS" --warmup 3
  if [ "$COMPILE" = 1 ]; then
    step "bench ViT-B/16 batch $BATCH bf16 compile" "$PY" tools/bench_step.py --preset vit_b16 --batch "$BATCH" \
      --precision bf16 --steps "$STEPS" --warmup 3 --compile
  fi
fi

echo
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "gpu_check: FAILED: ${FAILED[*]}"
  exit 1
fi
echo "gpu_check: all checks passed"
