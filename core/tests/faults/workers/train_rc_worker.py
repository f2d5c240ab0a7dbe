"""``clip-train`` with the given arguments on this rank; its exit status is also written to
``$VLP_TEST_RC_DIR/rank_<RANK>`` so that a test sees every rank's status (torchrun reports its own only)."""

import os
import sys
from pathlib import Path

from vlp_core.clip.cli import train_main

if __name__ == "__main__":
    rc = train_main(sys.argv[1:])
    folder = os.environ.get("VLP_TEST_RC_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        Path(folder, f"rank_{os.environ.get('RANK', '0')}").write_text(str(rc))
    raise SystemExit(rc)
