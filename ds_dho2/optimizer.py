"""``DHO2``: the hybrid-order optimizer as a ``torch.optim.Optimizer``.

One curvature subspace spans all parameters, so DHO2 keeps a single internal parameter group: groups
passed in may differ only in ``weight_decay`` (as the Hugging Face Trainer's decay / no-decay groups do);
DHO2 merges them and applies weight decay per element. This module keeps the per-step update math's
glue -- moving tensors between the parameters and one flat vector, the state, the safeguards -- and asks
its :class:`~ds_dho2.curvature.CurvatureTracker` for the current basis; the math itself lives in
``ds_dho2.core``. Under DeepSpeed ZeRO the flat vector is the rank's partition, bound with
:meth:`DHO2.bind_partition` by ``ds_dho2.integrations.deepspeed``.

A step never reads a value on the host (no ``.item()``): a non-finite gradient is skipped with masked
arithmetic, and the statistics stay tensors until :meth:`DHO2.curvature_stats` reads them. Every
``max_nonfinite_steps`` steps one flag is read, to stop a run whose gradients stay non-finite.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Iterable

import torch

from ds_dho2 import checkpoint
from ds_dho2 import state_keys as K
from ds_dho2.config import ADMMExtrapolation, BaseOptimizer, DHO2Config, HVPMethod
from ds_dho2.core import hybrid
from ds_dho2.core.admm import window_end_extrapolation
from ds_dho2.core.first_order import adamw_direction, fused_adamw_direction, heavyball_direction
from ds_dho2.curvature.tracker import CurvatureTracker
from ds_dho2.dist.comm import Communicator, LocalCommunicator
from ds_dho2.dist.layout import ShardLayout
from ds_dho2.hvp.capture import BatchCapture, LossFn, LossNotFoundError
from ds_dho2.hvp.selection import ProductInputs
from ds_dho2.hvp.strategies import loss_at

logger = logging.getLogger(__name__)


class NonFiniteGradientError(RuntimeError):
    """Gradients stayed inf/NaN for ``max_nonfinite_steps`` consecutive steps; training cannot go on."""


def _views(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of consecutive slices of ``flat`` shaped like ``params``."""
    return [chunk.view_as(p) for chunk, p in zip(flat.split([p.numel() for p in params]), params)]


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


class DHO2(torch.optim.Optimizer):
    """Hybrid-order optimizer: a Newton step in the top-k Hessian subspace, AdamW / heavy-ball elsewhere.

    Arguments are those of :class:`ds_dho2.config.DHO2Config`. Call :meth:`attach` once with the model so
    curvature refreshes can re-run it on the last training batch (a DeepSpeed engine does this itself and
    also hands DHO2 the loss of ``engine.backward``); until the first refresh the optimizer is exactly
    its base optimizer.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, base: str = "adamw", momentum: float = 0.9,
                 rank: int = 4, lanczos_order: int | None = None, alpha: float = 0.1,
                 newton_momentum: float = 0.9, refresh_interval: int = 50, warmup_steps: int | None = None,
                 lr_clip: float | None = None, eig_floor: float = 1e-4, newton_max_ratio: float = 10.0,
                 hvp: str = "auto", lanczos_dtype: str = "float32", max_nonfinite_steps: int = 10, seed: int = 0,
                 curvature: dict | None = None, admm: dict | None = None, **unknown: Any) -> None:
        if unknown:
            DHO2Config.from_dict(unknown)  # raises ConfigError naming the unknown key(s)
        config_args = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, base=base, momentum=momentum,
                           rank=rank, lanczos_order=lanczos_order, alpha=alpha, newton_momentum=newton_momentum,
                           refresh_interval=refresh_interval, warmup_steps=warmup_steps, lr_clip=lr_clip,
                           eig_floor=eig_floor, newton_max_ratio=newton_max_ratio, hvp=hvp,
                           lanczos_dtype=lanczos_dtype, max_nonfinite_steps=max_nonfinite_steps, seed=seed)
        if curvature is not None:
            config_args["curvature"] = curvature
        if admm is not None:
            config_args["admm"] = admm
        config = DHO2Config(**config_args)
        merged, decays, _ = _merge_param_groups(params, config.weight_decay)
        total = sum(p.numel() for p in merged)
        if config.rank > total:
            logger.warning("DHO2 rank=%d exceeds the %d trainable parameters; using rank=%d.", config.rank, total, total)
            config = DHO2Config(**{**config_args, "rank": total, "lanczos_order": min(config.lanczos_order, total)})
        self.config = config
        self._check_schedule()
        defaults = dict(lr=lr, betas=self.config.betas, eps=eps, weight_decay=weight_decay, alpha=alpha,
                        momentum=momentum, newton_momentum=newton_momentum, reference_lr=lr)
        super().__init__([{"params": merged}], defaults)
        self._weight_decay_by_param = {id(p): wd for p, wd in zip(merged, decays)}
        self._uniform_weight_decay = len(set(decays)) == 1
        if self._uniform_weight_decay:
            self.param_groups[0]["weight_decay"] = decays[0]
        self.tracker = CurvatureTracker(self.config)
        self._layout: ShardLayout | None = None
        self._comm: Communicator = LocalCommunicator()
        self._batch_comm: Communicator = self._comm
        self._partitioned = False
        self._capture: BatchCapture | None = None
        self._engine_backward = False          # an engine hands DHO2 the loss of engine.backward
        self._saw_engine_loss = False
        self._is_boundary: Callable[[], bool] = lambda: True
        self._weight_decay_vector: torch.Tensor | None = None
        self._grad_buffer: torch.Tensor | None = None
        self._direction_buffer: torch.Tensor | None = None
        self._direction_views: list[torch.Tensor] | None = None
        self._inverse_cache: tuple | None = None
        self._grad_views: list[torch.Tensor] = []
        self._fused_adamw = True  # one torch._fused_adamw_ kernel for the base step, where it runs
        self._step_stats: dict[str, Any] = {}
        self._warned: set[str] = set()

    @classmethod
    def from_config(cls, params: Iterable[Any], config: dict[str, Any]) -> "DHO2":
        """Build from a plain dict (a DeepSpeed ``"params"`` block), validated by ``DHO2Config.from_dict``."""
        DHO2Config.from_dict(config)
        return cls(params, **config)

    def _check_schedule(self) -> None:
        cfg = self.config
        fixed = cfg.curvature.iterations_per_step
        if cfg.curvature.mode.value == "interleaved" and fixed is not None:
            steps_needed = -(-cfg.lanczos_order // fixed)
            if steps_needed > cfg.refresh_interval:
                raise ValueError(
                    f"Invalid interleaved curvature schedule: lanczos_order={cfg.lanczos_order} at "
                    f"curvature.iterations_per_step={fixed} takes {steps_needed} steps, "
                    f"more than refresh_interval={cfg.refresh_interval}. Raise iterations_per_step or refresh_interval.")

    # ----------------------------------------------------------------------------------------- wiring
    def attach(self, model: torch.nn.Module, loss_fn: LossFn | None = None) -> "DHO2":
        """Learn the model: forward hooks capture each training batch; refreshes re-run the model on it.

        Without ``loss_fn`` the loss is the output itself (a scalar), its ``.loss`` or its ``["loss"]``;
        ``loss_fn(output, args, kwargs)`` computes it otherwise. Under a DeepSpeed engine neither is
        needed: DHO2 takes its products on the loss handed to ``engine.backward``.
        """
        if self._capture is not None:
            self._capture.remove()
        self._capture = BatchCapture(model, loss_fn, math_attention=self._graph_products_due)
        return self

    def bind_partition(self, layout: ShardLayout, comm: Communicator) -> None:
        """Use a rank's flat partition (DeepSpeed ZeRO-1/2): ``param_groups[0]['params']`` is that
        partition, ``layout`` maps it to the module's parameters and ``comm`` is the data-parallel group."""
        self._layout, self._comm, self._batch_comm, self._partitioned = layout, comm, comm, True
        self._weight_decay_vector = None
        self.tracker.bind(layout, comm, comm)

    def bind_replicated(self, batch_comm: Communicator) -> None:
        """Parameters are whole on every rank (ZeRO stage 0): curvature averages HVPs over ``batch_comm``."""
        self._comm, self._batch_comm, self._partitioned = LocalCommunicator(), batch_comm, False
        self._layout, self._weight_decay_vector = None, None

    def bind_engine_backward(self, is_boundary: Callable[[], bool]) -> None:
        """Products may be taken on the loss of ``engine.backward`` (see :meth:`on_backward`);
        ``is_boundary()`` says whether the current micro-batch ends a gradient-accumulation window."""
        self._engine_backward, self._is_boundary = True, is_boundary

    @property
    def model(self) -> torch.nn.Module | None:
        return None if self._capture is None else self._capture.model

    def _current_layout(self) -> ShardLayout:
        if self._layout is None:
            self._layout = ShardLayout.unsharded(self.param_groups[0]["params"])
        if self.tracker.layout is None:
            self.tracker.bind(self._layout, self._comm, self._batch_comm)
        return self._layout

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
        """This rank's m x P_r Lanczos basis while a refresh is in flight, else None."""
        curvature = self._curvature_state()
        run = None if curvature is None else curvature[K.LANCZOS]
        return None if run is None else run["basis"]

    # ------------------------------------------------------------------------------------------ state
    def _numel(self) -> int:
        params = self.param_groups[0]["params"]
        return params[0].numel() if self._partitioned else sum(p.numel() for p in params)

    def _ensure_state(self) -> dict:
        """The per-shard state, created on first use (also by a backward before the first step)."""
        group = self.param_groups[0]
        if checkpoint.GROUP_KEY in group:  # a universal-checkpoint load wrote the saved form in place
            self.adopt_checkpoint_state(universal=True)
        key = group["params"][0]
        state = self.state[key]
        self._current_layout()  # binds the tracker to the layout
        device, dtype = key.device, torch.promote_types(key.dtype, torch.float32)
        if not state:
            numel = self._numel()
            state[K.STEP] = 0
            state[K.APPLIED_STEPS] = torch.zeros((), dtype=dtype, device=device)
            if self.config.base is BaseOptimizer.ADAMW:
                state[K.EXP_AVG] = torch.zeros(numel, dtype=dtype, device=device)
                state[K.EXP_AVG_SQ] = torch.zeros(numel, dtype=dtype, device=device)
            else:
                state[K.MOMENTUM_BUFFER] = torch.zeros(numel, dtype=dtype, device=device)
            curvature = self.tracker.new_state()
            curvature.update({
                K.NEWTON_MOMENTUM: None, K.NEWTON_BASIS_VERSION: 0,
                K.NONFINITE_STREAK: torch.zeros((), dtype=torch.float32, device=device),
                K.NONFINITE_MAX_STREAK: torch.zeros((), dtype=torch.float32, device=device),
                K.SKIPPED_STEPS: torch.zeros((), dtype=torch.float32, device=device),
                K.ADMM_DUAL: torch.zeros(numel, dtype=dtype, device=device) if self.config.admm.enabled else None,
                K.ADMM_ANCHOR: self._flat_x().clone() if self.config.admm.enabled else None,
                K.ADMM_PENDING: None, K.ADMM_PENDING_STEPS: 0, K.ADMM_WINDOWS: 0, K.ADMM_ACCEPTED: 0,
            })
            state[K.CURVATURE] = curvature
        if not torch.is_tensor(state.get(K.APPLIED_STEPS)):  # a checkpoint of a plain-int step counter
            state[K.APPLIED_STEPS] = torch.tensor(float(state[K.STEP]), dtype=dtype, device=device)
        self.tracker.adopt(state[K.CURVATURE], device)
        return state

    def _flat_x(self) -> torch.Tensor:
        params = self.param_groups[0]["params"]
        if self._partitioned:
            return params[0].data
        return torch.cat([p.detach().reshape(-1) for p in params]).to(torch.promote_types(params[0].dtype, torch.float32))

    # --------------------------------------------------------------------------------------- curvature
    def _graph_products_due(self) -> bool:
        """Whether the next training forward must build a graph that supports products (math attention)."""
        if not self._engine_backward or not self.config.curvature.enabled:
            return False
        if self.tracker.chooser.resolved not in (None, HVPMethod.GRAPH) or not self._is_boundary():
            return False
        state = self._ensure_state()
        return self.tracker.wants_products(state[K.STEP] + 1)

    def _product_inputs(self, graph_loss: torch.Tensor | None = None, graph_scale: float = 1.0) -> ProductInputs | None:
        capture = self._capture
        if capture is None or not capture.has_batch:
            if graph_loss is None:
                self._warn_once("unattached", "DHO2 skipped a curvature refresh: %s. Until then DHO2 behaves as its "
                                "base optimizer.", self._attach_hint())
                return None
        model = capture.model if capture is not None else None
        replay = full = None
        if capture is not None and capture.can_replay:
            replay = capture.replay_closure(self.config.curvature.batch_fraction)
            full = capture.replay_closure(1.0)
        if replay is None and graph_loss is None:
            return None
        return ProductInputs(model=model, params=list(self._current_layout().params), replay=replay,
                             full_replay=full, graph_loss=graph_loss, graph_scale=graph_scale)

    def _attach_hint(self) -> str:
        if self._capture is not None and self._capture.skipped_eval_forward:
            return ("the attached model only ran in eval mode (from_pretrained returns an eval-mode model): call "
                    "model.train() before training")
        return "call optimizer.attach(model) and run a training forward pass first"

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    def on_backward(self, loss: torch.Tensor, scale: float) -> None:
        """Called by the engine's ``backward(loss)`` before it differentiates: on a boundary micro-batch of
        a step that is due for products, run them on this loss's graph (``scale``: see
        ``ds_dho2.curvature.loss_scale``)."""
        self._saw_engine_loss = True
        if not self.config.curvature.enabled or not self._is_boundary():
            return
        state = self._ensure_state()
        step = state[K.STEP] + 1
        if not self.tracker.wants_products(step):
            return
        graph_loss = loss if loss.requires_grad else None
        self._advance(step, lambda: self._product_inputs(graph_loss, scale))

    def _advance(self, step: int, inputs: Callable[[], ProductInputs | None]) -> None:
        if self._capture is not None:
            with self._capture.paused():
                self.tracker.advance(step, inputs)
        else:
            self.tracker.advance(step, inputs)

    def _check_loss_route(self) -> None:
        """At the first step: fail now, not at the first refresh, if no route to the loss exists."""
        if not self.config.curvature.enabled:
            return
        capture = self._capture
        if capture is None:
            self._warn_once("unattached", "DHO2 has no model to take curvature from: %s. Until then DHO2 behaves as "
                            "its base optimizer.", self._attach_hint())
            return
        if not capture.has_batch:
            return
        if capture.can_replay or self._saw_engine_loss:
            return
        if self._engine_backward:
            raise LossNotFoundError(
                "DHO2 sees no loss: the model output carries none and the loss did not pass through "
                "engine.backward(loss). Call engine.backward(loss) instead of loss.backward(), or return the "
                "loss from the model's forward.")
        raise LossNotFoundError(
            "DHO2 cannot find a scalar loss in the model output: return the loss from forward (a 0-dim "
            "tensor, .loss or ['loss']), or call attach(model, loss_fn=lambda output, args, kwargs: ...).")

    # -------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        grad = self._flat_grad(group)
        if grad is None:
            return loss
        state = self._ensure_state()
        state[K.STEP] += 1
        step = state[K.STEP]
        if step == 1:
            self._check_loss_route()
        if self.tracker.wants_products(step):
            if self._engine_backward and self._saw_engine_loss:
                self._warn_once("late_products", "DHO2 took curvature products in step() by replaying the batch: "
                                "the last engine.backward was not on an accumulation boundary.")
            self._advance(step, self._product_inputs)
        self._update(group, state, grad, step)
        self._check_nonfinite(state, step)
        return loss

    def _flat_grad(self, group: dict) -> torch.Tensor | None:
        params = group["params"]
        if self._partitioned:
            grad = params[0].grad
            return None if grad is None else grad.data
        grads = [p.grad for p in params]
        if all(g is None for g in grads):
            return None
        dtype = torch.promote_types(params[0].dtype, torch.float32)
        numel = self._numel()
        if self._grad_buffer is None or self._grad_buffer.numel() != numel or self._grad_buffer.dtype != dtype:
            self._grad_buffer = torch.empty(numel, dtype=dtype, device=params[0].device)
            self._grad_views = _views(self._grad_buffer, params)
        if any(g is None for g in grads):
            for view, g in zip(self._grad_views, grads):
                view.zero_() if g is None else view.copy_(g)
        else:
            torch._foreach_copy_(self._grad_views, grads)  # one call; casts where dtypes differ
        return self._grad_buffer

    def _weight_decay(self, group: dict, numel_dtype: torch.dtype, device: torch.device) -> float | torch.Tensor:
        if self._uniform_weight_decay:
            return group["weight_decay"]
        if self._weight_decay_vector is None:
            layout = self._current_layout()
            decays = [self._weight_decay_by_param[id(p)] for p in layout.params]
            if self._partitioned:
                self._weight_decay_vector = layout.per_element(decays, numel_dtype, device)
            else:
                counts = torch.tensor([p.numel() for p in layout.params], device=device)
                self._weight_decay_vector = torch.repeat_interleave(
                    torch.tensor(decays, dtype=numel_dtype, device=device), counts)
        return self._weight_decay_vector

    def _update(self, group: dict, state: dict, grad: torch.Tensor, step: int) -> None:
        cfg, comm = self.config, self._comm
        curvature = state[K.CURVATURE]
        lr = group["lr"]
        dtype = state[K.EXP_AVG].dtype if K.EXP_AVG in state else state[K.MOMENTUM_BUFFER].dtype
        grad = grad.to(dtype)
        if cfg.admm.enabled:
            grad = grad + curvature[K.ADMM_DUAL]
        basis = self.tracker.basis
        split = hybrid.split_gradient(grad, basis, comm)
        keep_flag = split.nonfinite == 0
        keep = keep_flag.to(dtype)
        adam_type = cfg.base is BaseOptimizer.ADAMW
        direction = None
        if adam_type and self._fused_adamw:
            if self._direction_buffer is None or self._direction_buffer.shape != grad.shape:
                self._direction_buffer = torch.empty_like(grad)
                self._direction_views = None
            direction = fused_adamw_direction(split.complement, state[K.EXP_AVG], state[K.EXP_AVG_SQ],
                                              state[K.APPLIED_STEPS], keep, self._direction_buffer, lr=lr,
                                              betas=group["betas"], eps=group["eps"])
            self._fused_adamw = direction is not None
        if direction is not None:
            pass
        elif adam_type:
            complement = torch.where(keep_flag, split.complement, 0.0)
            direction = adamw_direction(complement, state[K.EXP_AVG], state[K.EXP_AVG_SQ], state[K.APPLIED_STEPS],
                                        keep, lr=lr, betas=group["betas"], eps=group["eps"])
        else:
            complement = torch.where(keep_flag, split.complement, 0.0)
            state[K.APPLIED_STEPS].add_(keep)
            direction = heavyball_direction(complement, state[K.MOMENTUM_BUFFER], keep, lr=lr,
                                            momentum=group["momentum"])
        stats: dict[str, Any] = {"skipped": 1 - keep}
        if basis is not None:
            momentum = self._newton_momentum(curvature, basis, dtype)
            coefficients = torch.where(keep_flag, split.coefficients, 0.0)
            hybrid.update_newton_momentum(momentum, coefficients, group["newton_momentum"], adam_type, keep)
            reference_lr = group["reference_lr"]
            alpha = group["alpha"] * (lr / reference_lr if reference_lr > 0 else 1.0)
            newton = momentum * self._inverse_magnitude(basis, dtype) * (keep * alpha)  # skipped step: nothing
            base_scale = hybrid.newton_scale(basis.values, cfg.lr_clip).to(dtype) if not adam_type else 1.0
            finish = hybrid.finish_update(direction, basis, newton, comm, base_scale=base_scale,
                                          newton_max_ratio=cfg.newton_max_ratio,
                                          total_numel=self._current_layout().total_numel)
            stats.update(subspace_grad_fraction=(split.coefficients, split.grad_sq), newton_trust_scale=finish)
        if curvature.get(K.ADMM_PENDING_STEPS):
            direction.add_(curvature[K.ADMM_PENDING] * keep)  # the spread extrapolation's share of this step
            curvature[K.ADMM_PENDING_STEPS] -= 1
            if curvature[K.ADMM_PENDING_STEPS] == 0:
                curvature[K.ADMM_PENDING] = None
        self._apply(group, direction, keep, lr)
        curvature[K.NONFINITE_STREAK].add_(1).mul_(1 - keep)
        torch.maximum(curvature[K.NONFINITE_MAX_STREAK], curvature[K.NONFINITE_STREAK],
                      out=curvature[K.NONFINITE_MAX_STREAK])
        curvature[K.SKIPPED_STEPS].add_(1 - keep)
        if cfg.admm.enabled and step % cfg.admm_window == 0:
            self._admm_window_end(curvature)
        self._step_stats = stats

    def _inverse_magnitude(self, basis: hybrid.Basis, dtype: torch.dtype) -> torch.Tensor:
        """``1 / |lambda|`` of the installed basis, computed once per install."""
        if self._inverse_cache is None or self._inverse_cache[0] is not basis or self._inverse_cache[1] != dtype:
            self._inverse_cache = (basis, dtype, basis.inverse_magnitude(dtype))
        return self._inverse_cache[2]

    def _newton_momentum(self, curvature: dict, basis: hybrid.Basis, dtype: torch.dtype) -> torch.Tensor:
        """The coefficient-space momentum in the current basis (carried over at each install)."""
        momentum = curvature[K.NEWTON_MOMENTUM]
        if curvature[K.NEWTON_BASIS_VERSION] != basis.version or momentum is None:
            transition = self.tracker.transition(curvature[K.NEWTON_BASIS_VERSION])
            if momentum is not None and transition is not None and transition.shape[1] == momentum.numel():
                momentum = (transition @ momentum.double()).to(dtype)
            else:
                momentum = torch.zeros(basis.rank, dtype=dtype, device=basis.vectors.device)
            curvature[K.NEWTON_MOMENTUM], curvature[K.NEWTON_BASIS_VERSION] = momentum, basis.version
        return momentum

    def _apply(self, group: dict, update: torch.Tensor, keep: torch.Tensor, lr: float) -> None:
        """``x <- x * (1 - lr * wd) + update`` on the partition or, through views, on the parameters."""
        params = group["params"]
        weight_decay = self._weight_decay(group, update.dtype, update.device)
        if self._partitioned:
            x = params[0].data
            if isinstance(weight_decay, torch.Tensor):
                x.mul_(1 - lr * weight_decay * keep)
            elif weight_decay != 0:
                x.mul_(1 - lr * weight_decay * keep)
            x.add_(update.to(x.dtype))
            return
        if isinstance(weight_decay, torch.Tensor):
            update = update - (lr * weight_decay * keep) * self._flat_x()
        elif weight_decay != 0:
            torch._foreach_mul_(params, 1 - lr * weight_decay * keep)
        if update is not self._direction_buffer or self._direction_views is None:
            views = _views(update, params)
            if update is self._direction_buffer:
                self._direction_views = views
        else:
            views = self._direction_views
        if views[0].dtype != params[0].dtype:
            views = [v.to(p.dtype) for v, p in zip(views, params)]
        torch._foreach_add_(params, views)

    def _admm_window_end(self, curvature: dict) -> None:
        """The window end of DESIGN.md section 4, with the configured extrapolation (``core/admm.py``)."""
        cfg = self.config.admm
        mode = cfg.extrapolation
        fraction = 1.0 if self.tracker.chooser.whole_batch else self.config.curvature.batch_fraction
        replay = self._capture.replay_closure(fraction) \
            if self._capture is not None and self._capture.can_replay else None
        if mode is ADMMExtrapolation.CHECKED and replay is None:
            self._warn_once("admm_checked", "DHO2 admm.extrapolation='checked' needs a loss it can re-evaluate (a "
                            "loss in the model output or attach(model, loss_fn=...)); spreading instead.")
            mode = ADMMExtrapolation.SPREAD
        x = self._flat_x()
        dual, anchor = curvature[K.ADMM_DUAL], curvature[K.ADMM_ANCHOR]
        lag = before = None
        if mode is ADMMExtrapolation.CHECKED:
            lag = self._module_lag(x)
            try:
                before = self._admm_loss(replay, lag)
            except (RuntimeError, ValueError, TypeError) as error:
                self._warn_once("admm_checked_failed", "DHO2 cannot re-evaluate the loss for admm.extrapolation="
                                "'checked' (%s); spreading the extrapolation instead.", error)
                mode = ADMMExtrapolation.SPREAD
        result = window_end_extrapolation(x, dual, anchor, rho=cfg.rho, max_extrapolation_ratio=cfg.max_extrapolation_ratio,
                                          comm=self._comm)
        curvature[K.ADMM_WINDOWS] = curvature.get(K.ADMM_WINDOWS, 0) + 1
        accepted = result.extrapolation is not None
        if accepted and mode is ADMMExtrapolation.SPREAD:
            anchor.copy_(x).add_(result.extrapolation)  # the next window's displacement excludes the spread part
            curvature[K.ADMM_PENDING] = result.extrapolation.div_(self.config.admm_window)
            curvature[K.ADMM_PENDING_STEPS] = self.config.admm_window
        elif accepted:
            if mode is ADMMExtrapolation.CHECKED:
                after = self._admm_loss(replay, result.extrapolation if lag is None else lag + result.extrapolation)
                accepted = bool(after <= before)
            if accepted:
                x.add_(result.extrapolation)
                self._write_back(x)
                anchor.copy_(x)
            else:
                dual.zero_()
                anchor.copy_(x)
        if accepted and cfg.dual_decay != 1.0:
            dual.mul_(cfg.dual_decay)
        curvature[K.ADMM_ACCEPTED] = curvature.get(K.ADMM_ACCEPTED, 0) + int(accepted)
        self.tracker.stats.update(admm_extrapolation_norm=result.extrapolation_norm, admm_safeguard_scale=result.scale,
                                  admm_accepted=float(accepted),
                                  admm_acceptance_rate=curvature[K.ADMM_ACCEPTED] / curvature[K.ADMM_WINDOWS])

    def _module_lag(self, x: torch.Tensor) -> torch.Tensor | None:
        """This step's update that the module's parameters do not hold yet (ZeRO copies the partition into
        them after ``step()``), as this rank's slice; None when they already hold it."""
        if not self._partitioned:
            return None
        layout = self._current_layout()
        module = layout.flatten([p.detach() for p in layout.params], dtype=x.dtype)
        return x - layout.local_slice(module)

    def _admm_loss(self, replay: Callable[[], torch.Tensor], shift: torch.Tensor | None) -> float:
        """The mean over ranks of the curvature batch's loss at the module's parameters (+ ``shift``)."""
        layout = self._current_layout()
        shifts = None
        if shift is not None:
            full = self._comm.all_gather(shift)[: layout.total_numel]
            shifts = layout.unflatten(full)
        loss = loss_at(self._capture.model, layout.params, replay, shifts).double().reshape(1)
        return float(self._batch_comm.all_reduce_mean(loss))

    def _write_back(self, x: torch.Tensor) -> None:
        if self._partitioned:
            return
        params = self.param_groups[0]["params"]
        for p, chunk in zip(params, x.split([p.numel() for p in params])):
            p.data.copy_(chunk.view_as(p))

    def _check_nonfinite(self, state: dict, step: int) -> None:
        """Every ``max_nonfinite_steps`` steps read one flag: stop a run whose gradients stay non-finite."""
        limit = self.config.max_nonfinite_steps
        if step % limit != 0:
            return
        curvature = state[K.CURVATURE]
        longest = float(curvature[K.NONFINITE_MAX_STREAK])
        skipped = float(curvature[K.SKIPPED_STEPS])
        curvature[K.NONFINITE_MAX_STREAK].zero_()
        curvature[K.SKIPPED_STEPS].zero_()
        if skipped:
            logger.warning("DHO2 skipped %d of the last %d steps: their gradients contained inf or NaN.",
                           int(skipped), limit)
        if longest >= limit:
            raise NonFiniteGradientError(
                f"DHO2 stopped at step {step}: the gradient was inf or NaN in {int(longest)} consecutive steps "
                f"(max_nonfinite_steps={limit}), so every step was skipped. Lower the learning rate, enable "
                "gradient clipping or fix the loss; raise max_nonfinite_steps to tolerate longer runs of bad steps.")

    # -------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """The saved form of the state (:mod:`ds_dho2.checkpoint`): partitioned curvature tensors as flat 1-D
        entries (``dho2_eigenvectors_<i>``, ...), everything replicated as plain values in
        ``param_groups[0]["dho2_replicated"]``. DeepSpeed's regular and universal checkpoints both carry it."""
        return checkpoint.pack_state_dict(super().state_dict())

    def load_state_dict(self, state_dict: dict) -> None:
        """Like ``torch.optim.Optimizer.load_state_dict`` but keeps the curvature state's dtypes (float64
        eigenvalues, the Lanczos basis) instead of casting them to the parameters' dtype, and never aliases
        the tensors of the state dict it was given. Reads the saved form of :meth:`state_dict` and the
        nested form earlier versions saved."""
        entries = {index: entry for index, entry in state_dict["state"].items() if isinstance(entry, dict)}
        flat_by_index = {index: {k: v for k, v in entry.items() if checkpoint.is_flat_key(k)}
                         for index, entry in entries.items()}
        nested_by_index = {index: copy.deepcopy(entry.get(K.CURVATURE)) for index, entry in entries.items()}
        state = dict(state_dict["state"])
        for index, entry in entries.items():
            state[index] = {k: v for k, v in entry.items() if k != K.CURVATURE and not checkpoint.is_flat_key(k)}
        groups = [dict(group) for group in state_dict["param_groups"]]
        replicated = groups[0].pop(checkpoint.GROUP_KEY, None) if groups else None
        super().load_state_dict({**state_dict, "state": state, "param_groups": groups})
        params = [p for group in self.param_groups for p in group["params"]]
        for index, curvature in nested_by_index.items():
            if curvature is not None:
                self.state[params[index]][K.CURVATURE] = curvature
        if replicated is not None:
            index = replicated.get("state_index", 0)
            param = params[index]
            flat = {k: v.to(param.device) for k, v in flat_by_index.get(index, {}).items()}
            self.state[param] = checkpoint.unpack_entry({**self.state[param], **flat}, replicated,
                                                        device=param.device, copy=True)

    def adopt_checkpoint_state(self, universal: bool = False) -> bool:
        """Turn the saved form that a DeepSpeed universal-checkpoint load wrote straight into the state and
        param group (it never calls :meth:`load_state_dict`) into live state, laid out for this run's
        partition. True when something was adopted. With ``universal``, state without DHO2's saved form (a
        checkpoint converted by DeepSpeed's own ds_to_universal) raises
        :class:`~ds_dho2.checkpoint.CheckpointFormatError` naming ``ds-dho2 to-universal``."""
        group = self.param_groups[0]
        key = group["params"][0]
        replicated = group.pop(checkpoint.GROUP_KEY, None)
        state = self.state.get(key)
        if replicated is None:
            if universal and state and K.CURVATURE not in state:
                raise checkpoint.CheckpointFormatError(checkpoint.missing_state_message(
                    f"no '{checkpoint.GROUP_KEY}' in its param_groups"))
            return False
        layout = self._current_layout()
        self.state[key] = checkpoint.unpack_entry(
            dict(state or {}), replicated, device=key.device, copy=False, universal=True,
            current_layout=(layout.world_size, layout.partition_numel, layout.total_numel))
        logger.info("DHO2 adopted its checkpointed state for world size %d (saved at world size %d).",
                    layout.world_size, replicated["layout"]["world_size"])
        self._ensure_state()
        return True

    def curvature_stats(self) -> dict[str, Any]:
        """The latest eigenvalues, subspace gradient fraction, refresh time, HVP strategy and cost, trust
        scale and ADMM extrapolation norm, as plain numbers (read from the device here, not in the step)."""
        stats = {k: v for k, v in self.tracker.stats.items() if not k.endswith("_partial")}
        for key, value in self._step_stats.items():
            if isinstance(value, hybrid.Finish):
                value = hybrid.trust_scale(value)
            elif isinstance(value, tuple):  # (coefficients, ||g||^2): ||V g|| / ||g||
                value = float(value[0].norm() / value[1].clamp_min(1e-300).sqrt())
            stats[key] = float(value) if torch.is_tensor(value) else value
        if self.tracker.chooser.report:
            stats["hvp_report"] = self.tracker.chooser.report
        return stats

    @property
    def stats(self) -> dict[str, Any]:
        """Alias of :meth:`curvature_stats`."""
        return self.curvature_stats()
