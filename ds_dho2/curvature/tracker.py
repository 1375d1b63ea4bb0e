"""``CurvatureTracker``: owns the whole curvature lifecycle, so the optimizer only asks for the basis.

It decides when to refresh (:mod:`~ds_dho2.curvature.schedule`), opens product sessions with the chosen
HVP strategy (:mod:`ds_dho2.hvp.selection`) on whatever this step offers (a replay of the captured batch,
or the gradient graph of the loss handed to ``engine.backward``), starts Lanczos cold or warm from the
previous eigenvectors, stops it when the top-k Ritz pairs have converged, installs the new basis
atomically (with the transition matrix that carries coefficient-space state into it) and adapts the refresh
interval to how much the subspace rotated (docs/design.md, "Curvature").

Its state is a :class:`CurvatureState` whose fields declare where they live (the eigenvector slices and
the Lanczos basis are sharded, everything else replicated), so :mod:`ds_dho2.checkpoint` saves and
re-partitions it without knowing it. Memory per rank: at rest the k eigenvector slices; during a refresh
the ``lanczos_order`` basis slices as well (the old eigenvectors are released before the new ones are
formed).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import torch

from ds_dho2.config import DHO2Config, HVPMethod
from ds_dho2.core.hybrid import Basis
from ds_dho2.core.lanczos import LanczosRun, LanczosState
from ds_dho2.core.spectrum import OUTLIER_GAP, outlier_count
from ds_dho2.core.state import ComponentState, nested, replicated, sharded
from ds_dho2.curvature.operator import hessian_operator, random_start_vector, warm_start_vector
from ds_dho2.curvature.schedule import RefreshSchedule
from ds_dho2.dist.comm import Communicator, LocalCommunicator
from ds_dho2.dist.layout import ShardLayout
from ds_dho2.hvp.capture import LossNotFoundError
from ds_dho2.hvp.selection import NonFiniteProducts, ProductInputs, StrategyChooser, StrategyUnavailable
from ds_dho2.logging_utils import log_on_main_rank

logger = logging.getLogger(__name__)

#: a refresh whose largest eigenvalue magnitude exceeds the previous one by this factor counts as a jump:
#: the surface sharpened within one window, so the old subspace's Newton momentum is not carried over and
#: the interval falls back to ``refresh_interval`` (the next refresh comes as early as configured)
EIGENVALUE_JUMP = 10.0
#: a loaded basis whose Gram matrix ``V V^T`` is further than this from the identity is not used
ORTHONORMALITY_TOLERANCE = 1e-3


@dataclasses.dataclass
class CurvatureState(ComponentState):
    """The installed basis, the refresh in flight and the schedule; see :class:`CurvatureTracker`."""

    eigenvalues: torch.Tensor | None = replicated(None)
    eigenvectors: torch.Tensor | None = sharded()
    transition: torch.Tensor | None = replicated(None)
    basis_version: int = replicated(0)
    refresh_count: int = replicated(0)
    lanczos: LanczosState | None = nested(LanczosState)
    lanczos_started_at: int | None = replicated(None)
    next_refresh: int = replicated(0)
    interval: int = replicated(0)
    last_products_step: int = replicated(0)
    hvp_strategy: str | None = replicated(None)
    rank_in_use: int = replicated(0)  # rank='auto': the k of the next refresh (0: the config's start rank)
    dormant: bool = replicated(False)  # backed off: the Newton step did not pay; no basis until a wake refresh
    order_in_use: int = replicated(0)  # rank='auto': the Lanczos order of the next refresh (0: the config's)


class CurvatureTracker:
    """Refreshes the top-k eigenbasis of the training loss's Hessian on one rank's shard."""

    def __init__(self, config: DHO2Config) -> None:
        self.config = config
        self.schedule = RefreshSchedule(config)
        self.chooser = StrategyChooser(config.hvp, seed=config.seed)
        self.layout: ShardLayout | None = None
        self.shard_comm: Communicator = LocalCommunicator()
        self.batch_comm: Communicator = self.shard_comm
        self.state = CurvatureState(next_refresh=self.schedule.first_refresh, interval=config.refresh_interval)
        self.stats: dict[str, Any] = {}
        #: the Newton step's mean share of the update since the last install (None: not measured); set by
        #: the optimizer, read once per refresh to decide whether the curvature backs off
        self.payoff: Callable[[], float | None] = lambda: None
        self._warned: set[str] = set()
        self._basis: Basis | None = None
        self._basis_key: tuple | None = None

    # ---------------------------------------------------------------------------------------- wiring
    def bind(self, layout: ShardLayout, shard_comm: Communicator, batch_comm: Communicator | None = None) -> None:
        """The shard geometry and the communicators (``batch_comm`` averages products over ranks)."""
        self.layout, self.shard_comm = layout, shard_comm
        self.batch_comm = shard_comm if batch_comm is None else batch_comm

    def loaded(self) -> None:
        """After a checkpoint filled :attr:`state`: restore the chosen HVP strategy and check the basis.

        A loaded basis that is not finite, not shaped for this partition or not orthonormal is dropped
        with a warning (the next step refreshes), so a damaged checkpoint can never write NaN into the
        parameters; a damaged Lanczos run in flight is abandoned the same way.
        """
        state = self.state
        self._basis, self._basis_key = None, None
        if state.hvp_strategy and self.chooser.resolved is None:
            self.chooser.resolved = HVPMethod(state.hvp_strategy)
        problem = self._basis_problem()
        if problem is not None:
            self.drop_basis(f"the checkpointed basis is unusable ({problem})")
        run = state.lanczos
        if run is not None and (run.basis is None or not bool(self.shard_comm.all_reduce(
                torch.isfinite(run.basis).all().to(torch.float64).reshape(1)) == self.shard_comm.world_size)):
            log_on_main_rank(logger, logging.WARNING, "DHO2 abandoned the checkpointed Lanczos run: its basis is "
                             "not finite. The refresh starts again at the next step.")
            state.lanczos, state.lanczos_started_at = None, None
            state.next_refresh = state.last_products_step + 1

    def _basis_problem(self) -> str | None:
        """What is wrong with the installed basis for this partition, or None (a collective call)."""
        state, layout = self.state, self.require_layout()
        values, vectors = state.eigenvalues, state.eigenvectors
        if values is None and vectors is None:
            return None
        if values is None or vectors is None:
            return "eigenvalues without eigenvectors"
        if vectors.dim() != 2 or vectors.shape != (values.numel(), layout.partition_numel):
            return (f"eigenvectors of shape {tuple(vectors.shape)} for {values.numel()} eigenvalues and a partition "
                    f"of {layout.partition_numel}")
        gram = self.shard_comm.all_reduce(vectors.double() @ vectors.double().t())
        finite = bool(torch.isfinite(gram).all()) and bool(torch.isfinite(values).all())
        if not finite:
            return "non-finite eigenvalues or eigenvectors"
        error = float((gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)).abs().max())
        if error > ORTHONORMALITY_TOLERANCE:
            return f"eigenvectors not orthonormal (max |V V^T - I| = {error:.3g})"
        return None

    def require_layout(self) -> ShardLayout:
        if self.layout is None:
            raise RuntimeError("CurvatureTracker.bind(layout, comm) must be called before use.")
        return self.layout

    # -------------------------------------------------------------------------------------- queries
    @property
    def basis(self) -> Basis | None:
        """The installed basis (immutable; a new object after every install), or None."""
        state = self.state
        if state.eigenvalues is None:
            return None
        key = (id(state), state.basis_version, id(state.eigenvectors))
        if key != self._basis_key:
            self._basis = Basis(values=state.eigenvalues, vectors=state.eigenvectors, version=state.basis_version)
            self._basis_key = key
        return self._basis

    def transition(self, from_version: int) -> torch.Tensor | None:
        """``V_new V_old^T`` from basis ``from_version`` to the current one, if that is the previous one."""
        state = self.state
        if state.transition is None or state.basis_version != from_version + 1:
            return None
        return state.transition

    def wants_products(self, step: int) -> bool:
        """Whether ``step`` runs Lanczos iterations (a refresh starts or continues), not yet done."""
        state = self.state
        if not self.config.curvature.enabled or state.last_products_step >= step:
            return False
        if state.lanczos is None:
            return step >= state.next_refresh
        return self._iterations_now(step, LanczosRun(state.lanczos)) > 0

    def _iterations_now(self, step: int, run: LanczosRun) -> int:
        offset = step - self.state.lanczos_started_at
        return self.schedule.iterations_at(offset, run.state.order, self.state.interval)

    # -------------------------------------------------------------------------------------- refresh
    def advance(self, step: int, inputs: Callable[[], ProductInputs | None]) -> bool:
        """Run this step's share of a refresh, if any; True when a new basis was installed.

        ``inputs()`` is called only when products are due; it returns None when this step offers no batch
        (the refresh then waits). A failed refresh keeps the old basis and logs a warning.
        """
        if not self.wants_products(step):
            return False
        offered = inputs()
        if offered is None:
            return False
        state = self.state
        if state.lanczos is None and not self._pays_off(step):
            return False
        started = time.perf_counter()
        state.last_products_step = step
        if state.lanczos is None:
            state.lanczos = self._start_run().state
            state.lanczos_started_at = step
        run = LanczosRun(state.lanczos)
        if not self._iterate(step, run, offered):
            return False
        if self.chooser.resolved is not None:
            state.hvp_strategy = self.chooser.resolved.value
            self.stats["hvp_strategy"] = self.chooser.resolved.value
        elapsed = time.perf_counter() - started
        self.stats["refresh_seconds_partial"] = self.stats.get("refresh_seconds_partial", 0.0) + elapsed
        if not run.finished:
            return False
        self.stats["refresh_seconds"] = self.stats.pop("refresh_seconds_partial")
        self.stats.update(lanczos_iterations=run.iterations, lanczos_stop=run.stop_reason, refresh_step=step)
        installed = self._install(run)
        self._end_run(step)
        return installed

    def _pays_off(self, step: int) -> bool:
        """Before a refresh: did the installed basis pay? When the Newton step carried less than
        ``curvature.payoff_share`` of the predicted loss decrease, drop the basis (each step is then the base
        optimizer's), say so once, and wake for a refresh after ``4 * max_interval`` steps. True when the refresh runs."""
        cfg, state = self.config, self.state
        share = self.payoff() if state.eigenvalues is not None else None
        if share is None or not cfg.curvature.back_off or share >= cfg.curvature.payoff_share:
            state.dormant = False
            return True
        self._drop(quiet=True)
        state.dormant = True
        state.next_refresh = step + 4 * cfg.max_refresh_interval
        self.stats.update(dormant=1.0, newton_share=share, next_refresh=state.next_refresh)
        level = logging.DEBUG if "dormant" in self._warned else logging.INFO
        self._warned.add("dormant")
        log_on_main_rank(logger, level, "DHO2 backs off its curvature at step %d: the Newton step carried %.2g%% of "
                         "the update since the last refresh (curvature.payoff_share=%.2g%%), so until a refresh at "
                         "step %d looks again each step is the base optimizer's.", step, 100 * share,
                         100 * cfg.curvature.payoff_share, state.next_refresh)
        return False

    def _iterate(self, step: int, run: LanczosRun, offered: ProductInputs) -> bool:
        """This step's Lanczos iterations; False (the refresh ended, nothing installed) if they failed."""
        iterations = self._iterations_now(step, run)
        session = None
        try:
            session = self.chooser.open(offered, expected_products=min(iterations, run.state.order),
                                        comm=self.batch_comm)
            operator = hessian_operator(session, self.require_layout(), self.shard_comm, self.batch_comm)
            for _ in range(iterations):
                run.iterate(operator, self.shard_comm)
                if run.finished:
                    break
        except (LossNotFoundError, StrategyUnavailable):
            raise
        except NonFiniteProducts:
            log_on_main_rank(logger, logging.WARNING, "DHO2 skipped the curvature refresh at step %d: this batch "
                             "gave inf/NaN Hessian-vector products (a non-finite loss?). Keeping the previous "
                             "curvature; the next step tries again.", step)
            self._end_run(step)
            self.state.next_refresh = step + 1
            return False
        except Exception as error:  # noqa: BLE001 - a failed refresh must not lose the curvature we have
            log_on_main_rank(logger, logging.WARNING, "DHO2 curvature refresh failed at step %d (%s: %s); keeping "
                             "the previous curvature.", step, type(error).__name__, error)
            logger.debug("The failed refresh's traceback:", exc_info=True)
            self._end_run(step)
            return False
        finally:
            if session is not None:
                session.close()
        return True

    def _start_run(self) -> LanczosRun:
        cfg, layout, state = self.config, self.require_layout(), self.state
        dtype = getattr(torch, cfg.lanczos_dtype)
        seed = cfg.seed * 1_000_003 + state.refresh_count
        start = random_start_vector(layout, seed, dtype, self._device())
        warm = cfg.curvature.warm_start and state.eigenvectors is not None
        if warm:
            start = warm_start_vector(state.eigenvectors, start, cfg.curvature.warm_start_noise, self.shard_comm)
        if not all(p.requires_grad for p in layout.params):  # frozen parameters: no curvature there
            start.mul_(layout.per_element([float(p.requires_grad) for p in layout.params], start.dtype, start.device))
        self.stats["warm_start"] = bool(warm)
        order = min(state.order_in_use or cfg.lanczos_order, layout.total_numel)
        return LanczosRun.start(start, order, self.shard_comm, rank=self._resolve(order),
                                tolerance=cfg.curvature.tolerance, eig_floor=cfg.eig_floor)

    def _resolve(self, order: int) -> int:
        """How many top Ritz pairs a refresh runs until they have converged: k, or with rank='auto' half its
        order (the first refresh: ``max_rank + 1``), so the gap after the outliers can be seen."""
        cfg = self.config
        if not cfg.adaptive_rank:
            return int(cfg.rank)
        return min(order, self.state.order_in_use // 2 if self.state.order_in_use else cfg.max_rank + 1)

    @property
    def rank(self) -> int:
        """The k of the refresh in flight or next: the config's, or (rank='auto') the one last measured."""
        if not self.config.adaptive_rank:
            return int(self.config.rank)
        return self.state.rank_in_use or self.config.start_rank

    def _next_rank(self, run: LanczosRun) -> int:
        """rank='auto': the outliers among the Ritz values this refresh resolved, at most ``max_rank``. The
        next refresh runs 2k + 4 iterations, or twice this one's when more may stand beyond what it resolved:
        the outliers reached its edge, or it found no gap before running the most ``lanczos_order`` allows
        (then k is kept)."""
        cfg = self.config
        resolved = run.converged_values(cfg.curvature.tolerance, cfg.eig_floor)
        count = outlier_count(resolved, cfg.max_rank, OUTLIER_GAP, cfg.eig_floor)
        rank = min(cfg.max_rank, count) if count else self.rank
        order = 2 * rank + 4
        if (count and count >= len(resolved) - 1) or (not count and run.iterations < cfg.lanczos_order):
            order = max(order, 2 * run.iterations)
        self.state.order_in_use = min(order, cfg.lanczos_order)
        self.stats.update(outliers=count, resolved_ritz_values=len(resolved))
        return rank

    def _device(self) -> torch.device:
        return self.require_layout().params[0].device

    def _install(self, run: LanczosRun) -> bool:
        """Swap in the new basis; keep the old one if nothing is usable."""
        state = self.state
        rank = self._next_rank(run) if self.config.adaptive_rank else int(self.config.rank)
        selection = run.selection(rank, self.config.eig_floor)
        if selection.values.numel() == 0:
            log_on_main_rank(logger, logging.WARNING, "DHO2 curvature refresh found no usable eigenpair (%s); "
                             "keeping the previous curvature.", run.stop_reason)
            return False
        device = self._device()
        transition = rotation = None
        if state.eigenvectors is not None:
            transition = selection.coefficients.t().to(device) @ run.project(state.eigenvectors, self.shard_comm)
            cosines = float(transition.square().sum()) / min(transition.shape)
            rotation = max(0.0, 1.0 - cosines)
        jump = _eigenvalue_jump(state.eigenvalues, selection.values)
        if jump is not None:
            transition = None  # no Newton momentum from the flatter surface
            self.stats["curvature_guard_events"] = self.stats.get("curvature_guard_events", 0) + 1
            log_on_main_rank(logger, logging.WARNING, "DHO2 curvature guard at step %s: the largest eigenvalue "
                             "magnitude jumped %.3g -> %.3g (x%.1f) within one window; Newton momentum reset, next "
                             "refresh after refresh_interval=%d steps. If this repeats, the lr is near the edge of "
                             "stability: lower lr or alpha.", self.stats.get("refresh_step"), jump[0], jump[1],
                             jump[1] / jump[0], self.config.refresh_interval)
        state.eigenvectors = None  # release the old slices before the new ones are formed
        self._basis = None
        vectors = run.lift(selection.coefficients.to(device))
        target_dtype = torch.promote_types(self.require_layout().params[0].dtype, torch.float32)
        state.eigenvectors = vectors.to(target_dtype)
        state.eigenvalues = selection.values.to(device)
        state.rank_in_use = int(selection.values.numel()) if self.config.adaptive_rank else 0
        state.transition = transition
        state.basis_version += 1
        state.interval = (self.config.refresh_interval if jump is not None
                          else self.schedule.adapt(state.interval, rotation))
        self.stats.update(dormant=0.0)
        self.stats.update(eigenvalues=[float(v) for v in selection.values], rank=int(selection.values.numel()),
                          subspace_rotation=rotation, refresh_interval=state.interval)
        values = self.stats["eigenvalues"]
        log_on_main_rank(logger, logging.INFO, "DHO2 curvature refresh at step %s: %.2f s, top eigenvalues %s%s, "
                         "hvp %s, %d Lanczos iterations, %s start.", self.stats.get("refresh_step"),
                         self.stats.get("refresh_seconds", 0.0), ", ".join(f"{v:.4g}" for v in values[:4]),
                         f" (of {len(values)})" if len(values) > 4 else "", self.stats.get("hvp_strategy", "?"),
                         run.iterations, "warm" if self.stats.get("warm_start") else "cold")
        return True

    def _end_run(self, step: int) -> None:
        state = self.state
        started_at = state.lanczos_started_at if state.lanczos_started_at is not None else step
        state.lanczos, state.lanczos_started_at = None, None
        state.refresh_count += 1
        state.next_refresh = max(step + 1, started_at + state.interval)
        self.stats["refresh_count"] = state.refresh_count
        self.stats["next_refresh"] = state.next_refresh
        self.stats.pop("refresh_seconds_partial", None)

    def drop_basis(self, reason: str, quiet: bool = False) -> None:
        """Forget the installed basis (the optimizer falls back to its base step) and refresh soon; the
        caller that says so itself passes ``quiet``."""
        state = self.state
        if state.eigenvalues is None and state.eigenvectors is None:
            return
        if not quiet:
            log_on_main_rank(logger, logging.WARNING, "DHO2 dropped its curvature basis: %s.", reason)
        self._drop()

    def pause(self, step: int, steps: int) -> None:
        """Forget the basis (and a refresh in progress) and measure again only after ``steps`` steps: after
        a rollback the base optimizer trains on from the good point first, so the next basis is not measured
        where the last one failed."""
        state = self.state
        self._drop(quiet=True)
        state.lanczos = None
        state.interval = self.config.refresh_interval
        state.next_refresh = step + steps

    def _drop(self, quiet: bool = False) -> None:
        state = self.state
        state.eigenvalues = state.eigenvectors = state.transition = None
        state.basis_version += 1
        self._basis, self._basis_key = None, None
        if not quiet:
            state.interval = self.config.refresh_interval
            state.next_refresh = min(state.next_refresh, state.last_products_step + 1)


def _eigenvalue_jump(old: torch.Tensor | None, new: torch.Tensor) -> tuple[float, float] | None:
    """``(old, new)`` largest eigenvalue magnitudes when they grew by more than :data:`EIGENVALUE_JUMP`."""
    if old is None or old.numel() == 0:
        return None
    before, after = float(old.abs().max()), float(new.abs().max())
    return (before, after) if after > EIGENVALUE_JUMP * before else None
