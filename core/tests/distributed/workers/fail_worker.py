"""torchrun worker for the run_torchrun tests: rank 1 prints a marker and exits 3 (no torch import: fast)."""

import os
import sys

if __name__ == "__main__":
    rank = int(os.environ["RANK"])
    print(f"worker rank={rank} world={os.environ['WORLD_SIZE']} args={sys.argv[1:]}", flush=True)
    if rank == 1:
        print("DELIBERATE-FAILURE-MARKER", file=sys.stderr, flush=True)
        sys.exit(3)
