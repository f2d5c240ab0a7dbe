"""Exact accumulation under 2 gloo ranks: ``accum_steps=4`` == ``accum_steps=1`` at global batch 64.

Both runs train the CLIP smoke preset on 2 ranks (``vlp_core.testing.accum_worker``, one launch), so every
global batch is the same 64 samples split the same way over the ranks; the features each rank gathers from
the other (InfoNCE: all columns with gradient; SigLIP: the ring) then come from cached chunks, and the
parameters after 2 steps agree within 1e-5 of each tensor's largest value (AdamW eps 1e-3, see
vlp_core.testing.accumulate).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vlp_core.testing.accumulate import check_exact_accumulation_dist

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_two_ranks_accumulated_equals_whole_batch(tiny_world: Path, tmp_path: Path, kind: str) -> None:
    check_exact_accumulation_dist("vlp_core.clip", tiny_world, tmp_path, f"loss.kind={kind}")
