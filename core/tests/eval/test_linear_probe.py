"""Linear probe: optimality (KKT) against an independent autograd gradient, separable data, sharded order."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlp_core.eval import linear_probe as lp


def _blobs(n: int, f: int, c: int, seed: int = 0, spread: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(c, f, generator=g, dtype=torch.float64)
    y = torch.arange(n) % c
    return centres[y] + spread * torch.randn(n, f, generator=g, dtype=torch.float64), y


def test_fit_is_the_regularised_optimum() -> None:
    x, y = _blobs(90, 5, 3, spread=3.0)  # overlapping classes: a non-trivial optimum
    W, b, mean, std = lp.fit_linear_probe(x, y, 3, weight_decay=0.05)
    # Independent check: the gradient of the objective at the returned point is zero.
    Wv, bv = W.clone().requires_grad_(), b.clone().requires_grad_()
    z = (x - x.mean(0)) / x.std(0, unbiased=False)
    loss = F.cross_entropy(z @ Wv + bv, y) + 0.025 * (Wv * Wv).sum()
    gW, gb = torch.autograd.grad(loss, [Wv, bv])
    assert float(gW.abs().max()) < 1e-6 and float(gb.abs().max()) < 1e-6
    torch.testing.assert_close(mean, x.mean(0))


def test_separable_features_are_classified_perfectly() -> None:
    x, y = _blobs(120, 8, 4)
    metrics = lp.linear_probe_eval(x, y, 4, test_every=3)
    assert metrics["top1"] == 100.0 and metrics["train_top1"] == 100.0
    assert metrics["n_test"] == 40 and metrics["n_train"] == 80
    # Random labels cannot be predicted on held-out data (chance is 25%).
    y_rand = torch.randint(0, 4, (120,), generator=torch.Generator().manual_seed(1))
    assert lp.linear_probe_eval(x, y_rand, 4)["top1"] < 60.0


def test_extract_features_restores_position_order(monkeypatch) -> None:
    """A 2-rank gather (rank-major rows) comes back in sample order, the same as one process."""
    x, y = _blobs(7, 3, 2)
    ident = lambda images: images.flatten(1).double()  # noqa: E731
    images = x.view(7, 3, 1, 1)

    def shares(world):
        return [[(images[r::world], y[r::world])] for r in range(world)]

    one = lp.extract_features(ident, shares(1)[0], device="cpu")
    gathered = {}
    for r in range(2):
        monkeypatch.setattr(lp, "dist_rank_world", lambda r=r: (r, 2))
        monkeypatch.setattr(lp, "all_gather_rows", lambda t, device, r=r: gathered.setdefault(r, []).append(t) or t)
        lp.extract_features(ident, shares(2)[r], device="cpu")
    cat = [torch.cat([gathered[0][i], gathered[1][i]]) for i in range(3)]
    calls = iter(cat)
    monkeypatch.setattr(lp, "dist_rank_world", lambda: (0, 2))
    monkeypatch.setattr(lp, "all_gather_rows", lambda t, device: next(calls))
    two = lp.extract_features(ident, shares(2)[0], device="cpu")
    torch.testing.assert_close(two[0], one[0])
    assert torch.equal(two[1], one[1])
