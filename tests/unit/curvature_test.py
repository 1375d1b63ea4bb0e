"""Curvature estimation against an exact dense Hessian, and the HVP strategies (product sessions).

The reference Hessian is computed independently of ``ds_dho2`` with ``torch.autograd.functional.hessian``
on the flattened parameter vector (through ``torch.func.functional_call``).
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from ds_dho2 import estimate_top_eigenpairs
from ds_dho2.config import HVPMethod
from ds_dho2.hvp.selection import ProductInputs, StrategyChooser, open_session

STRATEGIES = ("forward", "reverse", "finite_difference")
TOP = 4


class _Problem:
    """A model, its loss closure and the exact dense Hessian of that loss (eval mode, math attention)."""

    def __init__(self, model: torch.nn.Module, kwargs: dict, loss_of_output) -> None:
        self.model, self.kwargs, self.loss_of_output = model, kwargs, loss_of_output
        self.params = list(model.parameters())
        self.names = [n for n, _ in model.named_parameters()]
        self.P = sum(p.numel() for p in self.params)
        was_training = model.training
        model.eval()
        x0 = torch.cat([p.detach().reshape(-1) for p in self.params])
        with sdpa_kernel([SDPBackend.MATH]):
            self.hessian = torch.autograd.functional.hessian(self._flat_loss, x0, vectorize=True)
        model.train(was_training)
        self.hessian = 0.5 * (self.hessian + self.hessian.t())
        values, vectors = torch.linalg.eigh(self.hessian)
        self.values, self.vectors = values.flip(0), vectors.flip(1)  # descending (algebraic)

    def _flat_loss(self, flat: torch.Tensor) -> torch.Tensor:
        tensors, offset = {}, 0
        for name, p in zip(self.names, self.params):
            tensors[name] = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        return self.loss_of_output(functional_call(self.model, tensors, (), dict(self.kwargs)))

    def closure(self) -> torch.Tensor:
        return self.loss_of_output(self.model(**self.kwargs))


def _mlp_problem() -> _Problem:
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3)).double()
    x = torch.randn(32, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, inputs, targets):
            return torch.nn.functional.cross_entropy(self.net(inputs), targets)

    wrapped = Wrapped()
    return _Problem(wrapped, {"inputs": x, "targets": y}, lambda out: out)


def _gpt2_problem() -> _Problem:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16,
                                     attn_implementation="sdpa")
    model = transformers.GPT2LMHeadModel(config).double()
    model.train()
    ids = torch.randint(0, 50, (2, 8))
    # Hugging Face's ``output.loss`` upcasts logits with ``.float()``, i.e. to float32 even for a float64
    # model; the reference problem computes the same causal-LM loss in float64 from the logits instead.
    problem = _Problem(model, {"input_ids": ids}, lambda out: _causal_lm_loss(out.logits, ids))
    problem.ids = ids
    return problem


def _causal_lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _hf_loss_closure(problem: _Problem):
    """The model's own ``labels`` loss (computed by transformers in float32)."""
    return lambda: problem.model(input_ids=problem.ids, labels=problem.ids).loss


def _products(strategy: str, model, params, closure, vectors) -> list[torch.Tensor]:
    """One product through a session of ``strategy`` ("auto" measures and chooses)."""
    inputs = ProductInputs(model=model, params=list(params), replay=closure, full_replay=closure)
    chooser = StrategyChooser(HVPMethod(strategy))
    session = chooser.open(inputs, expected_products=1) if strategy == "auto" else open_session(HVPMethod(strategy),
                                                                                                 inputs)
    try:
        return session(vectors)
    finally:
        session.close()


@pytest.fixture(scope="module")
def mlp() -> _Problem:
    return _mlp_problem()


@pytest.fixture(scope="module")
def gpt2() -> _Problem:
    return _gpt2_problem()


def _problem(request, name: str) -> _Problem:
    return request.getfixturevalue(name)


def test_reference_spectra_have_separated_top_eigenvalues(mlp, gpt2):
    for problem in (mlp, gpt2):
        top = problem.values[: TOP + 1]
        gaps = (top[:-1] - top[1:]) / top[:-1].abs()
        assert torch.all(gaps > 0.01), (problem.P, top, gaps)
        assert problem.values[0] > 0
    assert mlp.P == 103
    assert 1000 < gpt2.P < 5000


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name, order", [("mlp", None), ("gpt2", 80)])
def test_top_eigenpairs_match_dense_hessian(request, name, order, strategy):
    problem = _problem(request, name)
    order = problem.P if order is None else order
    values, vectors = estimate_top_eigenpairs(problem.model, problem.closure, TOP, order=order, seed=1,
                                              hvp=strategy)
    assert values.shape == (TOP,) and vectors.shape == (TOP, problem.P)
    assert values.dtype == torch.float64
    expected = problem.values[:TOP]
    rel_err = ((values - expected).abs() / expected.abs()).max().item()
    assert rel_err < 1e-4, (values, expected)
    assert torch.all(values[:-1] >= values[1:])  # descending
    cos = (vectors @ problem.vectors[:, :TOP]).diagonal().abs()
    assert torch.all(cos > 0.999), cos
    assert torch.allclose(vectors.norm(dim=1), torch.ones(TOP, dtype=torch.float64), atol=1e-8)


@pytest.mark.parametrize("name", ["mlp", "gpt2"])
def test_hvp_strategies_agree_with_each_other_and_dense_hessian(request, name):
    problem = _problem(request, name)
    generator = torch.Generator().manual_seed(7)
    for _ in range(2):
        flat = torch.randn(problem.P, generator=generator, dtype=torch.float64)
        vectors, offset = [], 0
        for p in problem.params:
            vectors.append(flat[offset:offset + p.numel()].view_as(p).clone())
            offset += p.numel()
        expected = problem.hessian @ flat
        products = {}
        for strategy in STRATEGIES:
            products[strategy] = torch.cat([t.reshape(-1) for t in _products(strategy, problem.model, problem.params,
                                                                              problem.closure, vectors)])
        scale = expected.abs().max()
        torch.testing.assert_close(products["forward"], products["reverse"], rtol=1e-6, atol=1e-6 * scale)
        torch.testing.assert_close(products["finite_difference"], products["reverse"], rtol=1e-6,
                                   atol=1e-6 * scale)
        for strategy in STRATEGIES:
            torch.testing.assert_close(products[strategy], expected, rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.parametrize("strategy", STRATEGIES + ("auto",))
def test_hvp_leaves_modes_grads_and_autograd_state_untouched(strategy):
    problem = _mlp_problem()
    model = problem.model
    model.train()
    model.net[1].eval()  # a mixed tree of training flags must come back exactly
    flags = [m.training for m in model.modules()]
    torch.manual_seed(11)
    for i, p in enumerate(problem.params):
        if i % 2 == 0:
            p.grad = torch.randn_like(p)
    grads_before = [None if p.grad is None else p.grad.clone() for p in problem.params]
    grad_objects = [p.grad for p in problem.params]
    values_before = [p.detach().clone() for p in problem.params]
    vectors = [torch.randn_like(p) for p in problem.params]
    inputs = ProductInputs(model=model, params=problem.params, replay=problem.closure, full_replay=problem.closure)
    chooser = StrategyChooser(HVPMethod(strategy))
    with torch.no_grad():
        session = chooser.open(inputs, expected_products=4)
        product = session(vectors)
        session.close()
        assert not torch.is_grad_enabled()
    assert all(torch.isfinite(t).all() for t in product)
    assert [m.training for m in model.modules()] == flags
    for p, before, obj in zip(problem.params, grads_before, grad_objects):
        if before is None:
            assert p.grad is None
        else:
            assert p.grad is obj
            assert torch.equal(p.grad, before)
    for p, before in zip(problem.params, values_before):
        assert torch.equal(p.detach(), before)
    assert torch.is_grad_enabled()
    if strategy == "auto":  # the cheapest measured strategy that agrees with an exact product
        report = chooser.report["candidates"]
        costs = {name: info["seconds_per_product"] for name, info in report.items() if info["available"]}
        assert set(costs) == {"reverse", "finite_difference"}  # forward-over-reverse: only a fallback
        assert report["forward"]["measured"] is False
        assert chooser.resolved.value == min(costs, key=costs.get) == chooser.report["chosen"]
        assert report["finite_difference"]["relative_error"] < 1e-4
        assert all(info["gradients_per_product"] > 0 for info in report.values() if info["available"])


@pytest.mark.parametrize("strategy", ["forward", "reverse"])
def test_gpt2_with_sdpa_attention_supports_hvp(gpt2, strategy):
    """The fused CPU SDPA kernel has neither double backward nor forward AD; the HVP context forces MATH."""
    assert gpt2.model.config._attn_implementation == "sdpa"
    gpt2.model.train()
    torch.manual_seed(5)
    vectors = [torch.randn_like(p) for p in gpt2.params]
    flat = torch.cat([v.reshape(-1) for v in vectors])
    closure = _hf_loss_closure(gpt2)
    assert closure().dtype == torch.float32  # transformers' loss upcast; the Hessian stays close to float64's
    product = _products(strategy, gpt2.model, gpt2.params, closure, vectors)
    product = torch.cat([t.reshape(-1) for t in product])
    expected = gpt2.hessian @ flat
    torch.testing.assert_close(product, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
    assert gpt2.model.training


def test_finite_difference_hvp_accurate_when_loss_is_lower_precision_than_params(gpt2):
    torch.manual_seed(5)
    vectors = [torch.randn_like(p) for p in gpt2.params]
    closure = _hf_loss_closure(gpt2)
    reference = torch.cat([t.reshape(-1) for t in _products("reverse", gpt2.model, gpt2.params, closure, vectors)])
    product = torch.cat([t.reshape(-1) for t in _products("finite_difference", gpt2.model, gpt2.params, closure,
                                                          vectors)])
    relative = ((product - reference).abs().max() / reference.abs().max()).item()
    # a forward difference in float32 loss precision: about sqrt(eps32); a step sized for the float64
    # parameters instead gave 5% errors
    assert relative < 5e-3, relative
