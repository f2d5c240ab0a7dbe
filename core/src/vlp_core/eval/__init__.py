"""Evaluation: zero-shot classification, image-text retrieval and the compositional probe.

Sets: the shapes world's shards, an ImageFolder root (ImageNet from WordNet-id folders with the shipped
class names and templates) and CLIP_benchmark's webdataset sets.

Every evaluator takes a :class:`vlp_core.method.Scorer` (``EmbeddingScorer`` for factorised models),
works in a single process or sharded over an initialised ``torch.distributed`` group, and keeps memory
linear in the size of the evaluation set.
"""

from vlp_core.eval.clip_benchmark import WdsEvalSet, load_wds_classification, load_wds_retrieval, open_wds_set
from vlp_core.eval.compositional import compositional_eval
from vlp_core.eval.datasets import (
    DEFAULT_TEMPLATES,
    ImageBatches,
    imagefolder_set_name,
    load_compositional_shards,
    load_imagefolder,
    load_retrieval_shards,
    load_zeroshot_shards,
)
from vlp_core.eval.imagenet import imagenet_classnames, imagenet_templates, imagenet_wnids
from vlp_core.eval.retrieval import retrieval_eval, retrieval_metrics_from_states
from vlp_core.eval.runner import preprocess_kwargs, run_evaluation
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
    "preprocess_kwargs",
    "DEFAULT_TEMPLATES",
    "ImageBatches",
    "load_zeroshot_shards",
    "load_imagefolder",
    "load_retrieval_shards",
    "load_compositional_shards",
    "imagefolder_set_name",
    "WdsEvalSet",
    "open_wds_set",
    "load_wds_classification",
    "load_wds_retrieval",
    "imagenet_classnames",
    "imagenet_templates",
    "imagenet_wnids",
]
