"""torchrun worker for the run_torchrun timeout test: records its pid, then sleeps far past the timeout."""

import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    Path(sys.argv[1]).write_text(str(os.getpid()))
    time.sleep(300)
