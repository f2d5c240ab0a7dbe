"""Evaluation keeps an explicit caption -> image index (ragged caption counts; no COCO-style reshape)."""

from __future__ import annotations

import torch
from vlp_llm2clip import METHOD

from vlp_core.data.tokenizer import Tokenizer
from vlp_core.data.transforms import prepare_images
from vlp_core.eval import EmbeddingScorer
from vlp_core.eval.retrieval import retrieval_eval


def test_ragged_captions_match_dense_reference(tiny_bert):
    cfg = METHOD.preset("smoke")
    cfg.loss.text_model = cfg.model.text.tokenizer = str(tiny_bert)
    tok = Tokenizer.from_pretrained(str(tiny_bert), context_length=32)
    torch.manual_seed(0)
    model = METHOD.build_model(cfg, tok).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
    captions = ["a red circle.", "a blue star.", "a small blue star.", "a blue star at the top left.",
                "a green cross.", "a large green cross.", "a white hexagon."]
    c2i = torch.tensor([0, 1, 1, 1, 2, 2, 3])  # 1, 3, 2 and 1 captions: any fixed reshape would misalign
    got = retrieval_eval(EmbeddingScorer(model), [(images, torch.arange(4))], captions, c2i, tok, device="cpu",
                         batch_size=3)
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(prepare_images(images, "cpu")).double(), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tok(captions)).double(), dim=-1)
    scores = img @ txt.T  # [images, captions]
    t2i = (scores.argmax(dim=0) == c2i).double().mean() * 100
    i2t = (c2i[scores.argmax(dim=1)] == torch.arange(4)).double().mean() * 100
    assert abs(got["t2i_R@1"] - float(t2i)) < 1e-6 and abs(got["i2t_R@1"] - float(i2t)) < 1e-6
    assert got["n_texts"] == 7 and got["n_images"] == 4
