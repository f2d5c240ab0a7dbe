"""Gates and adaptive loss against closed forms, the core CLIP loss and a plain-loop float64 reference."""

import math

import pytest
import torch
from vlp_alip import AlipConfig, AlipLoss, gate_weights, weighted_clip_loss
from vlp_alip_testutils import F64, ref_alip

from vlp_core.losses import clip_loss, normalize_features


def feats(n=6, d=5, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(n, d, generator=g, dtype=F64) for _ in range(3)]
    out[1] = out[1] + 0.8 * out[2]  # raw text correlated with the caption, so some samples pass the LCG
    return [o.requires_grad_(requires_grad) for o in out]


def make_loss(**kw) -> AlipLoss:
    return AlipLoss(AlipConfig(init_temperature=0.2, **kw)).to(F64)


def run(loss: AlipLoss, x, t, c, batch=None):
    return loss({"image_features": x, "text_features": t, "caption_features": c}, batch or {})


def test_weights_one_equal_core_clip_loss():
    x, t, c = feats()
    s = torch.tensor(math.log(1 / 0.2), dtype=F64)
    ours = weighted_clip_loss(normalize_features(x), normalize_features(t), normalize_features(x),
                              normalize_features(t), s.exp(), torch.ones(6, dtype=F64))
    core = clip_loss(x, t, s)
    torch.testing.assert_close(ours, core, rtol=1e-12, atol=0)
    g_ours = torch.autograd.grad(ours, (x, t))
    g_core = torch.autograd.grad(clip_loss(x, t, s), (x, t))
    for a, b in zip(g_ours, g_core):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_ungated_module_is_sum_of_two_clip_losses():
    x, t, c = feats(seed=1)
    loss = make_loss(use_ws=False, use_wt=False, use_wc=False)
    out = run(loss, x, t, c)
    want = clip_loss(x, t, loss.logit_scale) + clip_loss(x, c, loss.logit_scale)
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=0)
    assert out.parts["gate_ws_mean"] == 1 and out.parts["gate_wt_mean"] == 1 and out.parts["gate_wc_mean"] == 1


def test_gates_match_closed_form_worked_example():
    # Spec 3.3: H_tc=0.6, S_tc=0.4 -> W^s = e^-0.4; S_xt - H_xt = +0.1 -> W^t = e^0.2; S_xc - H_xc = -0.02.
    # Sample 1 agrees better than average (S_tc > H_tc), sample 2 sits exactly on H_tc: both get weight 1.
    s_tc = torch.tensor([0.4, 0.7, 0.6], dtype=F64)
    s_xt = torch.tensor([0.35, 0.1, 0.9], dtype=F64)
    s_xc = torch.tensor([0.28, -0.3, -0.9], dtype=F64)
    h_tc, h_xt, h_xc = (torch.tensor(v, dtype=F64) for v in (0.6, 0.25, 0.3))
    ws, wt, wc = gate_weights(s_tc, s_xt, s_xc, h_tc, h_xt, h_xc, gamma_s=2, gamma_p=2)
    torch.testing.assert_close(ws, torch.tensor([math.exp(-0.4), 1, 1], dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(wt, torch.tensor([math.exp(0.2), 1, 1], dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(wc, torch.tensor([math.exp(-0.04), 1, 1], dtype=F64), rtol=1e-12, atol=0)
    assert abs(float(ws[0] * wt[0]) - 0.819) < 1e-3 and abs(float(ws[0] * wc[0]) - 0.644) < 1e-3
    # other gammas enter as exponents: gamma_s = 3, gamma_p = 0.5
    ws, wt, wc = gate_weights(s_tc, s_xt, s_xc, h_tc, h_xt, h_xc, gamma_s=3, gamma_p=0.5)
    assert math.isclose(ws[0], math.exp(-0.6)) and math.isclose(wt[0], math.exp(0.05))
    assert math.isclose(wc[0], math.exp(-0.01))


def test_gate_invariants_and_no_gradient():
    g = torch.Generator().manual_seed(3)
    s_tc, s_xt, s_xc = (torch.rand(4000, generator=g, dtype=torch.float32) * 2 - 1 for _ in range(3))
    s_tc[:50] = 0.3 - 1e-9  # shortfalls so small that exp rounds to 1 in float32
    s_tc.requires_grad_(True)
    s_xt.requires_grad_(True)
    h = [torch.tensor(v) for v in (0.3, -0.2, 0.1)]
    ws, wt, wc = gate_weights(s_tc, s_xt, s_xc, *h)
    assert not (ws.requires_grad or wt.requires_grad or wc.requires_grad)
    assert ws.grad_fn is None and wt.grad_fn is None and wc.grad_fn is None
    assert bool((ws <= 1).all()) and bool((ws > 0).all())
    full = ws == 1
    assert bool((wt[full] == 1).all()) and bool((wc[full] == 1).all())
    assert 0 < int((~full).sum()) < 4000 and bool((wt[~full] > 1).any())  # DCG up-weights: unclipped


@pytest.mark.parametrize("use", [(True, True, True), (True, False, False), (False, True, False),
                                 (False, False, True)])
def test_module_matches_plain_reference(use):
    x, t, c = feats(n=7, seed=2)
    h0 = (0.55, 0.05, 0.1)
    loss = make_loss(momentum=0.9, use_ws=use[0], use_wt=use[1], use_wc=use[2])
    for buf, v in zip((loss.h_tc, loss.h_xt, loss.h_xc), h0):
        buf.fill_(v)
    out = run(loss, x, t, c)
    want, h_new, (ws, wt, wc) = ref_alip(x, t, c, loss.logit_scale, h0, m=0.9, use=use)
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=0)
    assert [float(v) for v in (loss.h_tc, loss.h_xt, loss.h_xc)] == list(h0)  # staged: H moves after the step
    for key, v in zip(("H_tc", "H_xt", "H_xc"), h_new):  # the new H, used by this step's gates
        assert math.isclose(float(out.parts[key]), v, rel_tol=1e-12)
    loss.after_step(torch.tensor(True))
    for buf, v in zip((loss.h_tc, loss.h_xt, loss.h_xc), h_new):
        assert math.isclose(float(buf), v, rel_tol=1e-12)
    assert math.isclose(float(out.parts["gate_ws_mean"]), sum(ws) / 7, rel_tol=1e-12)
    assert math.isclose(float(out.parts["gate_wt_mean"]), sum(wt) / 7, rel_tol=1e-12)
    assert math.isclose(float(out.parts["gate_wc_mean"]), sum(wc) / 7, rel_tol=1e-12)
    if use == (True, True, True):
        assert 0 < sum(w < 1 for w in ws) < 7  # the case exercises both branches of the gate
    # gradient: the reference treats the weights as constants, so equal gradients = weights detached
    params = (x, t, c, loss.logit_scale)
    got = torch.autograd.grad(out.loss, params)
    ref = torch.autograd.grad(want, params)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_running_average_starts_at_one_and_converges_to_the_mean():
    loss = AlipLoss(AlipConfig())
    assert float(loss.h_tc) == float(loss.h_xt) == float(loss.h_xc) == 1.0
    assert set(loss.state_dict()) == {"logit_scale", "h_tc", "h_xt", "h_xc"}  # the stage is not checkpointed
    x, t, c = (f.float().detach() for f in feats(n=16, seed=5))
    for step in range(1, 4):
        run(loss, x, t, c)
        loss.after_step(torch.tensor(True))
        s_xt = float((normalize_features(x) * normalize_features(t)).sum(-1).mean())
        want = 0.99**step * 1.0 + (1 - 0.99**step) * s_xt  # closed form of the EMA of a constant mean
        assert math.isclose(float(loss.h_xt), want, rel_tol=1e-5)


def test_running_average_moves_once_per_step_and_not_on_a_skipped_step():
    """Exact accumulation runs forward once per chunk on the whole batch's features; the NaN guard may skip a
    step: H moves once per after_step(True), from the last forward, and never on after_step(False)."""
    loss = make_loss(momentum=0.9)
    x, t, c = feats(n=6, seed=6, requires_grad=False)
    x2, t2, c2 = feats(n=6, seed=7, requires_grad=False)
    for _ in range(3):  # k chunk forwards on the same (whole-batch) features stage the same values
        first = run(loss, x, t, c)
    _, h1, _ = ref_alip(x, t, c, loss.logit_scale, (1.0, 1.0, 1.0), m=0.9)
    assert [float(v) for v in (loss.h_tc, loss.h_xt, loss.h_xc)] == [1.0, 1.0, 1.0]
    loss.after_step(torch.tensor(True))
    got = [float(v) for v in (loss.h_tc, loss.h_xt, loss.h_xc)]
    assert all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(got, h1)) and got != [1.0, 1.0, 1.0]
    loss.after_step(torch.tensor(True))  # no forward since: nothing staged, nothing moves
    assert [float(v) for v in (loss.h_tc, loss.h_xt, loss.h_xc)] == got
    second = run(loss, x2, t2, c2)  # a step whose update the NaN guard skips
    loss.after_step(torch.tensor(False))
    assert [float(v) for v in (loss.h_tc, loss.h_xt, loss.h_xc)] == got
    assert float(second.parts["H_tc"]) != got[0]  # it had staged a different H
    loss.after_step(torch.tensor(True))  # and a later step does not pick up the skipped step's stage
    assert [float(v) for v in (loss.h_tc, loss.h_xt, loss.h_xc)] == got
    assert first.parts["H_xt"].requires_grad is False


def test_noisy_clean_parts():
    x, t, c = feats(n=6, seed=4, requires_grad=False)
    loss = make_loss()
    noisy = torch.tensor([True, False, True, False, False, False])
    out = run(loss, x, t, c, {"raw_is_noisy": noisy})
    _, _, (ws, wt, _) = ref_alip(x, t, c, loss.logit_scale, (1.0, 1.0, 1.0))
    assert math.isclose(float(out.parts["gate_ws_noisy"]), (ws[0] + ws[2]) / 2, rel_tol=1e-12)
    assert math.isclose(float(out.parts["gate_w_xt_clean"]), sum(ws[i] * wt[i] for i in (1, 3, 4, 5)) / 4,
                        rel_tol=1e-12)
    assert math.isclose(float(out.parts["noisy_frac"]), 2 / 6)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="loss.momentum"):
        AlipConfig(momentum=1.0).validate()
    with pytest.raises(ValueError, match="loss.caption_key"):
        AlipConfig(caption_key=" ").validate()
    x, t, c = feats(requires_grad=False)
    with pytest.raises(ValueError, match="caption features"):
        run(make_loss(), x, t, c[:4])
