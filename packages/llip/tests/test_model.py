"""Model invariants: folded output projection, caption conditioning, softmax over K, variants, bad configs."""

from __future__ import annotations

import pytest
import torch
from llip_reference import assert_close_rel, reference_score
from test_loss import F64, tiny_model
from vlp_llip import METHOD, LlipModel, LlipScorer, build_scorer
from vlp_llip.xattn import conditioned_embeddings, conditioned_embeddings_unfolded, mixture_weights


def batch(n: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"images": torch.randn(n, 3, 32, 32, generator=gen, dtype=F64),
            "tokens": torch.randint(1, 50, (n, 16), generator=gen)}


@pytest.mark.parametrize("use_norm", [False, True])
def test_folded_and_unfolded_output_projection_give_the_same_embeddings(use_norm: bool) -> None:
    model = tiny_model(use_norm=use_norm)
    b = batch()
    h_BKW = model.mixture_tokens(b["images"])
    keys = model.mixture.keys(h_BKW)
    query, _ = model.encode_text_pair(b["tokens"])
    folded = conditioned_embeddings(keys, model.mixture.folded_values(h_BKW), query, model.tau)
    direct = conditioned_embeddings_unfolded(keys, model.mixture.values(h_BKW), query,
                                             model.mixture.out_proj.weight, model.tau)
    assert folded.shape == (5, 5, 8)
    assert_close_rel(folded, direct, 1e-13, "folded vs unfolded")
    f32 = tiny_model(use_norm=use_norm).float()
    h32 = f32.mixture_tokens(b["images"].float())
    k32, q32 = f32.mixture.keys(h32), f32.encode_text_pair(b["tokens"])[0]
    torch.testing.assert_close(conditioned_embeddings(k32, f32.mixture.folded_values(h32), q32, 2.0),
                               conditioned_embeddings_unfolded(k32, f32.mixture.values(h32), q32,
                                                               f32.mixture.out_proj.weight, 2.0))


def test_changing_the_caption_changes_the_conditioned_embedding() -> None:
    model = tiny_model()
    b = batch(2)
    h_BKW = model.mixture_tokens(b["images"][:1])
    keys, values = model.mixture.keys(h_BKW), model.mixture.folded_values(h_BKW)
    query, _ = model.encode_text_pair(b["tokens"])  # two different captions
    z_1TD = conditioned_embeddings(keys, values, query, model.tau)
    assert (z_1TD[0, 0] - z_1TD[0, 1]).abs().max() > 1e-3 * z_1TD.abs().max()
    same = conditioned_embeddings(keys, values, query[:1].expand(2, -1, -1), model.tau)
    torch.testing.assert_close(same[0, 0], same[0, 1])


def test_mixture_weights_are_a_softmax_over_the_k_tokens_per_head_and_pair() -> None:
    model = tiny_model(K=3, heads=2)
    b = batch(4)
    keys = model.mixture.keys(model.mixture_tokens(b["images"]))
    query, _ = model.encode_text_pair(b["tokens"])
    a_VTHK = mixture_weights(keys, query, model.tau)
    assert a_VTHK.shape == (4, 4, 2, 3)
    assert (a_VTHK > 0).all()
    torch.testing.assert_close(a_VTHK.sum(-1), torch.ones(4, 4, 2, dtype=F64))
    # scores divided by tau only: doubling tau halves the log-ratios of the weights
    log_a = mixture_weights(keys, query, model.tau).log()
    log_a2 = mixture_weights(keys, query, 2 * model.tau).log()
    torch.testing.assert_close(log_a2 - log_a2[..., :1], (log_a - log_a[..., :1]) / 2)


def test_scorer_scores_every_pair_like_the_reference_and_blocks_do_not_matter() -> None:
    model = tiny_model(use_norm=True)
    b = batch(5)
    h_NKW, g_NW = model.mixture_tokens(b["images"]), model.text_hidden(b["tokens"])
    want = torch.stack([torch.stack([reference_score(model, h_NKW[i], g_NW[j], model.tau) for j in range(5)])
                        for i in range(5)])
    for block in (1, 37, 2**22):  # 1 element: 1 x 1 blocks; 37: ragged blocks; 2**22: one block
        scorer = LlipScorer(model, block_elements=block)
        got = scorer.score(scorer.image_states(b["images"]).double(), scorer.text_states(b["tokens"]).double())
        assert_close_rel(got, want, 1e-6, f"scores with block_elements={block}")  # states are float32


def test_class_states_average_queries_and_renormalise_targets() -> None:
    model = tiny_model()
    scorer = LlipScorer(model)
    tokens = batch(6)["tokens"]
    single = scorer.text_states(tokens[:3])
    # identical templates: the class state is the caption's own state
    torch.testing.assert_close(scorer.class_states(tokens[:3, None].expand(3, 4, 16)), single)
    # two templates: query = plain mean, target = normalise(mean of the normalised targets)
    q, t = model.encode_text_pair(tokens)
    t = torch.nn.functional.normalize(t, dim=-1)
    got = scorer.class_states(tokens.view(3, 2, 16))
    want_q = q.view(3, 2, -1).mean(1)
    want_t = torch.nn.functional.normalize(t.view(3, 2, -1).mean(1), dim=-1)
    torch.testing.assert_close(got, torch.cat([want_q, want_t], 1).float())


def test_register_variant_uses_the_first_token_only() -> None:
    model = tiny_model(variant="register")
    assert model.mixture is None and model.q_proj is None
    b = batch(3)
    h_BKW = model.mixture_tokens(b["images"])
    torch.testing.assert_close(model.encode_image(b["images"]), model.image_proj(h_BKW[:, 0]))
    assert set(model(b)) == {"image_features", "text_features"}
    assert not isinstance(build_scorer(model), LlipScorer)


def test_average_variants_are_the_uniform_and_learned_mixtures() -> None:
    b = batch(3)
    avg = tiny_model(variant="avg")
    h_BKW = avg.mixture_tokens(b["images"])
    folded = avg.mixture.folded_values(h_BKW)
    # uniform weights = Llip's pooling with all-zero keys
    uniform = conditioned_embeddings(torch.zeros(3, 2, 3, 4, dtype=F64), folded, torch.ones(1, 2, 4, dtype=F64),
                                     1.0)[:, 0]
    assert_close_rel(avg.encode_image(b["images"]), uniform, 1e-12, "avg")
    learned = tiny_model(variant="learned_avg")
    assert_close_rel(learned.encode_image(b["images"]), uniform, 1e-12, "learned_avg at zero logits")
    with torch.no_grad():
        learned.mix_logits.normal_()
    assert (learned.encode_image(b["images"]) - uniform).abs().max() > 1e-4


@pytest.mark.parametrize("std", [None, 1e-6, 0.5])
def test_mixture_tokens_start_at_the_configured_std(std: float | None) -> None:
    cfg = METHOD.preset("smoke")
    cfg.model.vision.extra_tokens, cfg.model.vision.width = 64, 64  # 4096 draws: the sample std within 5%
    cfg.loss.token_init_std = std
    torch.manual_seed(0)
    tokens = LlipModel(cfg.model, cfg.loss, vocab_size=50, pad_id=0).visual.trunk.reg_token
    want = 64**-0.5 if std is None else std  # None: Llip's width**-0.5
    assert tokens.shape == (1, 64, 64)
    assert abs(tokens.std().item() / want - 1) < 0.05 and abs(tokens.mean().item()) < 0.1 * want


def test_shared_head_init_starts_as_one_projection_of_the_pooled_tokens() -> None:
    """``loss.head_init='shared'``: at step 0 Llip's embedding is one value projection of the attention-pooled
    tokens (plain float64 loop over the K tokens); the K projections then train independently."""
    cfg = METHOD.preset("smoke")
    cfg.loss.head_init, cfg.loss.tau = "shared", 2.0
    torch.manual_seed(0)
    model = LlipModel(cfg.model, cfg.loss, vocab_size=50, pad_id=0).to(F64)
    head = model.mixture
    for p in (head.k_proj, head.v_proj):
        assert torch.equal(p, p[:1].expand_as(p)) and p.requires_grad and p.data_ptr() != p[1:].data_ptr()
    assert torch.equal(head.out_proj.weight, torch.eye(cfg.model.embed_dim, dtype=F64))
    b = batch(2)
    h_BKW = model.mixture_tokens(b["images"])
    query_BHd, _ = model.encode_text_pair(b["tokens"])
    keys_BHKd, values_BHKD = head.keys(h_BKW), head.folded_values(h_BKW)
    z = conditioned_embeddings(keys_BHKd, values_BHKD, query_BHd, model.tau)  # [V, T, D]
    H, d = query_BHd.shape[1:]
    for v in range(2):
        for t in range(2):
            want = []
            for hh in range(H):
                cols = slice(hh * d, (hh + 1) * d)
                scores = [float((query_BHd[t, hh] @ (h_BKW[v, k] @ head.k_proj[0][:, cols])).detach()) / model.tau
                          for k in range(h_BKW.shape[1])]
                a = torch.softmax(torch.tensor(scores, dtype=F64), 0)
                pooled = sum(a[k] * h_BKW[v, k] for k in range(h_BKW.shape[1]))
                want.append(pooled @ head.v_proj[0][:, cols])
            assert_close_rel(z[v, t], torch.cat(want), 1e-12, f"pair {v},{t}")
    z.sum().backward()
    assert not torch.equal(head.v_proj.grad[0], head.v_proj.grad[1])  # each token's projection has its own gradient


def test_llip_has_no_single_image_vector() -> None:
    with pytest.raises(ValueError, match="no single image vector"):
        tiny_model().encode_image(batch(2)["images"])


@pytest.mark.parametrize(
    "key, value, message",
    [("model.vision.extra_tokens", 0, "model.vision.extra_tokens"),
     ("model.vision.class_token", True, "model.vision.class_token"),
     ("model.vision.pool", "token", "model.vision.pool"),
     ("model.embed_dim", 30, "loss.heads"),
     ("loss.tau", 0.0, "loss.tau"),
     ("loss.chunk", 0, "loss.chunk"),
     ("loss.token_init_std", -1.0, "loss.token_init_std"),
     ("loss.head_init", "tied", "loss.head_init")],
)
def test_bad_settings_name_the_key(key: str, value: object, message: str) -> None:
    cfg = METHOD.preset("smoke")
    node = cfg
    *path, last = key.split(".")
    for part in path:
        node = getattr(node, part)
    setattr(node, last, value)
    with pytest.raises(ValueError, match=message):
        LlipModel(cfg.model, cfg.loss, vocab_size=50, pad_id=0)


def test_evaluation_scores_are_the_training_logits() -> None:
    """The scorer ranks by what the loss trains: ``scale * score + bias`` in the sigmoid loss over every pair
    gives the loss's value (so evaluation cannot score pairs differently from training), in eval mode."""
    model = tiny_model(use_norm=True).eval()
    cfg = METHOD.preset("smoke")
    cfg.loss.tau, cfg.loss.init_bias, cfg.loss.init_logit_scale = model.tau, -3.0, 1.7
    loss = METHOD.build_loss(cfg).to(F64)
    b = batch(6)
    with torch.no_grad():
        want = loss(model(b), b).loss
        scorer = LlipScorer(model)
        scores = scorer.score(scorer.image_states(b["images"]).double(), scorer.text_states(b["tokens"]).double())
        logits = loss.clamped_scale().exp() * scores + loss.logit_bias
        labels = 2 * torch.eye(6, dtype=F64) - 1
        got = -torch.nn.functional.logsigmoid(labels * logits).sum() / 6
    assert_close_rel(got, want, 1e-6, "loss from the scorer's scores")  # the scorer's states are float32
