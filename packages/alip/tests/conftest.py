"""Fixtures for the ALIP tests; the float64 reference lives in ``vlp_alip_testutils`` beside this file."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_EVAL = {"zeroshot_shape": 60, "zeroshot_color": 64, "zeroshot_color_shape": 96, "retrieval": 50,
             "compositional": 40, "retrieval_multi": 8}


@pytest.fixture(scope="session")
def noisy_world(tmp_path_factory):
    """A small shapes world with 40% noisy raw captions (generated once per session)."""
    from vlp_core.data.synthetic import generate_world

    root = tmp_path_factory.mktemp("world") / "shapes"
    generate_world(root, seed=0, train_samples=400, docs=8, shard_size=100, noise=0.4, eval_sizes=TINY_EVAL,
                   progress=False)
    return root
