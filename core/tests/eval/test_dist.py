"""Sharded evaluation on 2 gloo ranks equals the single-process result, identically on both ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from vlp_eval_testutils import DummyModel, WordTokenizer, write_text_match_set, write_tiny_eval_sets

from vlp_core.config import EvalConfig
from vlp_core.eval import EmbeddingScorer, retrieval_metrics_from_states, run_evaluation


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
def test_two_rank_evaluation_equals_single_process(tmp_path: Path) -> None:
    write_tiny_eval_sets(tmp_path / "world")
    write_text_match_set(tmp_path / "world" / "eval" / "retrieval_text")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    here = Path(__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(here)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(here / "dist_worker.py"),
        str(tmp_path / "world"),
        str(out_dir),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]

    cfg = EvalConfig(zeroshot="zeroshot_color", retrieval="retrieval,retrieval_text", batch_size=3)
    single = run_evaluation(
        EmbeddingScorer(DummyModel(image_size=16, dim=8, seed=0)),
        WordTokenizer(8),
        cfg,
        root=tmp_path / "world",
        image_size=16,
        device="cpu",
        log=lambda s: None,
    )
    g = torch.Generator().manual_seed(11)
    c2i = torch.randint(0, 9, (25,), generator=g)
    img, txt = (
        torch.randint(-1, 2, (9, 2), generator=g).float(),
        torch.randint(-1, 2, (25, 2), generator=g).float(),
    )
    states = retrieval_metrics_from_states(img, txt, c2i, lambda a, b: a @ b.T, chunk_size=4)
    single.update({f"states/{k}": v for k, v in states.items()})
    c2t = torch.randint(0, 6, (25,), generator=g)
    txt_T = torch.randint(-1, 2, (7, 2), generator=g).float()
    by_text = retrieval_metrics_from_states(img, txt_T, c2i, lambda a, b: a @ b.T, caption_to_text_M=c2t, chunk_size=4)
    single.update({f"states_text/{k}": v for k, v in by_text.items()})
    assert set(ranks[0]) == set(single)
    for key, value in single.items():
        assert ranks[0][key] == pytest.approx(value, abs=1e-9), key
    assert single["retrieval/skipped"] == 1
    assert single["retrieval_text/n_texts"] == 5 and single["retrieval_text/n_images"] == 6
    assert single["states_text/n_texts"] == len(set(c2t.tolist()))
