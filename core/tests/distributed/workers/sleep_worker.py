"""torchrun worker for the run_torchrun timeout test: records its pid, then sleeps far past the timeout."""

import sys
import time
from pathlib import Path

if __name__ == "__main__":
    Path(sys.argv[1]).write_text(str(__import__("os").getpid()))
    time.sleep(300)
