"""SimCSE against a plain loop; stage 2's gradient routing, adapter structure and layer-wise lr decay."""

from __future__ import annotations

import math

import pytest
import torch
from vlp_llm2clip import METHOD
from vlp_llm2clip.loss import simcse_loss
from vlp_llm2clip.model import TextProj, apply_layer_decay


def reference_simcse(q, p, n, scale):
    """Plain float64 loop: -log softmax over [all positives, all negatives] at the own positive."""
    total = 0.0
    docs = list(p) + (list(n) if n is not None else [])
    for i, qi in enumerate(q):
        logits = [scale * float(qi @ d / (qi.norm() * d.norm())) for d in docs]
        m = max(logits)
        total += -(logits[i] - m - math.log(sum(math.exp(x - m) for x in logits)))
    return total / len(q)


@pytest.mark.parametrize("with_negatives", [True, False])
def test_simcse_equals_plain_reference(with_negatives):
    g = torch.Generator().manual_seed(0)
    q, p, n = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(3))
    n = n if with_negatives else None
    got = simcse_loss(q, p, n, 50.0)
    assert float(got) == pytest.approx(reference_simcse(q, p, n, 50.0), rel=1e-10)


def test_simcse_is_one_directional():
    g = torch.Generator().manual_seed(1)
    q, p = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    assert float(simcse_loss(q, p, None, 20.0)) != pytest.approx(float(simcse_loss(p, q, None, 20.0)))


def _smoke_cfg(text_model):
    cfg = METHOD.preset("smoke")
    cfg.loss.text_model = str(text_model)
    cfg.model.text.tokenizer = str(text_model)
    return cfg


def test_stage2_gradients_reach_only_adapter_vision_and_scale(tiny_bert):
    from vlp_core.data.tokenizer import Tokenizer

    cfg = _smoke_cfg(tiny_bert)
    tok = Tokenizer.from_pretrained(str(tiny_bert), context_length=cfg.model.text.context_length)
    model, loss = METHOD.build_model(cfg, tok), METHOD.build_loss(cfg)
    batch = {"images": torch.randn(4, 3, 32, 32), "text_emb": torch.randn(4, 32)}
    model.encode_text(tok(["a red circle."]))  # builds the frozen text model
    out = loss(model(batch), batch)
    out.loss.backward()
    with_grad = {n for n, p in [*model.named_parameters(), *loss.named_parameters()]
                 if p.grad is not None and p.grad.abs().sum() > 0}
    groups = {n.split(".")[0] for n in with_grad}
    assert groups == {"visual", "image_proj", "text_adapter", "loss"}
    assert all(n.startswith(("visual.", "image_proj.", "text_adapter.", "loss.")) for n, _ in model.named_parameters())
    encoder = model._encoder[0]
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())
    assert not any(k.startswith("_encoder") for k in model.state_dict())  # not checkpointed


def test_text_proj_structure_and_l2_norm():
    torch.manual_seed(0)
    proj = TextProj(16, 8, layers=4, expansion=2)
    assert len(proj.blocks) == 4 and proj.blocks[0].fc1.weight.shape == (32, 16)
    e = torch.randn(3, 16)
    torch.testing.assert_close(proj(e), proj(7.5 * e))  # the embedding is L2-normalised first
    # Closed form of one block: x + W2 GELU(W1 LN x).
    b = proj.blocks[0]
    x = torch.nn.functional.normalize(e, dim=-1)
    ln = torch.nn.functional.layer_norm(x, (16,), b.norm.weight, b.norm.bias)
    ref = x + b.fc2(torch.nn.functional.gelu(b.fc1(ln)))
    torch.testing.assert_close(b(x), ref)


def test_layer_decay_scales(tiny_bert):
    from vlp_core.models.vit import build_vision_tower

    cfg = _smoke_cfg(tiny_bert)
    cfg.model.vision.depth = 3
    tower = build_vision_tower(cfg.model.vision)
    apply_layer_decay(tower, 0.5)
    scale = {n: getattr(p, "lr_scale", 1.0) for n, p in tower.trunk.named_parameters()}
    assert scale["blocks.0.attn.qkv.weight"] == 0.5**3 and scale["blocks.2.mlp.fc1.weight"] == 0.5
    assert scale["patch_embed.proj.weight"] == 0.5**4 and scale["pos_embed"] == 0.5**4
    assert scale["norm.weight"] == 1.0
