import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py (pytest runs with importlib mode)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_EVAL = {"zeroshot_shape": 30, "zeroshot_color": 32, "zeroshot_color_shape": 48, "retrieval": 20,
             "compositional": 10, "retrieval_multi": 8}


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A small shapes world with pairs and interleaved documents (generated once per session)."""
    from vlp_core.data.synthetic import generate_world

    root = tmp_path_factory.mktemp("world") / "shapes"
    generate_world(root, seed=0, train_samples=200, docs=60, shard_size=100, eval_sizes=TINY_EVAL,
                   progress=False)
    return root


@pytest.fixture(scope="session")
def tokenizer(tiny_world):
    from vlp_core.data.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(str(tiny_world / "tokenizer.json"), context_length=96)
