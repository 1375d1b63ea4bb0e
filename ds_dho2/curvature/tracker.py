"""``CurvatureTracker``: owns the whole curvature lifecycle, so the optimizer only asks for the basis.

It decides when to refresh (:mod:`~ds_dho2.curvature.schedule`), opens product sessions with the chosen
HVP strategy (:mod:`ds_dho2.hvp.selection`) on whatever this step offers (a replay of the captured batch,
or the gradient graph of the loss handed to ``engine.backward``), starts Lanczos cold or warm from the
previous eigenvectors, stops it when the top-k Ritz pairs have converged, installs the new basis
atomically (with the transition matrix that carries coefficient-space state into it), adapts the refresh
interval to how much the subspace rotated, and keeps every piece of its state in one plain dict.

That dict lives in the optimizer's per-shard state (``optimizer.state[flat][state_keys.CURVATURE]``), so
DeepSpeed checkpoints it verbatim; the tracker re-adopts it when a checkpoint load replaces it. Memory
per rank: at rest the k eigenvector slices; during a refresh the ``lanczos_order`` basis slices as well
(the old eigenvectors are released before the new ones are formed).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch

from ds_dho2 import state_keys as K
from ds_dho2.config import DHO2Config
from ds_dho2.core.hybrid import Basis
from ds_dho2.core.lanczos import LanczosRun
from ds_dho2.curvature.operator import hessian_operator, random_start_vector, warm_start_vector
from ds_dho2.curvature.schedule import RefreshSchedule
from ds_dho2.dist.comm import Communicator, LocalCommunicator
from ds_dho2.dist.layout import ShardLayout
from ds_dho2.hvp.capture import LossNotFoundError
from ds_dho2.hvp.selection import ProductInputs, StrategyChooser, StrategyUnavailable

logger = logging.getLogger(__name__)

#: a refresh whose largest eigenvalue magnitude exceeds the previous one by this factor counts as a jump:
#: the surface sharpened within one window, so the old subspace's Newton momentum is not carried over and
#: the interval falls back to ``refresh_interval`` (the next refresh comes as early as configured)
EIGENVALUE_JUMP = 10.0


class CurvatureTracker:
    """Refreshes the top-k eigenbasis of the training loss's Hessian on one rank's shard."""

    def __init__(self, config: DHO2Config) -> None:
        self.config = config
        self.schedule = RefreshSchedule(config)
        self.chooser = StrategyChooser(config.hvp, seed=config.seed)
        self.layout: ShardLayout | None = None
        self.shard_comm: Communicator = LocalCommunicator()
        self.batch_comm: Communicator = self.shard_comm
        self.state: dict | None = None
        self.stats: dict[str, Any] = {}
        self._basis: Basis | None = None
        self._basis_key: tuple | None = None
        self._warned: set[str] = set()

    # ---------------------------------------------------------------------------------------- wiring
    def bind(self, layout: ShardLayout, shard_comm: Communicator, batch_comm: Communicator | None = None) -> None:
        """The shard geometry and the communicators (``batch_comm`` averages products over ranks)."""
        self.layout, self.shard_comm = layout, shard_comm
        self.batch_comm = shard_comm if batch_comm is None else batch_comm

    def new_state(self) -> dict:
        """A fresh state dict for :attr:`layout` (stored by the optimizer in its per-shard state)."""
        layout = self._require_layout()
        return {
            K.REFRESH_COUNT: 0, K.BASIS_VERSION: 0, K.EIGENVALUES: None, K.EIGENVECTORS: None,
            K.TRANSITION: None, K.LANCZOS: None, K.LANCZOS_STARTED_AT: None,
            K.NEXT_REFRESH: self.schedule.first_refresh, K.INTERVAL: self.config.refresh_interval,
            K.LAST_PRODUCTS_STEP: 0, K.HVP_STRATEGY: None,
            K.WORLD_SIZE: layout.world_size, K.PARTITION_NUMEL: layout.partition_numel,
            K.TOTAL_NUMEL: layout.total_numel,
        }

    def adopt(self, state: dict, device: torch.device) -> None:
        """Use ``state`` (the optimizer's curvature dict); a new object means a checkpoint was loaded, so
        check its layout, move its tensors to ``device`` and restore the resolved HVP strategy."""
        if state is self.state:
            return
        layout = self._require_layout()
        saved = (state[K.WORLD_SIZE], state[K.PARTITION_NUMEL], state[K.TOTAL_NUMEL])
        current = (layout.world_size, layout.partition_numel, layout.total_numel)
        if saved != current:
            raise RuntimeError(
                "DHO2 state was created for (world_size, partition_numel, total_numel)="
                f"{saved} but this run has {current}. DHO2 curvature state is partitioned per rank: resume with "
                "the same data-parallel world size and model, or start the optimizer state afresh "
                "(load_optimizer_states=False).")
        for key, value in list(state.items()):
            state[key] = _to_device(value, device)
        if state.get(K.HVP_STRATEGY) and self.chooser.resolved is None:
            from ds_dho2.config import HVPMethod

            self.chooser.resolved = HVPMethod(state[K.HVP_STRATEGY])
        self.state = state

    def _require_layout(self) -> ShardLayout:
        if self.layout is None:
            raise RuntimeError("CurvatureTracker.bind(layout, comm) must be called before use.")
        return self.layout

    # -------------------------------------------------------------------------------------- queries
    @property
    def basis(self) -> Basis | None:
        """The installed basis (immutable; a new object after every install), or None."""
        state = self.state
        if state is None or state[K.EIGENVALUES] is None:
            return None
        key = (id(state), state[K.BASIS_VERSION], id(state[K.EIGENVECTORS]))
        if key != self._basis_key:
            self._basis = Basis(values=state[K.EIGENVALUES], vectors=state[K.EIGENVECTORS],
                                version=state[K.BASIS_VERSION])
            self._basis_key = key
        return self._basis

    def transition(self, from_version: int) -> torch.Tensor | None:
        """``V_new V_old^T`` from basis ``from_version`` to the current one, if that is the previous one."""
        state = self.state
        if state is None or state[K.TRANSITION] is None or state[K.BASIS_VERSION] != from_version + 1:
            return None
        return state[K.TRANSITION]

    @property
    def in_flight(self) -> bool:
        return self.state is not None and self.state[K.LANCZOS] is not None

    def wants_products(self, step: int) -> bool:
        """Whether ``step`` runs Lanczos iterations (a refresh starts or continues), not yet done."""
        state = self.state
        if not self.config.curvature.enabled or state is None or state[K.LAST_PRODUCTS_STEP] >= step:
            return False
        if state[K.LANCZOS] is None:
            return step >= state[K.NEXT_REFRESH]
        return self._iterations_now(step, LanczosRun(state[K.LANCZOS])) > 0

    def _iterations_now(self, step: int, run: LanczosRun) -> int:
        state = self.state
        assert state is not None
        offset = step - state[K.LANCZOS_STARTED_AT]
        return self.schedule.iterations_at(offset, run.state["order"], state[K.INTERVAL])

    # -------------------------------------------------------------------------------------- refresh
    def advance(self, step: int, inputs: Callable[[], ProductInputs | None]) -> bool:
        """Run this step's share of a refresh, if any; True when a new basis was installed.

        ``inputs()`` is called only when products are due; it returns None when this step offers no batch
        (the refresh then waits, and a warning says why once). A failed refresh keeps the old basis.
        """
        if not self.wants_products(step):
            return False
        state = self.state
        assert state is not None
        offered = inputs()
        if offered is None:
            return False
        started = time.perf_counter()
        state[K.LAST_PRODUCTS_STEP] = step
        if state[K.LANCZOS] is None:
            state[K.LANCZOS] = self._start_run(step).state
            state[K.LANCZOS_STARTED_AT] = step
        run = LanczosRun(state[K.LANCZOS])
        iterations = self._iterations_now(step, run)
        session = None
        try:
            session = self.chooser.open(offered, expected_products=min(iterations, run.state["order"]),
                                        comm=self.batch_comm)
            operator = hessian_operator(session, self._require_layout(), self.shard_comm, self.batch_comm)
            for _ in range(iterations):
                run.iterate(operator, self.shard_comm)
                if run.finished:
                    break
        except (LossNotFoundError, StrategyUnavailable):
            raise
        except Exception:  # noqa: BLE001 - a failed refresh must not lose the curvature we have
            logger.exception("DHO2 curvature refresh failed at step %d; keeping the previous curvature.", step)
            self._end_run(step, installed=False)
            return False
        finally:
            if session is not None:
                session.close()
        if self.chooser.resolved is not None:
            state[K.HVP_STRATEGY] = self.chooser.resolved.value
            self.stats["hvp_strategy"] = self.chooser.resolved.value
        elapsed = time.perf_counter() - started
        self.stats["refresh_seconds_partial"] = self.stats.get("refresh_seconds_partial", 0.0) + elapsed
        if not run.finished:
            return False
        self.stats["refresh_seconds"] = self.stats.pop("refresh_seconds_partial")
        self.stats.update(lanczos_iterations=run.iterations, lanczos_stop=run.stop_reason, refresh_step=step)
        installed = self._install(run)
        self._end_run(step, installed)
        return installed

    def _start_run(self, step: int) -> LanczosRun:
        cfg, layout, state = self.config, self._require_layout(), self.state
        assert state is not None
        dtype = getattr(torch, cfg.lanczos_dtype)
        device = self._device()
        seed = cfg.seed * 1_000_003 + state[K.REFRESH_COUNT]
        start = random_start_vector(layout, seed, dtype, device)
        warm = cfg.curvature.warm_start and state[K.EIGENVECTORS] is not None
        if warm:
            start = warm_start_vector(state[K.EIGENVECTORS], start, cfg.curvature.warm_start_noise, self.shard_comm)
        self.stats["warm_start"] = bool(warm)
        order = min(cfg.lanczos_order, layout.total_numel)
        return LanczosRun.start(start, order, self.shard_comm, rank=cfg.rank, tolerance=cfg.curvature.tolerance,
                                eig_floor=cfg.eig_floor)

    def _device(self) -> torch.device:
        return self._require_layout().params[0].device

    def _install(self, run: LanczosRun) -> bool:
        """Swap in the new basis; keep the old one if nothing is usable."""
        state = self.state
        assert state is not None
        selection = run.selection(self.config.rank, self.config.eig_floor)
        if selection.values.numel() == 0:
            logger.warning("DHO2 curvature refresh found no usable eigenpair (%s); keeping the previous curvature.",
                           run.stop_reason)
            return False
        old = state[K.EIGENVECTORS]
        device = self._device()
        transition = rotation = None
        if old is not None:
            transition = (selection.coefficients.t().to(device) @ run.project(old, self.shard_comm))
            cosines = float(transition.square().sum()) / min(transition.shape)
            rotation = max(0.0, 1.0 - cosines)
        jump = _eigenvalue_jump(state[K.EIGENVALUES], selection.values)
        if jump is not None:
            transition = None  # no Newton momentum from the flatter surface
            self.stats["curvature_guard_events"] = self.stats.get("curvature_guard_events", 0) + 1
            if _global_rank() == 0:
                logger.warning("DHO2 curvature guard at step %s: the largest eigenvalue magnitude jumped %.3g -> "
                               "%.3g (x%.1f) within one window; Newton momentum reset, next refresh after "
                               "refresh_interval=%d steps. If this repeats, the lr is near the edge of stability: "
                               "lower lr or alpha.", self.stats.get("refresh_step"), jump[0], jump[1],
                               jump[1] / jump[0], self.config.refresh_interval)
        state[K.EIGENVECTORS] = None  # release the old slices before the new ones are formed
        self._basis = None
        vectors = run.lift(selection.coefficients.to(device))
        dtype = self.layout.params[0].dtype if self.layout is not None else vectors.dtype
        target_dtype = torch.promote_types(dtype, torch.float32)
        state[K.EIGENVECTORS] = vectors.to(target_dtype)
        state[K.EIGENVALUES] = selection.values.to(device)
        state[K.TRANSITION] = transition
        state[K.BASIS_VERSION] += 1
        state[K.INTERVAL] = (self.config.refresh_interval if jump is not None
                             else self.schedule.adapt(state[K.INTERVAL], rotation))
        self.stats.update(eigenvalues=[float(v) for v in selection.values], rank=int(selection.values.numel()),
                          subspace_rotation=rotation, refresh_interval=state[K.INTERVAL])
        if _global_rank() == 0:
            values = self.stats["eigenvalues"]
            logger.info("DHO2 curvature refresh at step %s: %.2f s, top eigenvalues %s%s, hvp %s, %d Lanczos "
                        "iterations, %s start.", self.stats.get("refresh_step"),
                        self.stats.get("refresh_seconds", 0.0), ", ".join(f"{v:.4g}" for v in values[:4]),
                        f" (of {len(values)})" if len(values) > 4 else "", self.stats.get("hvp_strategy", "?"),
                        run.iterations, "warm" if self.stats.get("warm_start") else "cold")
        return True

    def _end_run(self, step: int, installed: bool) -> None:
        state = self.state
        assert state is not None
        started_at = state[K.LANCZOS_STARTED_AT] if state[K.LANCZOS_STARTED_AT] is not None else step
        state[K.LANCZOS] = None
        state[K.LANCZOS_STARTED_AT] = None
        state[K.REFRESH_COUNT] += 1
        state[K.NEXT_REFRESH] = max(step + 1, started_at + state[K.INTERVAL])
        self.stats["refresh_count"] = state[K.REFRESH_COUNT]
        self.stats["next_refresh"] = state[K.NEXT_REFRESH]
        self.stats.pop("refresh_seconds_partial", None)

    def drop_basis(self, reason: str) -> None:
        """Forget the installed basis (the optimizer falls back to its base step) and refresh soon."""
        state = self.state
        if state is None or state[K.EIGENVALUES] is None:
            return
        logger.warning("DHO2 dropped its curvature basis: %s.", reason)
        state[K.EIGENVALUES] = state[K.EIGENVECTORS] = state[K.TRANSITION] = None
        state[K.BASIS_VERSION] += 1
        state[K.INTERVAL] = self.config.refresh_interval
        self._basis = None


def _eigenvalue_jump(old: torch.Tensor | None, new: torch.Tensor) -> tuple[float, float] | None:
    """``(old, new)`` largest eigenvalue magnitudes when they grew by more than :data:`EIGENVALUE_JUMP`."""
    if old is None or old.numel() == 0:
        return None
    before, after = float(old.abs().max()), float(new.abs().max())
    return (before, after) if after > EIGENVALUE_JUMP * before else None


def _global_rank() -> int:
    """This process's global rank (0 without torch.distributed): under ZeRO-0 the tracker's communicators
    are local or the data-parallel group, so ask torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _to_device(value: Any, device: torch.device) -> Any:
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    return value
