"""torchrun worker: ``clip-train`` with the given arguments on every rank (the trainer does the sharding).

With ``VLP_DEBUG_KILL_AT_STEP`` every rank kills itself after that step's checkpoint; the trainer's barrier
before the kill guarantees rank 0 has finished writing it.
"""

import sys

from vlp_core.clip.cli import train_main

if __name__ == "__main__":
    raise SystemExit(train_main(sys.argv[1:]))
