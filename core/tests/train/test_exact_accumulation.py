"""Exact accumulation: ``accum_steps=4`` at global batch 64 == ``accum_steps=1`` at global batch 64, through
the trainer, for InfoNCE and SigLIP (:mod:`vlp_core.testing.accumulate`); and the batch split and merge rules.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlp_core.clip import METHOD
from vlp_core.testing.accumulate import check_exact_accumulation
from vlp_core.train.accumulate import merge_features, split_batch


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_accumulated_step_equals_the_whole_batch(tiny_world: Path, tmp_path: Path, kind: str) -> None:
    check_exact_accumulation(METHOD, tiny_world, tmp_path, f"loss.kind={kind}")


def test_split_and_merge() -> None:
    batch = {"images": torch.arange(8).view(8, 1), "tokens": torch.arange(16).view(8, 2), "keys": list("abcdefgh"),
             "flag": True}
    chunks = split_batch(batch, 4)
    assert [c["keys"] for c in chunks] == [["a", "b"], ["c", "d"], ["e", "f"], ["g", "h"]]
    merged = merge_features(chunks)
    assert torch.equal(merged["tokens"], batch["tokens"]) and merged["keys"] == batch["keys"] and merged["flag"]
    assert float(merge_features([{"n": torch.tensor(2.0)}, {"n": torch.tensor(3.0)}])["n"]) == 5.0  # sums
    with pytest.raises(ValueError, match="does not split into 3"):
        split_batch(batch, 3)
