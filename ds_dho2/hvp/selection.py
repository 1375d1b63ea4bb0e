"""Which Hessian-vector product strategy a refresh uses, chosen by measurement when ``hvp="auto"``.

At the first refresh every candidate strategy opens a session on the same batch and computes products of
one random vector: one to warm up (and to compare), then one timed. Forward-over-reverse is a candidate
only when no other exact strategy runs (it measured 2.4-5 gradients a product where reverse-over-reverse
took 0.7-1.4), so the measurement costs a few gradients, not tens. A strategy is *available* when it runs
(fused attention without double backward, or a model that ``torch.func`` cannot trace, rules some out)
and *agrees* with an exact product (finite differences within 5% of an exact mode on the same batch).
The cheapest available one is kept for the rest of training, where cost = session set-up / expected
products per session + one product.
The choice and every measured cost, in units of one gradient on the full micro-batch where a replay can
time one, are logged once and kept in :attr:`StrategyChooser.report`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Sequence

import torch

from ds_dho2.config import HVPMethod
from ds_dho2.dist.comm import Communicator, LocalCommunicator
from ds_dho2.hvp.capture import LossNotFoundError
from ds_dho2.hvp.partitioned import PartitionedFiniteDifference, Partitions
from ds_dho2.hvp.strategies import (FiniteDifference, ForwardOverReverse, GradientGraph, ProductSession,
                                    ReverseOverReverse, TrainableOnly, hvp_context)

logger = logging.getLogger(__name__)

_AGREEMENT_RTOL = 0.05
_ROUNDS = 1
_EXACT = (HVPMethod.REVERSE, HVPMethod.FORWARD)
_REPLAY = (HVPMethod.FINITE_DIFFERENCE, HVPMethod.REVERSE, HVPMethod.FORWARD)
_REPLAY_CLASSES = {HVPMethod.FINITE_DIFFERENCE: FiniteDifference, HVPMethod.REVERSE: ReverseOverReverse,
                   HVPMethod.FORWARD: ForwardOverReverse}


class NoStrategyWorks(RuntimeError):
    """Every candidate strategy failed on this step's inputs."""


class NonFiniteProducts(RuntimeError):
    """Every candidate gave inf/NaN products on this step's batch (a non-finite loss): this batch says
    nothing about which strategy works, so the choice waits for another batch."""


class StrategyUnavailable(RuntimeError):
    """The configured strategy cannot run in this training loop; the message says what to change."""


@dataclasses.dataclass
class ProductInputs:
    """What this step offers for products: a replay of the captured batch (``replay``, a loss closure on
    the configured fraction of it, and ``full_replay`` on all of it, used to time one gradient) and/or the
    training step's own loss (``graph_loss``, to be multiplied by ``graph_scale``)."""

    model: torch.nn.Module
    params: Sequence[torch.Tensor]
    replay: Callable[[], torch.Tensor] | None = None
    full_replay: Callable[[], torch.Tensor] | None = None
    graph_loss: torch.Tensor | None = None
    graph_scale: float = 1.0
    #: ZeRO-3: the parameters' partitions (finite differences only)
    partitions: Partitions | None = None

    def available(self) -> list[HVPMethod]:
        if self.partitions is not None:
            return [HVPMethod.FINITE_DIFFERENCE] if self.replay is not None else []
        methods = list(_REPLAY) if self.replay is not None else []
        return methods + ([HVPMethod.GRAPH] if self.graph_loss is not None else [])


def open_session(method: HVPMethod, inputs: ProductInputs) -> ProductSession:
    """Open a products session of ``method`` on ``inputs`` (over the parameters that require gradients)."""
    if method is HVPMethod.GRAPH:
        if inputs.graph_loss is None:
            raise StrategyUnavailable(
                "hvp='graph' needs the training loss from engine.backward(loss); this step's loss did not go "
                "through a DeepSpeed engine bound to DHO2. Call engine.backward(loss), or set hvp to 'auto'.")

        def open_inner(params: Sequence[torch.Tensor]) -> ProductSession:
            return GradientGraph(inputs.graph_loss, params, inputs.graph_scale)
    elif inputs.replay is None:
        raise StrategyUnavailable(
            f"hvp={method.value!r} replays the captured batch, but the model output carries no loss and no "
            "loss_fn was given. Return the loss from forward, pass attach(model, loss_fn=...), or train "
            "through engine.backward(loss) with hvp 'auto' or 'graph'.")
    elif inputs.partitions is not None:
        if method is not HVPMethod.FINITE_DIFFERENCE:
            raise StrategyUnavailable(f"hvp={method.value!r} needs each rank's full parameters; under ZeRO-3 DHO2 "
                                      "takes products by finite differences (hvp 'auto' or 'finite_difference').")
        return PartitionedFiniteDifference(inputs.model, inputs.partitions, inputs.replay)
    else:
        def open_inner(params: Sequence[torch.Tensor]) -> ProductSession:
            return _REPLAY_CLASSES[method](inputs.model, params, inputs.replay)
    if all(p.requires_grad for p in inputs.params):
        return open_inner(inputs.params)
    return TrainableOnly(open_inner, inputs.params)


def _probe(params: Sequence[torch.Tensor], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(p.shape, generator=generator, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
            for p in params]


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def _seconds(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def _gradient_seconds(inputs: ProductInputs) -> float | None:
    if inputs.full_replay is None:
        return None

    def gradient() -> None:
        with hvp_context(inputs.model):
            torch.autograd.grad(inputs.full_replay(), [p for p in inputs.params if p.requires_grad],
                                allow_unused=True)

    return _seconds(gradient)[1]  # the candidates' products have warmed the model up


class StrategyChooser:
    """Opens product sessions with the configured strategy, or with the cheapest measured one (``auto``)."""

    def __init__(self, method: HVPMethod, seed: int = 0) -> None:
        self.method = method
        self.seed = seed
        self.resolved: HVPMethod | None = None if method is HVPMethod.AUTO else method
        self.report: dict[str, Any] = {}
        self.whole_batch = False  # the batch fraction failed (e.g. a loss_fn that closes over full labels)

    def open(self, inputs: ProductInputs, expected_products: int,
             comm: Communicator | None = None) -> ProductSession:
        """A session for this step: the resolved strategy, a fallback, or (first time, ``auto``) the winner
        of a measurement. ``comm`` joins the ranks that must make the same choice (costs are summed
        over them, and a strategy unavailable on one rank is unavailable on all)."""
        if self.whole_batch and inputs.full_replay is not None:
            inputs = dataclasses.replace(inputs, replay=inputs.full_replay)
        if self.resolved is None:
            try:
                return self._choose(inputs, max(1, expected_products), comm or LocalCommunicator())
            except NoStrategyWorks:
                if inputs.full_replay is None or inputs.replay is inputs.full_replay:
                    raise
                logger.warning("DHO2: every Hessian-vector product failed on a fraction of the micro-batch (a "
                               "loss_fn that closes over the whole batch's labels?); using the whole micro-batch. "
                               "Set curvature.batch_fraction to 1.0 to skip this check.")
                self.whole_batch = True
                return self.open(inputs, expected_products, comm)
        available = inputs.available()
        if self.method is HVPMethod.AUTO and self.resolved not in available and available:
            # e.g. the graph was chosen but this step's loss did not pass through engine.backward
            fallback = HVPMethod.GRAPH if HVPMethod.GRAPH in available else available[0]
            logger.info("DHO2: hvp %s unavailable at this step; using %s.", self.resolved.value, fallback.value)
            return open_session(fallback, inputs)
        return open_session(self.resolved, inputs)

    @staticmethod
    def _disagreeing(products: dict[HVPMethod, torch.Tensor], sessions: dict[HVPMethod, ProductSession],
                     measured: dict[HVPMethod, dict[str, Any]], inputs: ProductInputs) -> list[HVPMethod]:
        """The strategies whose products must not be trusted, from how the replayed products agree.

        Exact modes can be silently wrong (an op whose backward is not differentiable again can yield a
        partial product instead of an error), finite differences only imprecise. So: two exact modes that
        agree are the reference and finite differences must match them; a lone exact mode that disagrees
        with finite differences computed in float32 or better is dropped, together with the graph route
        (it relies on the same second-order autograd), and with lower precision finite differences are.
        """
        fd = HVPMethod.FINITE_DIFFERENCE
        exact = [m for m in _EXACT if m in products]
        if fd not in products or not exact:
            return []

        def relative(a: torch.Tensor, b: torch.Tensor) -> float:
            return float((a - b).norm() / b.norm().clamp_min(1e-30))

        errors = {m: relative(products[fd], products[m]) for m in exact}
        measured[fd]["relative_error"] = min(errors.values())
        if all(e <= _AGREEMENT_RTOL for e in errors.values()):
            return []
        exact_agree = len(exact) == 2 and relative(products[exact[0]], products[exact[1]]) <= _AGREEMENT_RTOL
        precise = max(torch.finfo(p.dtype).eps for p in inputs.params) <= torch.finfo(torch.float32).eps
        if exact_agree or not precise:
            return [fd]
        dropped = [m for m in exact if errors[m] > _AGREEMENT_RTOL]
        if HVPMethod.GRAPH in sessions:
            dropped.append(HVPMethod.GRAPH)
        for method in dropped:
            measured[method]["error"] = "disagrees with finite differences (incomplete second-order autograd?)"
        logger.warning("DHO2: %s products disagree with finite differences (relative difference %.2g): an op "
                       "without a correct double backward / forward-mode rule? Using finite differences.",
                       "/".join(m.value for m in dropped), max(errors.values()))
        return dropped

    def _choose(self, inputs: ProductInputs, expected_products: int, comm: Communicator) -> ProductSession:
        """Open every available strategy on this batch, time it, keep the cheapest that agrees."""
        candidates = inputs.available()
        if not candidates:
            raise LossNotFoundError(
                "DHO2 has no way to compute curvature: the model output carries no loss, no loss_fn was given, "
                "and the loss did not pass through engine.backward. Return the loss from forward, call "
                "attach(model, loss_fn=...), or train through a DeepSpeed engine.")
        probe = _probe(inputs.params, self.seed)
        trial = _Trial(inputs, probe)
        for method in candidates:  # forward-over-reverse, the slowest exact mode, after the others
            if method is not HVPMethod.FORWARD:
                trial.open(method)
        if HVPMethod.FORWARD in candidates:
            if any(m in trial.sessions for m in (HVPMethod.REVERSE, HVPMethod.GRAPH)):
                trial.measured[HVPMethod.FORWARD] = {"available": False, "measured": False,
                                                     "error": "not measured: the slowest exact mode is only a fallback"}
            else:
                trial.open(HVPMethod.FORWARD)
        trial.time_rounds()
        trial.settle(expected_products, self._disagreeing)
        usable = trial.agree_across_ranks(comm)
        if not usable:
            if trial.any_nonfinite(comm):
                trial.close_all()
                raise NonFiniteProducts("every Hessian-vector product on this batch was inf or NaN")
            reasons = "; ".join(f"{m.value}: {info.get('error')}" for m, info in trial.measured.items())
            raise NoStrategyWorks(f"No Hessian-vector product strategy works for this model ({reasons}).")
        chosen = min(usable, key=usable.get)
        self._report(trial, chosen, _gradient_seconds(inputs))
        return trial.keep_only(chosen)

    def _report(self, trial: "_Trial", chosen: HVPMethod, unit: float | None) -> None:
        for info in trial.measured.values():
            if unit and info.get("available"):
                info["gradients_per_product"] = info["seconds_per_product"] / unit
        self.resolved = chosen
        self.report = {"chosen": chosen.value, "gradient_seconds": unit,
                       "candidates": {m.value: info for m, info in trial.measured.items()}}
        summary = ", ".join(
            f"{m.value} {info['gradients_per_product']:.2f}" if "gradients_per_product" in info else
            f"{m.value} {info['seconds_per_product'] * 1e3:.1f} ms" if info.get("available") else
            f"{m.value} not measured" if info.get("measured") is False else
            f"{m.value} unavailable" for m, info in trial.measured.items())
        logger.info("DHO2 hvp 'auto' chose %s (cost per product%s: %s).", chosen.value,
                    " in gradients" if unit else "", summary)


class _Trial:
    """The candidates of one measurement: their sessions, first products, timings and verdicts."""

    def __init__(self, inputs: ProductInputs, probe: list[torch.Tensor]) -> None:
        self.inputs, self.probe = inputs, probe
        self.measured: dict[HVPMethod, dict[str, Any]] = {}
        self.sessions: dict[HVPMethod, ProductSession] = {}
        self.products: dict[HVPMethod, torch.Tensor] = {}
        self.opened: dict[HVPMethod, float] = {}
        self.seconds: dict[HVPMethod, list[float]] = {}

    def open(self, method: HVPMethod) -> None:
        """Open ``method``'s session and take its first product (a warm-up, compared below)."""
        try:
            session, self.opened[method] = _seconds(lambda: open_session(method, self.inputs))
            product = _flat(session(self.probe))
        except LossNotFoundError:
            raise
        except Exception as error:  # noqa: BLE001 - any failure means "not available for this model"
            self.measured[method] = {"available": False, "error": f"{type(error).__name__}: {error}"[:300]}
            logger.info("DHO2: hvp strategy %s unavailable for this model: %s", method.value, error)
            return
        if not bool(torch.isfinite(product).all()):
            session.close()
            self.measured[method] = {"available": False, "error": "non-finite products", "nonfinite": True}
            return
        self.sessions[method], self.products[method] = session, product

    def time_rounds(self) -> None:
        """Round-robin timing: every strategy is timed in each round, so a burst of load on a shared machine
        affects them alike; the fastest round counts."""
        self.seconds = {method: [] for method in self.sessions}
        for _ in range(_ROUNDS):
            for method, session in self.sessions.items():
                product, elapsed = _seconds(lambda session=session: session(self.probe))
                self.seconds[method].append(elapsed)
                flat = _flat(product)
                if not torch.isfinite(flat).all() or not torch.allclose(
                        self.products[method], flat, rtol=1e-3, atol=1e-6 * (float(flat.abs().max()) + 1e-30)):
                    self.measured[method] = {"available": False, "error": "non-finite or non-repeatable products"}

    def settle(self, expected_products: int, disagreeing: Callable[..., list[HVPMethod]]) -> None:
        """Costs of the strategies that worked; drop the repeatable-but-wrong ones."""
        for method in list(self.sessions):
            if method in self.measured:
                self.sessions.pop(method).close()
                continue
            cost = self.opened[method] / expected_products + min(self.seconds[method])
            self.measured[method] = {"available": True, "seconds_per_product": cost}
        for method in disagreeing(self.products, self.sessions, self.measured, self.inputs):
            self.measured[method]["available"] = False
            self.sessions.pop(method).close()

    def agree_across_ranks(self, comm: Communicator) -> dict[HVPMethod, float]:
        """The strategies usable on every rank, with their summed costs (the same choice everywhere)."""
        order = list(HVPMethod)
        costs = torch.tensor([self.measured[m]["seconds_per_product"] if m in self.sessions else float("inf")
                              for m in order], dtype=torch.float64, device=self.inputs.params[0].device)
        costs = comm.all_reduce(costs).cpu()
        usable = {m: float(c) for m, c in zip(order, costs) if m in self.sessions and torch.isfinite(c)}
        for method in list(self.sessions):
            if method not in usable:
                self.measured[method].update(available=False, error="unavailable on another rank")
                self.sessions.pop(method).close()
        return usable

    def any_nonfinite(self, comm: Communicator) -> bool:
        """Whether some rank saw non-finite products (a bad batch: no strategy was judged on its merits)."""
        mine = any(info.get("nonfinite") for info in self.measured.values())
        flag = torch.tensor([float(mine)], dtype=torch.float64, device=self.inputs.params[0].device)
        return bool(comm.all_reduce(flag)[0] > 0)

    def close_all(self) -> None:
        for session in self.sessions.values():
            session.close()
        self.sessions.clear()

    def keep_only(self, chosen: HVPMethod) -> ProductSession:
        for method, session in self.sessions.items():
            if method is not chosen:
                session.close()
        self.products.clear()
        return self.sessions[chosen]
