"""DreamLIP under FSDP2 and HSDP == DDP == one process: parameters after 3 trainer steps (2 gloo
ranks, CPU), with DreamLIP's multi-positive and grouping losses."""

from pathlib import Path

import pytest

from vlp_core.testing.parallel import check_parallel_equivalence

pytestmark = pytest.mark.dist


def test_fsdp_hsdp_ddp_match_one_process(tiny_world: Path, tmp_path: Path) -> None:
    check_parallel_equivalence(tiny_world, tmp_path, "vlp_dreamlip")
