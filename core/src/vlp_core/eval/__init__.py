"""Evaluation: zero-shot classification, image-text retrieval and the compositional probe.

Every evaluator takes a :class:`vlp_core.method.Scorer` (``EmbeddingScorer`` for factorised models),
works in a single process or sharded over an initialised ``torch.distributed`` group, and keeps memory
linear in the size of the evaluation set.
"""

from vlp_core.eval.compositional import compositional_eval
from vlp_core.eval.datasets import (
    DEFAULT_TEMPLATES,
    ImageBatches,
    load_compositional_shards,
    load_imagefolder,
    load_retrieval_shards,
    load_zeroshot_shards,
)
from vlp_core.eval.retrieval import retrieval_eval, retrieval_metrics_from_states
from vlp_core.eval.runner import run_evaluation
from vlp_core.eval.scorer import EmbeddingScorer
from vlp_core.eval.zeroshot import compute_class_states, zeroshot_eval

__all__ = [
    "EmbeddingScorer",
    "zeroshot_eval",
    "compute_class_states",
    "retrieval_eval",
    "retrieval_metrics_from_states",
    "compositional_eval",
    "run_evaluation",
    "DEFAULT_TEMPLATES",
    "ImageBatches",
    "load_zeroshot_shards",
    "load_imagefolder",
    "load_retrieval_shards",
    "load_compositional_shards",
]
