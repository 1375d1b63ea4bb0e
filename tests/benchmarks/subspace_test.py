"""The subspace benchmark measures what it says: its eigenpairs are the dense Hessian's, its shares are the
projections it names, and ``--quick`` runs end to end with DHO2's curvature actually installed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks import subspace


def _small_problem(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    x, y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    params = list(model.parameters())
    loss = torch.nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    rows = [torch.cat([h.reshape(-1) for h in torch.autograd.grad(flat[i], params, retain_graph=True)])
            for i in range(flat.numel())]
    return model, torch.stack(rows).double()


@pytest.mark.parametrize("which", ["LM", "LA"])
def test_top_eigenpairs_match_the_dense_hessian(which):
    _, hessian = _small_problem()
    dense_values, dense_vectors = torch.linalg.eigh(hessian)
    values, vectors = subspace.top_eigenpairs(lambda v: (hessian @ v.double()).float(), hessian.shape[0], 4, which)
    key = dense_values.abs() if which == "LM" else dense_values
    expected = dense_values[torch.argsort(key, descending=True)[:4]].numpy()
    np.testing.assert_allclose(values, expected, rtol=1e-3, atol=1e-6)
    # each returned vector is an eigenvector of H for its value
    residual = hessian.numpy() @ vectors - vectors * values
    assert np.abs(residual).max() < 1e-3 * np.abs(expected).max()


def test_subspace_measures_are_the_named_projections():
    vectors = np.eye(6)[:, :3]  # the first three coordinates
    values = np.array([4.0, -2.0, 1.0])
    grad = torch.tensor([1.0, 2.0, 0.0, 3.0, 0.0, 0.0])
    step = torch.tensor([-0.25, 0.0, 0.0, 1.0, 0.0, 0.0])
    out = subspace.subspace_measures(values, vectors, grad, step, grad, rank=2)
    assert out["grad_share"] == pytest.approx(5 / 14)
    assert out["update_share"] == pytest.approx(0.0625 / 1.0625)
    # a full Newton step along v1 is -1/4: AdamW's -0.25 is exactly one Newton step; along v2 it did not move
    assert out["adam_over_newton"] == pytest.approx([1.0, 0.0])
    assert out["newton_gain"] == pytest.approx(1 / 8 + 4 / 4)
    assert out["newton_gain_mean_gradient"] == pytest.approx(out["newton_gain"])


@pytest.mark.timeout(300)
def test_quick_run_writes_consistent_results(tmp_path):
    out = tmp_path / "subspace_quick"
    payload = subspace.main(["--quick", "--output-name", str(out)])
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["trajectories"][0]["task"] == "digits"
    assert out.with_suffix(".png").exists()
    for probe in payload["trajectories"][0]["probes"]:
        for part in ("hessian", "preconditioned"):
            assert 0.0 <= probe[part]["grad_share"] <= 1.0 + 1e-6
            assert 0.0 <= probe[part]["update_share"] <= 1.0 + 1e-6
            assert len(probe[part]["adam_over_newton"]) == subspace.RANK
        magnitudes = np.abs(probe["hessian_eigenvalues"])
        assert np.all(np.diff(magnitudes) <= 1e-9)
        assert probe["preconditioned"]["gap"] >= 1.0
    # DHO2 really ran with curvature in the full-batch comparison (80 steps > the 50-step warmup)
    assert all(row["dho2"]["curvature_installs"] >= 1 for row in payload["full_batch_digits"])
    assert all(np.isfinite(row["train_loss_ratio"]) for row in payload["full_batch_digits"])
