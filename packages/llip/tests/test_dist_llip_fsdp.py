"""Llip under FSDP2 and HSDP == DDP == one process: parameters after 3 trainer steps (2 gloo ranks, CPU).

vlp-core's parallel-equivalence worker (``vlp_core.testing.parallel``) with the Llip smoke model and loss,
whose text tensors travel around the ring of ranks with gradient: 3 steps in one process on whole batches and
on 2 ranks with half of each batch per rank.
"""

from pathlib import Path

import pytest

from vlp_core.testing.parallel import check_parallel_equivalence

pytestmark = pytest.mark.dist


def test_llip_fsdp_hsdp_ddp_match_one_process(tiny_world: Path, tmp_path: Path) -> None:
    check_parallel_equivalence(tiny_world, tmp_path, "vlp_llip")
