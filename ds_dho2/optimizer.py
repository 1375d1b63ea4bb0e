"""``DHO2``: the hybrid-order optimizer as a ``torch.optim.Optimizer``.

One curvature subspace spans all parameters, so DHO2 keeps a single internal parameter group: groups
passed in may differ only in ``weight_decay`` (as the Hugging Face Trainer's decay / no-decay groups do);
DHO2 merges them and applies weight decay per element. The update math lives in ``ds_dho2.core``; this
module only moves tensors between the parameters and one flat vector, schedules curvature refreshes and
keeps the state. Under DeepSpeed ZeRO the flat vector is the rank's partition, bound with
:meth:`DHO2.bind_partition` by ``ds_dho2.integrations.deepspeed``.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any, Callable, Iterable

import torch

from ds_dho2 import state_keys as K
from ds_dho2.config import BaseOptimizer, CurvatureMode, DHO2Config
from ds_dho2.core import hybrid
from ds_dho2.core.admm import admm_window_end
from ds_dho2.core.first_order import adamw_direction, heavyball_direction
from ds_dho2.core.lanczos import LanczosRun
from ds_dho2.core.spectrum import newton_scale, select_top_magnitude
from ds_dho2.curvature import hessian_operator, lanczos_start_vector
from ds_dho2.dist.comm import Communicator, LocalCommunicator
from ds_dho2.dist.layout import ShardLayout
from ds_dho2.hvp.capture import BatchCapture, LossFn, LossNotFoundError
from ds_dho2.hvp.strategies import HessianVectorProduct

logger = logging.getLogger(__name__)

_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "alpha", "momentum", "newton_momentum")


def _merge_param_groups(params: Iterable[Any], weight_decay: float) -> tuple[list[torch.Tensor], list[float], dict]:
    """Flatten the given groups into one list of parameters with a weight decay per parameter."""
    groups = list(params)
    if not groups:
        raise ValueError("DHO2 got an empty parameter list.")
    if not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    merged, decays, reference = [], [], None
    for index, group in enumerate(groups):
        group_params = [group["params"]] if torch.is_tensor(group["params"]) else list(group["params"])
        others = {k: v for k, v in group.items() if k not in ("params", "weight_decay", "name")}
        if reference is None:
            reference = others
        elif others != reference:
            differing = sorted(k for k in set(others) | set(reference) if others.get(k) != reference.get(k))
            raise ValueError(
                f"DHO2 parameter group {index} differs from group 0 in {differing}. DHO2 estimates one curvature "
                "subspace over all parameters, so its groups may differ only in 'weight_decay'. Use one group, "
                "or give every group the same settings."
            )
        for p in group_params:
            merged.append(p)
            decays.append(float(group.get("weight_decay", weight_decay)))
    seen: set[int] = set()
    for p in merged:
        if id(p) in seen:
            raise ValueError("DHO2 got the same parameter twice; each parameter may appear in one group only.")
        seen.add(id(p))
    return merged, decays, reference or {}


class _FlatShard:
    """A flat view of the parameters DHO2 updates: the ZeRO partition itself, or a concatenation."""

    def __init__(self, params: list[torch.Tensor], partitioned: bool) -> None:
        self.params, self.partitioned = params, partitioned
        if partitioned:
            self.x = params[0].data
            self.grad = None if params[0].grad is None else params[0].grad.data
        else:
            self.x = torch.cat([p.detach().reshape(-1) for p in params])
            grads = [p.grad for p in params]
            if all(g is None for g in grads):
                self.grad = None
            else:
                self.grad = torch.cat([
                    (torch.zeros_like(p) if g is None else g.detach()).reshape(-1).to(self.x.dtype)
                    for p, g in zip(params, grads)
                ])

    def write_back(self) -> None:
        if self.partitioned:
            return
        offset = 0
        for p in self.params:
            p.data.copy_(self.x[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


class DHO2(torch.optim.Optimizer):
    """Hybrid-order optimizer: a Newton step in the top-k Hessian subspace, AdamW / heavy-ball elsewhere.

    Arguments are those of :class:`ds_dho2.config.DHO2Config`. Call :meth:`attach` once with the model so
    curvature refreshes can re-run it on the last training batch; until the first refresh the optimizer
    is exactly its base optimizer.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, base: str = "adamw", momentum: float = 0.9,
                 rank: int = 8, lanczos_order: int | None = None, alpha: float = 0.1,
                 newton_momentum: float = 0.9, refresh_interval: int = 100, warmup_steps: int | None = None,
                 lr_clip: float | None = None, eig_floor: float = 1e-4, newton_max_ratio: float = 10.0,
                 hvp: str = "auto",
                 lanczos_dtype: str = "float64", seed: int = 0, curvature: dict | None = None,
                 admm: dict | None = None, **unknown: Any) -> None:
        if unknown:
            DHO2Config.from_dict(unknown)  # raises ConfigError naming the unknown key(s)
        config_args = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, base=base, momentum=momentum,
                           rank=rank, lanczos_order=lanczos_order, alpha=alpha, newton_momentum=newton_momentum,
                           refresh_interval=refresh_interval, warmup_steps=warmup_steps, lr_clip=lr_clip,
                           eig_floor=eig_floor, newton_max_ratio=newton_max_ratio, hvp=hvp,
                           lanczos_dtype=lanczos_dtype, seed=seed)
        if curvature is not None:
            config_args["curvature"] = curvature
        if admm is not None:
            config_args["admm"] = admm
        self.config = DHO2Config(**config_args)
        self._check_schedule()
        merged, decays, _ = _merge_param_groups(params, self.config.weight_decay)
        defaults = dict(lr=lr, betas=self.config.betas, eps=eps, weight_decay=weight_decay, alpha=alpha,
                        momentum=momentum, newton_momentum=newton_momentum, reference_lr=lr)
        super().__init__([{"params": merged}], defaults)
        self._weight_decay_by_param = {id(p): wd for p, wd in zip(merged, decays)}
        self._uniform_weight_decay = len(set(decays)) == 1
        if self._uniform_weight_decay:
            self.param_groups[0]["weight_decay"] = decays[0]
        self._layout: ShardLayout | None = None
        self._comm: Communicator = LocalCommunicator()
        self._batch_comm: Communicator = self._comm
        self._partitioned = False
        self._weight_decay_vector: torch.Tensor | None = None
        self._capture: BatchCapture | None = None
        self._hvp = HessianVectorProduct(self.config.hvp)
        self.stats: dict[str, Any] = {}
        self._warned_unattached = False

    @classmethod
    def from_config(cls, params: Iterable[Any], config: dict[str, Any]) -> "DHO2":
        """Build from a plain dict (a DeepSpeed ``"params"`` block), validated by ``DHO2Config.from_dict``."""
        DHO2Config.from_dict(config)
        return cls(params, **config)

    def _check_schedule(self) -> None:
        cfg = self.config
        if cfg.curvature.mode is CurvatureMode.INTERLEAVED and cfg.curvature.iterations_per_step is not None:
            steps_needed = math.ceil(cfg.lanczos_order / cfg.curvature.iterations_per_step)
            if steps_needed > cfg.refresh_interval:
                raise ValueError(
                    f"Invalid interleaved curvature schedule: lanczos_order={cfg.lanczos_order} at "
                    f"curvature.iterations_per_step={cfg.curvature.iterations_per_step} takes {steps_needed} steps, "
                    f"more than refresh_interval={cfg.refresh_interval}. Raise iterations_per_step or refresh_interval."
                )

    # ----------------------------------------------------------------------------------------- wiring
    def attach(self, model: torch.nn.Module, loss_fn: LossFn | None = None) -> "DHO2":
        """Learn the model: a forward hook captures each training batch; refreshes re-run the model on it.

        Without ``loss_fn`` the loss is the output itself (a scalar), its ``.loss`` or its ``["loss"]``;
        ``loss_fn(output, args, kwargs)`` computes it otherwise.
        """
        if self._capture is not None:
            self._capture.remove()
        self._capture = BatchCapture(model, loss_fn)
        return self

    def bind_partition(self, layout: ShardLayout, comm: Communicator) -> None:
        """Use a rank's flat partition (DeepSpeed ZeRO-1/2): ``param_groups[0]['params']`` is that
        partition, ``layout`` maps it to the module's parameters and ``comm`` is the data-parallel group."""
        self._layout, self._comm, self._batch_comm, self._partitioned = layout, comm, comm, True
        self._weight_decay_vector = None

    def bind_replicated(self, batch_comm: Communicator) -> None:
        """Parameters are whole on every rank (ZeRO stage 0): curvature averages HVPs over ``batch_comm``."""
        self._comm, self._batch_comm, self._partitioned = LocalCommunicator(), batch_comm, False
        self._layout, self._weight_decay_vector = None, None

    @property
    def model(self) -> torch.nn.Module | None:
        return None if self._capture is None else self._capture.model

    def _current_layout(self, group: dict) -> ShardLayout:
        if self._layout is None:
            self._layout = ShardLayout.unsharded(group["params"])
        return self._layout

    def _weight_decay(self, group: dict, x: torch.Tensor, layout: ShardLayout) -> float | torch.Tensor:
        if self._uniform_weight_decay:
            return group["weight_decay"]
        if self._weight_decay_vector is None:
            decays = [self._weight_decay_by_param[id(p)] for p in layout.params]
            self._weight_decay_vector = layout.per_element(decays, x.dtype, x.device)
        return self._weight_decay_vector

    # ------------------------------------------------------------------------------------ inspection
    def _curvature_state(self) -> dict | None:
        params = self.param_groups[0]["params"]
        state = self.state.get(params[0]) if params else None
        return None if not state else state.get(K.CURVATURE)

    @property
    def eigenvalues(self) -> torch.Tensor | None:
        """The current k eigenvalues (replicated on every rank), or None before the first refresh."""
        curvature = self._curvature_state()
        return None if curvature is None else curvature[K.EIGENVALUES]

    @property
    def local_eigenvectors(self) -> torch.Tensor | None:
        """This rank's k x P_r slice of the eigenvectors (the whole P when unsharded), or None."""
        curvature = self._curvature_state()
        return None if curvature is None else curvature[K.EIGENVECTORS]

    @property
    def local_lanczos_basis(self) -> torch.Tensor | None:
        """This rank's m x P_r Lanczos basis while an interleaved refresh is in flight, else None."""
        curvature = self._curvature_state()
        run = None if curvature is None else curvature[K.LANCZOS]
        return None if run is None else run["basis"]

    # ------------------------------------------------------------------------------------------ state
    def _init_state(self, state: dict, x: torch.Tensor, layout: ShardLayout) -> None:
        state[K.STEP] = 0
        if self.config.base is BaseOptimizer.ADAMW:
            state[K.EXP_AVG] = torch.zeros_like(x)
            state[K.EXP_AVG_SQ] = torch.zeros_like(x)
        else:
            state[K.MOMENTUM_BUFFER] = torch.zeros_like(x)
        state[K.CURVATURE] = {
            K.REFRESH_COUNT: 0, K.EIGENVALUES: None, K.EIGENVECTORS: None, K.NEWTON_MOMENTUM: None,
            K.LANCZOS: None, K.LANCZOS_STARTED_AT: None,
            K.ADMM_DUAL: torch.zeros_like(x) if self.config.admm.enabled else None,
            K.ADMM_ANCHOR: x.clone() if self.config.admm.enabled else None,
            K.WORLD_SIZE: layout.world_size, K.PARTITION_NUMEL: layout.partition_numel,
            K.TOTAL_NUMEL: layout.total_numel,
        }

    def _check_layout(self, curvature: dict, layout: ShardLayout) -> None:
        saved = (curvature[K.WORLD_SIZE], curvature[K.PARTITION_NUMEL], curvature[K.TOTAL_NUMEL])
        current = (layout.world_size, layout.partition_numel, layout.total_numel)
        if saved != current:
            raise RuntimeError(
                "DHO2 state was created for (world_size, partition_numel, total_numel)="
                f"{saved} but this run has {current}. DHO2 curvature state is partitioned per rank: resume with "
                "the same data-parallel world size and model, or start the optimizer state afresh "
                "(load_optimizer_states=False)."
            )

    def _subspace(self, curvature: dict) -> hybrid.Subspace | None:
        if curvature[K.EIGENVALUES] is None:
            return None
        return hybrid.Subspace(values=curvature[K.EIGENVALUES], vectors=curvature[K.EIGENVECTORS])

    # --------------------------------------------------------------------------------------- curvature
    def _is_refresh_step(self, step: int) -> bool:
        cfg = self.config
        return step >= cfg.warmup_steps and (step - cfg.warmup_steps) % cfg.refresh_interval == 0

    def _advance_curvature(self, step: int, curvature: dict, x: torch.Tensor, layout: ShardLayout) -> None:
        """Start, continue or finish a Lanczos run as the schedule says (before this step's update)."""
        cfg = self.config
        if not cfg.curvature.enabled:
            return
        refresh_now = self._is_refresh_step(step)
        if curvature[K.LANCZOS] is None and not refresh_now:
            return
        if self._capture is None or not self._capture.has_batch:
            if not self._warned_unattached:
                hint = ("the attached model only ran in eval mode (from_pretrained returns an eval-mode model): "
                        "call model.train() before training" if self._capture is not None
                        and self._capture.skipped_eval_forward else
                        "call optimizer.attach(model) and run a training forward pass first")
                logger.warning("DHO2 skipped a curvature refresh: %s. Until then DHO2 behaves as its base "
                               "optimizer.", hint)
                self._warned_unattached = True
            return
        started = time.perf_counter()
        dtype = getattr(torch, cfg.lanczos_dtype)
        if curvature[K.LANCZOS] is None:
            seed = cfg.seed * 1_000_003 + curvature[K.REFRESH_COUNT]
            start = lanczos_start_vector(layout, seed, dtype, x.device)
            curvature[K.LANCZOS] = LanczosRun.start(start, min(cfg.lanczos_order, layout.total_numel), self._comm).state
            curvature[K.LANCZOS_STARTED_AT] = step
        run = LanczosRun(curvature[K.LANCZOS])
        operator = hessian_operator(self._capture.model, self._closure, self._hvp, layout, self._comm,
                                    self._batch_comm)
        try:
            with self._capture.paused():
                if cfg.curvature.mode is CurvatureMode.BLOCKING:
                    run.run(operator, self._comm)
                else:
                    offset = step - curvature[K.LANCZOS_STARTED_AT]
                    for _ in range(self._iterations_at(offset, run.state["order"])):
                        run.iterate(operator, self._comm)
        except LossNotFoundError:
            raise
        except Exception:  # noqa: BLE001 - a failed refresh must not lose the curvature we have
            logger.exception("DHO2 curvature refresh failed at step %d; keeping the previous curvature.", step)
            curvature[K.LANCZOS] = None
            curvature[K.REFRESH_COUNT] += 1
            self.stats.pop("refresh_seconds_partial", None)
            return
        self.stats["refresh_seconds"] = self.stats.get("refresh_seconds_partial", 0.0) + time.perf_counter() - started
        if not run.finished:
            self.stats["refresh_seconds_partial"] = self.stats["refresh_seconds"]
            return
        self.stats.pop("refresh_seconds_partial", None)
        curvature[K.LANCZOS] = None
        curvature[K.REFRESH_COUNT] += 1
        self._install(run, curvature, x.dtype)
        self.stats.update(lanczos_iterations=run.iterations, lanczos_stop=run.stop_reason,
                          refresh_step=step, refresh_count=curvature[K.REFRESH_COUNT])

    def _iterations_at(self, offset: int, order: int) -> int:
        """Lanczos iterations to run at the ``offset``-th step (0-based) of an interleaved refresh."""
        fixed = self.config.curvature.iterations_per_step
        if fixed is not None:
            return fixed
        interval = self.config.refresh_interval
        if offset >= interval - 1:
            return order  # the last step of the window completes the run (iterate stops at the order)
        return (offset + 1) * order // interval - offset * order // interval

    def _closure(self) -> torch.Tensor:
        assert self._capture is not None
        return self._capture.loss()

    def _install(self, run: LanczosRun, curvature: dict, dtype: torch.dtype) -> None:
        """Swap in the new eigenbasis, carrying the Newton momentum; keep the old one if nothing is usable."""
        pairs = run.ritz_pairs()
        chosen = select_top_magnitude(pairs.values, self.config.rank, self.config.eig_floor)
        if chosen.numel() == 0:
            logger.warning("DHO2 curvature refresh found no usable eigenpair (%s); keeping the previous curvature.",
                           run.stop_reason)
            return
        new = hybrid.Subspace(values=pairs.values[chosen].to(dtype), vectors=pairs.local_vectors[chosen].to(dtype))
        old = self._subspace(curvature)
        momentum = curvature[K.NEWTON_MOMENTUM]
        curvature[K.NEWTON_MOMENTUM] = hybrid.carry_momentum(momentum, old, new, self._comm) if old else \
            torch.zeros(new.rank, dtype=dtype, device=new.vectors.device)
        curvature[K.EIGENVALUES], curvature[K.EIGENVECTORS] = new.values, new.vectors
        self.stats["eigenvalues"] = [float(v) for v in new.values]

    # -------------------------------------------------------------------------------------------- step
    def _all_finite(self, tensor: torch.Tensor) -> bool:
        flag = torch.isfinite(tensor).all().to(torch.float64).reshape(1)
        return self._comm.all_reduce(flag).item() == self._comm.world_size

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        shard = _FlatShard(group["params"], self._partitioned)
        if shard.grad is None:
            return loss
        layout = self._current_layout(group)
        state = self.state[group["params"][0]]
        if not state:
            self._init_state(state, shard.x, layout)
        curvature = state[K.CURVATURE]
        self._check_layout(curvature, layout)
        if not self._all_finite(shard.grad):
            logger.warning("DHO2 skipped a step: the gradient contains inf or NaN.")
            return loss
        state[K.STEP] += 1
        step = state[K.STEP]
        self._advance_curvature(step, curvature, shard.x, layout)
        self._update(group, state, curvature, shard, layout, step)
        shard.write_back()
        return loss

    def _update(self, group: dict, state: dict, curvature: dict, shard: _FlatShard, layout: ShardLayout,
                step: int) -> None:
        cfg, comm, x = self.config, self._comm, shard.x
        lr = group["lr"]
        grad = shard.grad.to(x.dtype)
        if cfg.admm.enabled:
            grad = grad + curvature[K.ADMM_DUAL]
        subspace = self._subspace(curvature)
        adam_type = cfg.base is BaseOptimizer.ADAMW
        newton = None
        complement = grad
        if subspace is not None:
            projection = hybrid.project_gradient(grad, subspace, comm)
            complement = projection.complement
            hybrid.update_newton_momentum(curvature[K.NEWTON_MOMENTUM], projection.coefficients,
                                          group["newton_momentum"], adam_type)
            newton = hybrid.newton_direction(curvature[K.NEWTON_MOMENTUM], subspace)
            self.stats["subspace_grad_fraction"] = projection.subspace_fraction
        if adam_type:
            direction = adamw_direction(complement, state[K.EXP_AVG], state[K.EXP_AVG_SQ], step=step, lr=lr,
                                        betas=group["betas"], eps=group["eps"])
        else:
            direction = heavyball_direction(complement, state[K.MOMENTUM_BUFFER], lr=lr, momentum=group["momentum"])
        newton_norm = torch.zeros((), dtype=torch.float64, device=x.device)
        if subspace is not None:
            hybrid.remove_subspace_component(direction, subspace, comm)
            direction.mul_(newton_scale(subspace.values, cfg.lr_clip))
            reference_lr = group["reference_lr"]
            newton.mul_(group["alpha"] * (lr / reference_lr if reference_lr > 0 else 1.0))
            newton_norm = (newton.double() ** 2).sum()
        # One all-reduce: global squared norms of the base and Newton steps, and a non-finite flag.
        norms = torch.stack([(direction.double() ** 2).sum(), newton_norm,
                             (~torch.isfinite(direction)).any().double()
                             + (0.0 if newton is None else (~torch.isfinite(newton)).any().double())])
        comm.all_reduce(norms)
        if norms[2] > 0 or not torch.isfinite(norms[:2]).all():
            logger.warning("DHO2 dropped a non-finite update (step %d) and its curvature; parameters unchanged.", step)
            curvature[K.EIGENVALUES] = curvature[K.EIGENVECTORS] = curvature[K.NEWTON_MOMENTUM] = None
            return
        if newton is not None:
            # Trust region: the Newton step may not exceed newton_max_ratio times the base step (global
            # norms). It guards against tiny eigenvalues (a nearly flat loss) turning u/|lambda| into a jump.
            limit = cfg.newton_max_ratio * float(norms[0].sqrt())
            newton_length = float(norms[1].sqrt())
            scale = limit / newton_length if newton_length > limit else 1.0
            self.stats["newton_trust_scale"] = scale
            direction.sub_(newton, alpha=scale)
        weight_decay = self._weight_decay(group, x, layout)
        if isinstance(weight_decay, torch.Tensor):
            x.mul_(1 - lr * weight_decay)
        elif weight_decay != 0:
            x.mul_(1 - lr * weight_decay)
        x.add_(direction)
        if cfg.admm.enabled and step % cfg.admm_window == 0:
            result = admm_window_end(x, curvature[K.ADMM_DUAL], curvature[K.ADMM_ANCHOR], rho=cfg.admm.rho,
                                     max_extrapolation_ratio=cfg.admm.max_extrapolation_ratio, comm=comm,
                                     dual_decay=cfg.admm.dual_decay)
            self.stats.update(admm_extrapolation_norm=result.extrapolation_norm, admm_safeguard_scale=result.scale)

    # -------------------------------------------------------------------------------------- checkpoints
    def load_state_dict(self, state_dict: dict) -> None:
        """Like ``torch.optim.Optimizer.load_state_dict`` but keeps the curvature state's dtypes (float64
        Lanczos basis, eigenpairs) instead of casting them to the parameters' dtype, and never aliases the
        tensors of the state dict it was given."""
        curvature_by_index = {index: copy.deepcopy(entry.get(K.CURVATURE))
                              for index, entry in state_dict["state"].items() if isinstance(entry, dict)}
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, curvature in curvature_by_index.items():
            if curvature is not None:
                device = params[index].device
                self.state[params[index]][K.CURVATURE] = _to_device(curvature, device)

    def curvature_stats(self) -> dict[str, Any]:
        """The latest eigenvalues, subspace gradient fraction, refresh time and ADMM extrapolation norm."""
        return {k: v for k, v in self.stats.items() if not k.endswith("_partial")}


def _to_device(value: Any, device: torch.device) -> Any:
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    return value
