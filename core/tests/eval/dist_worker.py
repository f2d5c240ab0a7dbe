"""torchrun worker for test_dist.py: sharded evaluation on 2 gloo ranks, results written per rank.

Usage: python -m torch.distributed.run --nproc_per_node 2 dist_worker.py <world_root> <out_dir>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from vlp_eval_testutils import DummyModel, WordTokenizer

from vlp_core.config import EvalConfig
from vlp_core.eval import EmbeddingScorer, retrieval_metrics_from_states, run_evaluation


def main() -> None:
    root, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = EvalConfig(zeroshot="zeroshot_color", retrieval="retrieval,retrieval_text", batch_size=3)
    model = DummyModel(image_size=16, dim=8, seed=0)
    out = run_evaluation(
        EmbeddingScorer(model),
        WordTokenizer(8),
        cfg,
        root=root,
        image_size=16,
        device="cpu",
        log=lambda s: None,
    )
    # States-level check with ties: identical random inputs on both ranks, queries split between them.
    g = torch.Generator().manual_seed(11)
    c2i = torch.randint(0, 9, (25,), generator=g)
    img, txt = (
        torch.randint(-1, 2, (9, 2), generator=g).float(),
        torch.randint(-1, 2, (25, 2), generator=g).float(),
    )
    states = retrieval_metrics_from_states(img, txt, c2i, lambda a, b: a @ b.T, chunk_size=4)
    out.update({f"states/{k}": v for k, v in states.items()})
    # Matched by text: 25 captions over 7 text rows (row 6 has none), queries split between the ranks.
    c2t = torch.randint(0, 6, (25,), generator=g)
    txt_T = torch.randint(-1, 2, (7, 2), generator=g).float()
    by_text = retrieval_metrics_from_states(img, txt_T, c2i, lambda a, b: a @ b.T, caption_to_text_M=c2t, chunk_size=4)
    out.update({f"states_text/{k}": v for k, v in by_text.items()})
    (out_dir / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
