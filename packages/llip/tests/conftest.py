import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))  # llip_reference, shared with the torchrun worker

TINY_EVAL = {"zeroshot_shape": 60, "zeroshot_color": 64, "zeroshot_color_shape": 96, "retrieval": 50,
             "compositional": 40, "retrieval_multi": 40}


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A small shapes world for the end-to-end tests (generated once per session)."""
    from vlp_core.data.synthetic import generate_world

    root = tmp_path_factory.mktemp("world") / "shapes"
    generate_world(root, seed=0, train_samples=400, docs=8, shard_size=100, eval_sizes=TINY_EVAL,
                   progress=False)
    return root
